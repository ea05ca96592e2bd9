"""The host costs benchmark's ``syncs`` part: the calls that make the host wait for a GPU,
counted per sparse-phase step (see ``bench.host_costs``). The counter wraps torch's own methods
for the part's duration; lota's code is not touched."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from bench.common.inputs import save_llama, sums_data


# ------------------------------------------------------------------------------- host syncs
class SyncCounter:
    """Counts the calls that make the host wait for a GPU (see the module docstring)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.on = False

    def hit(self, name: str) -> None:
        if self.on:
            self.counts[name] = self.counts.get(name, 0) + 1

    @contextlib.contextmanager
    def installed(self):
        saved = []

        def wrap(owner, attr, name=None, when=None):
            orig = getattr(owner, attr)
            saved.append((owner, attr, orig))

            def f(*a, **k):
                if when is None or when(*a, **k):
                    caller = sys._getframe(1).f_globals.get("__name__", "?")
                    self.hit(f"{name or attr}@{'.'.join(caller.split('.')[:2])}")
                return orig(*a, **k)

            setattr(owner, attr, f)

        t = torch.Tensor
        for attr in ("item", "tolist", "nonzero", "cpu"):
            wrap(t, attr)
        for attr in ("__bool__", "__int__", "__float__"):
            wrap(t, attr, attr.strip("_"))
        wrap(torch, "nonzero")

        def no_size(*a, **k):  # repeats given as a tensor and no output_size: a sync
            repeats = a[1] if len(a) > 1 else k.get("repeats")
            return isinstance(repeats, torch.Tensor) and k.get("output_size") is None

        wrap(torch, "repeat_interleave", "repeat_interleave(no output_size)", no_size)
        wrap(t, "repeat_interleave", "repeat_interleave(no output_size)", no_size)
        wrap(torch.amp.GradScaler, "get_scale", "GradScaler.get_scale")
        try:
            yield self
        finally:
            for owner, attr, orig in reversed(saved):
                setattr(owner, attr, orig)


def syncs_part(args, work: Path) -> dict:
    from lota import selection, sparse_model
    from lota.data import batches, read_jsonl, tokenize
    from lota.dist import World
    from lota.models import load_model, load_tokenizer
    from lota.precision import Precision
    from lota.targets import resolve_targets
    from lota.train import MetricsLog, TrainSettings, train

    folder = work / "small"
    shape = dict(hidden=args.syncs_hidden, layers=2, intermediate=2 * args.syncs_hidden)
    save_llama(folder, heads=args.syncs_hidden // 64, **shape)
    data = tokenize(read_jsonl(sums_data(work / "data.jsonl")), load_tokenizer(str(folder)), 64)
    settings = {
        "plain": {"accum": 1, "fp16": False, "sharded": False},
        "grad_accum_4": {"accum": 4, "fp16": False, "sharded": False},
        "fp16_scaler_grad_accum_4": {"accum": 4, "fp16": True, "sharded": False},
        "sharded": {"accum": 1, "fp16": False, "sharded": True},
    }
    out = {"model": {"hidden": args.syncs_hidden, "layers": 2}, "steps": args.syncs_steps}
    for label, s in settings.items():
        model = load_model(str(folder))
        targets = resolve_targets(model)
        k = selection.ticket_size("0.9", selection.numel_of(targets))
        ticket = selection.select("random", targets, k, seed=0)
        sparse_model.prepare(model, ticket)
        if s["sharded"]:
            sparse_model.mark_sharded(model)
        params = sparse_model.trainable_parameters(model)
        prec = Precision("cpu", torch.float16, torch.amp.GradScaler("cpu")) if s["fp16"] else None
        counter = SyncCounter()
        steps = args.syncs_steps + 1

        def on_step(step, opt, counter=counter):
            counter.on = True  # from the second step on: the first one warms up

        stream = batches(data, 4 * s["accum"], 0, 0)
        with counter.installed():
            train(
                model,
                params,
                stream,
                TrainSettings(lr=1e-3, steps=steps),
                "train",
                MetricsLog(None),
                show_progress=False,
                on_step=on_step,
                world=World(),
                grad_accum=s["accum"],
                precision=prec,
            )
        per_step = {k: v / args.syncs_steps for k, v in sorted(counter.counts.items())}
        out[label] = {
            "targets": len(targets),
            "micro_batches": s["accum"],
            "per_step": per_step,
            "total_per_step": sum(per_step.values()),
            "lota_per_step": sum(v for k, v in per_step.items() if "@lota" in k),
        }
    return out
