"""LoTA inside a TRL ``SFTTrainer`` run: only ``lota.prepare`` and ``lota.extract_delta`` are added
to an ordinary supervised fine-tuning script.

    python examples/trl_sft.py --model BASE --data train.jsonl --ticket ticket.safetensors \
        --out runs/sft [--steps 100] [--grad-accum 4] [--lr 1e-4] [--save-steps 50] [--resume]

The data is what ``lota adapt`` reads, in any of its formats (JSONL, JSON, CSV, Parquet, a
``datasets`` folder): ``{"prompt": str, "completion": str}`` rows, or ``{"messages": [...]}``
conversations whose last message is the assistant's answer. Both become TRL prompt/completion
rows (a conversation's earlier messages are the prompt, its last message the completion), so the
loss is on the completion only (``completion_only_loss=True``); a conversation goes through the
tokenizer's chat template, which it must therefore have. ``{"text": str}`` rows stay TRL text
rows, with the loss on every token. One file holds one of the formats, not several.

The ticket comes from ``lota mask BASE TUNED`` or ``lota adapt``. Gradient accumulation, the
learning-rate schedule, checkpointing and ``--resume`` are the Trainer's own; metrics go wherever
``--report-to`` says (``tensorboard``, ``wandb``, ...). The example trains in float32 on the CPU
(``use_cpu=True``, ``bf16=False``); drop ``use_cpu`` to train on a GPU. The sparse task vector is
written to ``OUT/delta.safetensors``.
"""

from __future__ import annotations

import argparse
import os

import lota
from lota.data import read_data
from lota.errors import InputError
from lota.models import load_model, load_tokenizer
from lota.weights import model_fingerprint


def sft_rows(path: str) -> list[dict]:
    """The data (any format ``lota adapt`` reads) as TRL rows: prompt/completion (plain strings,
    or chat messages), or plain text."""
    rows = []
    for ex in read_data(path):
        if ex.text is not None:
            rows.append({"text": ex.text})
        elif ex.messages is not None:
            rows.append({"prompt": ex.messages[:-1], "completion": ex.messages[-1:]})
        else:
            rows.append({"prompt": ex.prompt, "completion": ex.completion})
    if len({"text" in r for r in rows}) > 1:
        raise InputError(
            "the file mixes text rows with prompt/completion rows or conversations",
            path,
            "keep one format per file",
        )
    kinds = {isinstance(r.get("prompt"), list) for r in rows}
    if len(kinds) > 1:
        raise InputError(
            "the file mixes prompt/completion lines and conversations",
            path,
            "keep one format per file",
        )
    return rows


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--ticket", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scheduler", default="cosine")
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--report-to", default="none")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(a.model)
    model = load_model(a.model)
    base_fp = model_fingerprint(model)  # before prepare: the fingerprint of the base weights
    ticket = lota.load(a.ticket)
    if isinstance(ticket, lota.SparseDelta):  # a delta file works as a ticket too
        ticket = ticket.ticket
    lota.prepare(model, ticket)  # the one line that makes this LoTA

    data = Dataset.from_list(sft_rows(a.data))
    args = SFTConfig(
        output_dir=a.out,
        max_steps=a.steps,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.lr,
        lr_scheduler_type=a.scheduler,
        save_strategy="steps",
        save_steps=a.save_steps,
        logging_steps=1,
        report_to=[] if a.report_to == "none" else [a.report_to],
        seed=a.seed,
        data_seed=a.seed,
        max_length=a.max_length,
        packing=False,
        completion_only_loss=True,
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=True if a.resume else None)

    delta = lota.extract_delta(model)
    delta.ticket.base_fingerprint = base_fp
    path = f"{a.out}/delta.safetensors"
    if trainer.is_world_process_zero():  # under torchrun / accelerate launch: written once
        lota.save(delta, path, config={"example": "trl_sft", "steps": a.steps, "lr": a.lr})
    return path


if __name__ == "__main__":
    path = main()
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)
