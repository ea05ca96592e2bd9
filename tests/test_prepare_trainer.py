"""``lota.prepare`` inside Hugging Face's Trainer: only the ticket trains, the rest stays bit-identical."""

from __future__ import annotations

import pytest
import torch

import lota
from lota.data import collate, read_jsonl, tokenize
from lota.toy import byte_tokenizer, tiny_llama

pytest.importorskip("accelerate")


def test_trainer_trains_only_the_ticket(workdir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(hidden=32, layers=2, heads=2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = lota.resolve_targets(model)
    k = lota.ticket_size("0.9", sum(torch.Size(s).numel() for s in targets.values()))
    ticket = lota.select("random", targets, k, seed=3)
    lota.prepare(model, ticket)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == k

    tok = byte_tokenizer()
    data = tokenize(read_jsonl(workdir / "a.jsonl"), tok, 64)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=lambda batch: collate(batch, tok.pad_token_id),
    )
    trainer.train()

    delta = lota.extract_delta(model)
    assert delta.nnz == k and any(bool(v.abs().sum() > 0) for v in delta.values.values())
    lota.unprepare(model)
    for name, p in model.named_parameters():
        before = start[name]
        if name in ticket.indices:
            outside = torch.ones(before.numel(), dtype=torch.bool)
            outside[ticket.indices[name]] = False
            assert torch.equal(p.detach().reshape(-1)[outside], before.reshape(-1)[outside]), name
        else:
            assert torch.equal(p.detach(), before), name
