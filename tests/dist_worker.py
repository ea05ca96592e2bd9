"""Worker of the multi-process tests, started by ``torchrun`` (see ``test_distributed.py``).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py MODES OUT

Modes (comma-separated): ``select`` (sharded top-k over row slices of known scores) and
``prepare`` (a user's own training loop on an FSDP2-sharded prepared model). Each rank writes
``OUT/MODE/rank{r}.safetensors``.
With no launcher (one process) the same code computes the single-process reference.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import lota
from lota import dist, selection
from lota.toy import tiny_llama

SHAPES = {"a": (7, 5), "b": (1, 9), "c": (6, 3), "d": (4, 4)}
STEPS = 3


def scores(name: str) -> torch.Tensor:
    """Small integers: thousands of ties at every threshold."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randint(0, 4, SHAPES[name], generator=g).float()


def exclude() -> lota.Ticket:
    return lota.Ticket(
        shapes=SHAPES,
        indices={n: torch.arange(0, torch.Size(s).numel(), 3) for n, s in SHAPES.items()},
    )


def run_select(world: dist.World) -> dict[str, torch.Tensor]:
    local, offsets = {}, {}
    for n, shape in SHAPES.items():
        start, stop = dist.row_range(shape[0], world.rank, world.size)
        local[n] = scores(n)[start:stop]
        offsets[n] = start * torch.Size(shape[1:]).numel()
    shard = dist.Shard(world, {n: t.numel() for n, t in local.items()}, offsets)
    out = {}
    for k in (1, 17, 40):
        for budget in (1 << 24, 2):  # the second forces the three-pass finish
            for excl in (None, exclude()):
                got = selection.select_top_k(
                    sorted(SHAPES),
                    SHAPES,
                    local.__getitem__,
                    k,
                    exclude=excl,
                    candidate_budget=budget,
                    shard=shard if world.distributed else None,
                )
                tag = f"{k}/{budget}/{excl is not None}"
                out.update({f"{tag}/{n}": v for n, v in got.items()})
    return out


def run_prepare(world: dist.World) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = tiny_llama(hidden=32, layers=2, heads=2)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = lota.resolve_targets(model)
    ticket = lota.select("random", targets, 3000, seed=1)
    lota.prepare(model, ticket)
    if world.distributed:  # a user's own fully_shard calls: lota recognises the sharded weights
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world.size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(lota.trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    accum = 2 // world.size  # one micro-batch per rank, or both in one process
    gathers = [0]
    for step in range(STEPS):
        for a in range(accum):
            part = world.rank * accum + a
            g = torch.Generator().manual_seed(100 * step + part)
            ids = torch.randint(3, 259, (2, 12), generator=g)
            (model(input_ids=ids, labels=ids).loss / accum).backward()
        with _counting_gathers(gathers):  # lota rewrites the shards after each step
            opt.step()
        opt.zero_grad(set_to_none=True)
    out = {f"delta/{n}": v for n, v in lota.extract_delta(model).values.items()}
    if world.distributed:
        out["gathers_per_step"] = torch.tensor([gathers[0] / STEPS])
    out.update({f"ticket/{n}": v for n, v in ticket.indices.items()})
    # this rank's rows of every weight, for the frozen check
    for name, p in model.named_parameters():
        plain = name.replace(".parametrizations.", ".").replace(".original", "")
        if plain.endswith(".delta"):
            continue
        local, start = dist.local_rows(p.detach())
        out[f"rows/{plain}"] = local.clone()
        out[f"start/{plain}"] = torch.tensor([start])
        out[f"w0/{plain}"] = w0[plain][start : start + local.shape[0]].clone()
    return out


@contextlib.contextmanager
def _counting_gathers(box: list[int]):
    """Count the all-gathers (and DTensor gathers) made inside the block."""
    from torch.distributed.tensor import DTensor

    all_gather, full_tensor = torch.distributed.all_gather, DTensor.full_tensor

    def counted_all_gather(*a, **k):
        box[0] += 1
        return all_gather(*a, **k)

    def counted_full_tensor(self, *a, **k):
        box[0] += 1
        return full_tensor(self, *a, **k)

    torch.distributed.all_gather, DTensor.full_tensor = counted_all_gather, counted_full_tensor
    try:
        yield
    finally:
        torch.distributed.all_gather, DTensor.full_tensor = all_gather, full_tensor


def main() -> None:
    modes, out = sys.argv[1].split(","), Path(sys.argv[2])
    torch.set_num_threads(1)
    world = dist.world()
    for mode in modes:
        result = {"select": run_select, "prepare": run_prepare}[mode](world)
        (out / mode).mkdir(parents=True, exist_ok=True)
        path = out / mode / f"rank{world.rank}.safetensors"
        save_file({k: v.contiguous() for k, v in result.items()}, str(path))
    world.barrier()


if __name__ == "__main__":
    main()
