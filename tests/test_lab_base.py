"""The lab's base model recipe, as a short smoke run of the tiny recipe."""

from __future__ import annotations

import json

from lota.cli import main
from lota.lab.base import corpus
from lota.lab.tasks import generate
from lota.models import load_model, load_tokenizer


def test_corpus_is_deterministic_and_free_of_task_formats():
    a, b = corpus(300, 0), corpus(300, 0)
    assert a == b and a != corpus(300, 1)
    text = "\n".join(a)
    for marker in ("####", "Question:", "SQL:", "Instruction:", "English:", "Invented:"):
        assert marker not in text
    prompts = {
        r["prompt"]
        for name in ("math", "sql", "translate")
        for r in generate(name, 0, 50, 0, 0)["train"]
    }
    assert not any(p in text for p in prompts)


def test_tiny_pretrain_writes_a_loadable_base_and_learns(tmp_path, capsys):
    out = tmp_path / "base"
    assert (
        main(["lab", "pretrain", "--size", "tiny", "--steps", "30", "--out", str(out), "--quiet"])
        == 0
    )
    assert "lab pretrain:" in capsys.readouterr().out
    curve = json.loads((out / "loss_curve.json").read_text())
    assert len(curve) == 30
    first = sum(r["loss"] for r in curve[:5]) / 5
    last = sum(r["loss"] for r in curve[-5:]) / 5
    assert last < first - 0.3
    info = json.loads((out / "lab_recipe.json").read_text())
    assert info["recipe"]["size"] == "tiny" and info["params"] > 0
    model, tok = load_model(str(out)), load_tokenizer(str(out))
    assert not model.config.tie_word_embeddings
    assert (
        model.get_input_embeddings().weight.data_ptr()
        != model.get_output_embeddings().weight.data_ptr()
    )
    text = "Ana has 12 apples."
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "User: hi\nAssistant:"
    code = main(["lab", "pretrain", "--size", "tiny", "--steps", "1", "--out", str(out), "--quiet"])
    assert code == 2  # an existing folder is not replaced without --force
