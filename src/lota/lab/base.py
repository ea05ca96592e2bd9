"""The lab's base model: a small Llama with its own byte-level BPE tokenizer, pretrained by a
reproducible recipe on a generated corpus (``lota lab pretrain``).

The corpus is generic text from the same worlds as the tasks (people and objects, numbers and
arithmetic facts, tables and queries, word lists, a few sentences in the invented language, polite
dialogue) without the tasks' prompt formats, so that the tasks are fine-tuning problems rather
than learning from scratch. Everything is deterministic by the recipe's seed.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from pathlib import Path

import torch

from . import tasks as T

RECIPES = {
    # 2.17M parameters (the tokenizer stops at 1,038 tokens of its 2048 budget). About 0.6 s per step
    # of 32 x 128 tokens here: the 2400 steps (9.8M tokens, 1.4 passes over the corpus) took 35
    # minutes. The size keeps each fine-tuning run of the quality bench well under a minute.
    "small": {
        "hidden": 192,
        "layers": 4,
        "heads": 6,
        "intermediate": 512,
        "vocab": 2048,
        "docs": 150000,
        "steps": 2400,
        "batch": 32,
        "seq": 128,
        "lr": 2e-3,
        "seed": 0,
    },
    # for tests and quick looks
    "tiny": {
        "hidden": 32,
        "layers": 2,
        "heads": 2,
        "intermediate": 64,
        "vocab": 300,
        "docs": 400,
        "steps": 20,
        "batch": 8,
        "seq": 64,
        "lr": 3e-3,
        "seed": 0,
    },
}


def default_base() -> str:
    """The committed lab base model (recipe ``small``), shipped inside the package."""
    from ..errors import InputError

    folder = Path(__file__).parent / "base"
    if not (folder / "config.json").exists():
        raise InputError(
            "the lab's base model is missing from the installation",
            str(folder),
            "rebuild it with 'lota lab pretrain --out DIR' and pass --base DIR",
        )
    return str(folder)


def lab_recipe(folder: str) -> dict:
    """The pretraining recipe of a lab base model folder, from the ``lab_recipe.json`` that
    ``lota lab pretrain`` writes beside the model: the lab's general-forgetting measure draws its
    held-out text from the recipe's corpus (``held_out``). Any other folder is refused in one line,
    before the lab does any work."""
    from ..errors import InputError

    fix = (
        "pass a folder written by 'lota lab pretrain', --base real (lota lab real-base), or "
        "leave out --base for the lab's own base"
    )
    path = Path(folder) / "lab_recipe.json"
    if not Path(folder).is_dir():
        raise InputError("the base model folder does not exist", str(folder), fix)
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))["recipe"]
    except FileNotFoundError:
        raise InputError(
            "is not a lab base model (it has no lab_recipe.json)", str(folder), fix
        ) from None
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        raise InputError("is not a lab recipe", str(path), fix) from None
    if not isinstance(recipe, dict) or not all(
        type(recipe.get(k)) is int and recipe[k] >= (0 if k == "seed" else 1)
        for k in ("docs", "seed", "seq")
    ):
        raise InputError("is not a lab recipe (docs, seed and seq)", str(path), fix)
    return recipe


# ---------------------------------------------------------------------------- corpus
def _sentence(rng: random.Random) -> str:
    who, item = rng.choice(T.NAMES), rng.choice(T.ITEMS)
    verbs = ["keeps", "sells", "counts", "sorts", "paints", "finds", "shares", "packs"]
    places = ["at home", "in the shop", "at school", "by the river", "in the garden", "on the bus"]
    return f"{who} {rng.choice(verbs)} {rng.randint(2, 90)} {item} {rng.choice(places)}."


def _fact(rng: random.Random) -> str:
    a, b = rng.randint(0, 30), rng.randint(0, 30)
    op = rng.randrange(3)
    if op == 0:
        return f"{a} plus {b} is {a + b}. {a} + {b} = {a + b}."
    if op == 1:
        return f"{a + b} minus {b} is {a}. {a + b} - {b} = {a}."
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    return f"{a} times {b} is {a * b}. {a} * {b} = {a * b}."


def _table(rng: random.Random) -> str:
    table = rng.choice(list(T.TABLES))
    cols = T.TABLES[table]
    picked = rng.sample(cols, rng.randint(1, len(cols)))
    line = f"The table {table} has the columns " + ", ".join(c for c, _ in picked) + "."
    if rng.random() < 0.5:
        line += f" SELECT {', '.join(c for c, _ in picked)} FROM {table};"
    return line


def _words(rng: random.Random) -> str:
    words = rng.sample(T.WORDS, rng.randint(2, 5))
    style = rng.randrange(4)
    if style == 0:
        return "Words: " + ", ".join(words) + "."
    if style == 1:
        return " ".join(w.capitalize() for w in words) + "."
    if style == 2:
        return "\n".join(f"- {w}" for w in words)
    return f"The word {words[0]} in capitals is {words[0].upper()}."


def _invented(rng: random.Random) -> str:
    english = rng.choice(list(T.LEXICON))
    return f"In the invented language, '{english}' is '{T.LEXICON[english]}'."


def _dialogue(rng: random.Random) -> str:
    thing = rng.choice(T.THINGS)
    lines = [
        (f"How do I clean my {thing}?", "Use a soft cloth and a little warm water."),
        (f"Is my {thing} safe to leave outside?", "Cover it and keep it locked when you are away."),
        ("Can you help me plan my day?", "Sure. Start with the hardest task while you are fresh."),
        ("What is a good name for a cat?", "Maple, Frost or Pearl are friendly names."),
    ]
    q, a = rng.choice(lines)
    return f"User: {q}\nAssistant: {a}"


def corpus(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(f"lab-corpus:{seed}")
    makers = [_sentence, _sentence, _fact, _fact, _table, _words, _invented, _dialogue]
    docs = []
    for _ in range(n_docs):
        parts = [rng.choice(makers)(rng) for _ in range(rng.randint(2, 5))]
        docs.append("\n".join(parts))
    return docs


HELD_OUT_DOCS = 256  # documents of the general-text loss (the lab's forgetting measure)


def held_out(recipe: dict, n: int = HELD_OUT_DOCS) -> list[str]:
    """``n`` documents of the base's pretraining distribution that its pretraining never saw: the
    same generator with another seed, every document of the pretraining corpus dropped."""
    return list(_held_out(recipe["docs"], recipe["seed"], n))


@functools.lru_cache(maxsize=4)
def _held_out(n_docs: int, seed: int, n: int) -> tuple[str, ...]:
    seen = set(corpus(n_docs, seed))
    fresh = [d for d in corpus(2 * n, f"held-out:{seed}") if d not in seen]
    if len(fresh) < n:
        raise RuntimeError(f"only {len(fresh)} held-out documents differ from the corpus")
    return tuple(fresh[:n])


@torch.no_grad()
def general_loss(model, tokenizer, docs: list[str], seq: int, batch: int = 32) -> dict:
    """Mean per-token cross-entropy of ``model`` on ``docs`` (each cut to ``seq`` tokens, EOS
    appended as in pretraining): the sum over all predicted tokens over their count."""
    model.eval()
    total, count = 0.0, 0
    encoded = [(tokenizer(d)["input_ids"] + [tokenizer.eos_token_id])[:seq] for d in docs]
    for i in range(0, len(encoded), batch):
        chunk = encoded[i : i + batch]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, c in enumerate(chunk):
            ids[j, : len(c)] = torch.tensor(c)
            mask[j, : len(c)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += int((target != -100).sum())
    return {"score": total / count, "n": len(docs), "tokens": count}


# ---------------------------------------------------------------------------- tokenizer and model
def train_tokenizer(docs: list[str], vocab: int):
    """A byte-level BPE tokenizer (``tokenizers``) wrapped for transformers, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    return fast


def build_model(recipe: dict, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe["hidden"],
        intermediate_size=recipe["intermediate"],
        num_hidden_layers=recipe["layers"],
        num_attention_heads=recipe["heads"],
        num_key_value_heads=recipe["heads"],
        max_position_embeddings=recipe["seq"] * 2,
        tie_word_embeddings=False,  # KS-Lottery changes input rows without touching the head
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(recipe["seed"])
    return LlamaForCausalLM(config)


def pretrain(
    out: str,
    size: str = "small",
    steps: int | None = None,
    show_progress: bool = True,
    force: bool = False,
) -> dict:
    """Build the tokenizer and model of recipe ``size`` and pretrain it; writes the model folder
    with ``lab_recipe.json`` and ``loss_curve.json`` to ``out`` (locked while it runs; an existing
    folder is replaced only with ``force``)."""
    from ..output_checks import writing_folder

    with writing_folder(out, force):
        return _pretrain(out, size, steps, show_progress)


def _pretrain(out: str, size: str, steps: int | None, show_progress: bool) -> dict:
    from ..errors import InputError
    from ..models import save_model

    recipe = _recipe(size, steps)
    t0 = time.time()
    docs = corpus(recipe["docs"], recipe["seed"])
    tokenizer = train_tokenizer(docs, recipe["vocab"])
    model = build_model(recipe, tokenizer)
    ids = [t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    stream = torch.tensor(ids, dtype=torch.long)
    windows = (stream.numel() - 1) // recipe["seq"]
    if windows < recipe["batch"]:
        raise InputError("the corpus is too small for one batch", "--size", "use a larger recipe")
    curve = _pretrain_steps(model, stream, windows, recipe, show_progress)
    params = sum(p.numel() for p in model.parameters())
    info = {
        "recipe": recipe,
        "params": params,
        "tokens": stream.numel(),
        "wall_s": round(time.time() - t0, 1),
    }
    save_model(
        model,
        tokenizer,
        out,
        extra={"lab_recipe": recipe},
        json_files={"lab_recipe.json": info, "loss_curve.json": curve},
    )
    return {**info, "final_loss": curve[-1]["loss"], "first_loss": curve[0]["loss"]}


def _recipe(size: str, steps: int | None) -> dict:
    """Recipe ``size``, with ``steps`` in place of its own where given."""
    from ..errors import InputError

    if size not in RECIPES:
        raise InputError(f"unknown recipe '{size}'", "--size", f"choose {', '.join(RECIPES)}")
    recipe = dict(RECIPES[size], size=size)
    if steps is not None:
        if steps < 1:
            raise InputError(
                f"--steps {steps} must be at least 1", "--steps", "give a positive count"
            )
        recipe["steps"] = steps
    return recipe


def _pretrain_steps(
    model, stream: torch.Tensor, windows: int, recipe: dict, show_progress: bool
) -> list[dict]:
    """AdamW on random windows of the token stream, with a linear warmup and a cosine decay to
    a tenth of the rate; returns the loss of every step."""
    from tqdm.auto import tqdm

    seq, batch = recipe["seq"], recipe["batch"]
    g = torch.Generator().manual_seed(recipe["seed"])
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe["lr"], weight_decay=0.1, betas=(0.9, 0.95)
    )
    warmup = max(1, recipe["steps"] // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (
            1 + math.cos(math.pi * (step - warmup) / max(1, recipe["steps"] - warmup))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve = []
    model.train()
    bar = tqdm(range(recipe["steps"]), desc="pretrain", unit="step", disable=not show_progress)
    for step in bar:
        starts = torch.randint(0, windows, (batch,), generator=g) * seq
        x = torch.stack([stream[s : s + seq + 1] for s in starts])
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append({"step": step, "loss": loss.item()})
        bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
    model.eval()
    return curve
