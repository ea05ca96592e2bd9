"""The official LoTA training step, reimplemented as a child of the memory benchmark: dense
parameters whose dense gradients are masked to the ticket by a hook, per-tensor clipping and a
dense RMSprop state. Prints the rows of its steps (time, peak resident set since the model was
loaded) as one JSON line.

    python -m bench.memory.official MODEL DATA TICKET STEPS
"""

from __future__ import annotations

import json
import sys
import time

import torch

from lota import load
from lota.data import batches, read_jsonl, tokenize
from lota.models import load_model, load_tokenizer
from lota.targets import named_weights, resolve_targets
from lota.train import current_peak_rss_mb, reset_peak_rss


def main(model_dir: str, data: str, ticket_path: str, steps: int) -> list[dict]:
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    weights, targets = named_weights(model), resolve_targets(model)
    for p in model.parameters():
        p.requires_grad_(False)
    masks = load(ticket_path).dense_masks()  # True = trainable (official: True = frozen)
    params = [weights[n].requires_grad_(True) for n in targets]
    for n in targets:  # the official code zeroes frozen gradients with a hook
        weights[n].register_hook(lambda g, m=masks[n]: g * m)
    opt = torch.optim.RMSprop(params, lr=1e-5, momentum=0.0, weight_decay=0.0)
    stream = batches(tokenize(read_jsonl(data), tok, 64), 1, 0, tok.pad_token_id)
    reset_peak_rss()
    rows = []
    for _ in range(steps):
        t = time.perf_counter()
        model(**next(stream)).loss.backward()
        for p in params:  # per-tensor clipping as in the official recipe
            torch.nn.utils.clip_grad_norm_([p], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append({"step_s": time.perf_counter() - t, "phase_peak_rss_mb": current_peak_rss_mb()})
    return rows


if __name__ == "__main__":
    model_dir, data, ticket, steps = sys.argv[1:5]
    print(json.dumps(main(model_dir, data, ticket, int(steps))))
