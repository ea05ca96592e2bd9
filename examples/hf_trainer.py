"""LoTA inside a plain Hugging Face ``Trainer`` run: only ``lota.prepare`` and ``lota.extract_delta``
are added to an ordinary fine-tuning script.

    python examples/hf_trainer.py --model BASE --data train.jsonl --ticket ticket.safetensors \
        --out runs/trainer [--steps 100] [--grad-accum 4] [--lr 1e-4] [--save-steps 50] [--resume]

The ticket comes from ``lota mask BASE TUNED`` (a ticket from any earlier fine-tune of this base,
no calibration run needed) or from ``lota adapt``. Gradient accumulation, the learning-rate
schedule, checkpointing and ``--resume`` are the Trainer's own; metrics go wherever
``--report-to`` says. The sparse task vector is written to ``OUT/delta.safetensors``.
"""

from __future__ import annotations

import argparse
import os

import lota
from lota.data import collate, read_data, tokenize
from lota.models import load_model, load_tokenizer
from lota.weights import model_fingerprint


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
    p.add_argument("--report-to", default="none")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from transformers import Trainer, TrainingArguments

    tokenizer = load_tokenizer(a.model)
    model = load_model(a.model)
    base_fp = model_fingerprint(model)
    ticket = lota.load(a.ticket)
    if isinstance(ticket, lota.SparseDelta):  # a delta file works as a ticket too
        ticket = ticket.ticket
    lota.prepare(model, ticket)  # the one line that makes this LoTA

    data = tokenize(read_data(a.data), tokenizer, 512, where=a.data)  # any format lota adapt reads
    args = TrainingArguments(
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
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
    )
    trainer.train(resume_from_checkpoint=True if a.resume else None)

    delta = lota.extract_delta(model)
    delta.ticket.base_fingerprint = base_fp
    path = f"{a.out}/delta.safetensors"
    if trainer.is_world_process_zero():  # under torchrun / accelerate launch: written once
        lota.save(delta, path, config={"example": "hf_trainer", "steps": a.steps, "lr": a.lr})
    return path


if __name__ == "__main__":
    path = main()
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)
