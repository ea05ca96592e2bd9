"""Switching task vectors on one loaded base: lota's ``DeltaBank`` against PEFT LoRA.

On the lab base (2.2M parameters) and a Llama config of about 200M parameters (fp32), with two
task vectors A and B on each:
- ``lota``: ``DeltaBank.switch`` between two disjoint random deltas at densities 0.001-0.1 of the
  default targets (a switch takes one out and puts the other in, O(k));
- ``lora set_adapter``: two loaded PEFT LoRA adapters (rank ``--lora-r`` on the same targets),
  switched by name, left unmerged;
- ``lora hotswap``: ``peft.utils.hotswap.hotswap_adapter_from_state_dict``, replacing the loaded
  adapter's weights in place with the other's (from memory, no file read);
- ``lora merge/unmerge``: unmerge the current adapter, merge the other (no cost per token after).
Per method: the median time per switch over ``--switches`` switches (with min-max), the bytes the
method holds for it, and the growth of the peak resident set during one switch. Exactness: the
largest absolute difference to the base weights after ``--cycles`` switches and a final switch
back to the base (lota, and LoRA merge/unmerge) in fp32 and bf16. Cost per generated token:
greedy generation of ``--new-tokens`` tokens (batch 1) with the base, with a lota delta active,
with an unmerged and with a merged LoRA adapter, interleaved over ``--repeats`` rounds, median
with min-max and ratios to the base. Prints tables to stderr and one JSON line last on stdout.

    python bench/hotswap.py [--models lab,200m] [--parts switches,exactness,tokens]
        [--switches 40] [--rounds 4] [--cycles 1000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time

import torch

DENSITIES = (0.001, 0.01, 0.1)


def build(name: str, dtype=torch.float32):
    from lota.lab.base import default_base
    from lota.models import load_model
    from lota.toy import tiny_llama

    if name == "lab":
        model = load_model(default_base())
    else:
        model = tiny_llama(
            vocab_size=8192, hidden=1024, layers=14, heads=16, intermediate=2816, max_positions=256
        )
    return model.to(dtype).eval()


def lota_pair(model, density: float, seed: int = 0):
    """Two random deltas on disjoint tickets of ``density`` each, for ``model``'s base."""
    import lota
    from lota.delta import SparseDelta
    from lota.targets import resolve_targets
    from lota.weights import model_fingerprint

    targets = resolve_targets(model)
    numel = sum(torch.Size(s).numel() for s in targets.values())
    k = int(density * numel)
    union = lota.select("random", targets, 2 * k, seed=seed)
    fp = model_fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(2):
        idx = {n: i[j::2] for n, i in union.indices.items()}
        t = lota.Ticket(shapes=dict(union.shapes), indices=idx, base_fingerprint=fp)
        vals = {n: 1e-2 * torch.randn(i.numel(), generator=g) for n, i in idx.items()}
        out.append(SparseDelta(t, vals))
    return out, numel


def lora_model(model, r: int, adapters=("ta", "tb")):
    """A PeftModel on a copy of ``model`` with random (non-zero) LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    from lota.targets import resolve_targets

    modules = sorted({n.rsplit(".", 2)[-2] for n in resolve_targets(model)})
    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules, init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(model), cfg, adapter_name=adapters[0])
    for a in adapters[1:]:
        pm.add_adapter(a, cfg)
    with torch.no_grad():  # LoRA weights of the size a trained adapter has
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.02)
    return pm.eval(), cfg


def rss_mb() -> float:
    from lota.train import current_rss_mb

    return current_rss_mb() or 0.0


def peak_growth_mb(fn) -> float:
    """Growth of the peak resident set while ``fn`` runs once (Linux high-water mark)."""
    from lota.train import current_peak_rss_mb, reset_peak_rss

    gc.collect()
    reset_peak_rss()
    before = rss_mb()
    fn()
    return max(0.0, current_peak_rss_mb() - before)


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def stat(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def max_abs_diff(model, base: dict) -> float:
    now = {n: p.detach() for n, p in model.named_parameters()}
    return max(float((now[n].float() - base[n].float()).abs().max()) for n in base)


# ---------------------------------------------------------------------------- switching
def bench_switches(name: str, args) -> dict:
    """Every method's switches timed in rounds, interleaved (the order rotating each round)."""
    model = build(name)
    methods, numel = [], 0
    for density in DENSITIES:
        for verify in (True, False):
            m, numel = lota_switcher(model, density, verify)
            methods.append(m)
    methods += lora_switchers(model, args.lora_r)
    times: list[list[float]] = [[] for _ in methods]
    rounds = max(1, args.rounds)
    for r in range(rounds):
        order = list(range(len(methods)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            start, switch, stop, _ = methods[i]
            start()
            switch()  # warm
            times[i] += timed(switch, max(1, args.switches // rounds))
            stop()
    rows = []
    for (start, switch, stop, row), t in zip(methods, times):
        start()
        row["switch_s"] = stat(t)
        row["peak_growth_mb"] = peak_growth_mb(switch)
        stop()
        rows.append(row)
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": name, "params": n_params, "targets": numel, "rows": rows}


def lota_switcher(model, density: float, verify: bool):
    """(start, switch, stop, row) for DeltaBank switches between two deltas of ``density``."""
    from lota.hotswap import DeltaBank

    (a, b), numel = lota_pair(model, density)
    bank = DeltaBank(model, verify=verify).add("A", a).add("B", b)
    flip = iter(range(10**9))
    bank.activate("B")
    row = {
        "method": "lota" if verify else "lota verify=False",
        "density": density,
        "k": a.nnz,
        "held_bytes": bank.memory_bytes(),
    }
    bank.deactivate()

    def start():
        bank.switch("B")

    def switch():
        bank.switch("A" if next(flip) % 2 == 0 else "B")

    return (start, switch, bank.deactivate, row), numel


def lora_switchers(model, r: int) -> list:
    """(start, switch, stop, row) for PEFT's three ways of switching two LoRA adapters."""
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    pm, cfg = lora_model(model, r)
    # hot-swap writes another adapter's weights into the loaded adapter "ta" in place: the
    # state dicts of both tasks, keyed by the parameter names of "ta"
    params = dict(pm.named_parameters())
    slot = [n for n in params if "lora_" in n and ".ta." in n]
    swap = {
        a: {n: params[n.replace(".ta.", f".{a}.")].detach().clone() for n in slot}
        for a in ("ta", "tb")
    }
    size = sum(t.numel() for t in swap["ta"].values())
    state = {"cur": "ta"}

    def other() -> str:
        state["cur"] = "tb" if state["cur"] == "ta" else "ta"
        return state["cur"]

    def set_adapter():
        pm.base_model.set_adapter(other())

    def hotswap():
        hotswap_adapter_from_state_dict(pm, swap[other()], adapter_name="ta", config=cfg)

    def merge_switch():
        pm.base_model.unmerge_adapter()
        pm.base_model.set_adapter(other())
        pm.base_model.merge_adapter()

    def start(merged=False):
        def run():
            state["cur"] = "ta"
            pm.base_model.set_adapter("ta")
            if merged:
                pm.base_model.merge_adapter()

        return run

    def stop(merged=False):
        def run():
            if merged:
                pm.base_model.unmerge_adapter()
            hotswap_adapter_from_state_dict(pm, swap["ta"], adapter_name="ta", config=cfg)

        return run

    def row(label, copies):  # adapters resident (fp32); hot-swap also keeps state dicts
        return {
            "method": label,
            "lora_r": r,
            "k": size,
            "held_bytes": {"adapters": copies * 4 * size},
        }

    return [
        (start(), set_adapter, stop(), row("lora set_adapter", 2)),
        (start(), hotswap, stop(), row("lora hotswap", 4)),
        (start(True), merge_switch, stop(True), row("lora merge/unmerge", 2)),
    ]


# ---------------------------------------------------------------------------- exactness
def bench_drift(name: str, dtype, cycles: int, lora_cycles: int, args) -> dict:
    from lota.hotswap import DeltaBank

    model = build(name, dtype)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    (a, b), _ = lota_pair(model, 0.01)
    bank = DeltaBank(model).add("A", a).add("B", b)
    for i in range(cycles):
        bank.switch("A" if i % 2 == 0 else "B")
    bank.deactivate()
    lota_diff = max_abs_diff(model, base)
    del bank
    pm, _ = lora_model(model, args.lora_r, adapters=("ta",))
    inner = pm.base_model.model
    lbase = {n: p.detach().clone() for n, p in inner.named_parameters() if "lora_" not in n}
    for _ in range(lora_cycles):
        pm.base_model.merge_adapter()
        pm.base_model.unmerge_adapter()
    now = {n: p for n, p in inner.named_parameters() if "lora_" not in n}
    diffs = [(now[n].detach().float() - lbase[n].float()).abs() for n in lbase]
    lora_diff = max(float(d.max()) for d in diffs)
    changed = sum(int((d > 0).sum()) for d in diffs)
    return {
        "model": name,
        "dtype": str(dtype).replace("torch.", ""),
        "cycles": cycles,
        "lora_cycles": lora_cycles,
        "lota_max_abs_diff": lota_diff,
        "lora_merge_unmerge_max_abs_diff": lora_diff,
        "lora_changed_entries": changed,
    }


# ---------------------------------------------------------------------------- per token
def bench_tokens(name: str, args) -> dict:
    from lota.hotswap import DeltaBank

    model = build(name)
    (a, _), _ = lota_pair(model, 0.01)
    bank = DeltaBank(model).add("A", a)
    pm, _ = lora_model(model, args.lora_r, adapters=("ta",))
    merged, _ = lora_model(model, args.lora_r, adapters=("ta",))
    merged.base_model.merge_adapter()
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (1, 16))
    n = args.new_tokens

    def gen(m):
        def run():
            m.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

        return run

    variants = {
        "base": gen(model),
        "lota active": None,
        "lora unmerged": gen(pm),
        "lora merged": gen(merged),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    with torch.inference_mode():
        gen(model)()  # warm
        order = list(variants)
        for r in range(args.repeats):
            for v in order[r % 4 :] + order[: r % 4]:  # interleaved, the order rotating
                fn = variants[v]
                if v == "lota active":
                    with bank.using("A"):
                        times[v] += [x / n for x in timed(gen(model), 1)]
                else:
                    times[v] += [x / n for x in timed(fn, 1)]
    base_med = statistics.median(times["base"])
    return {
        "model": name,
        "new_tokens": n,
        "per_token_s": {v: stat(t) for v, t in times.items()},
        "ratio_to_base": {v: statistics.median(t) / base_med for v, t in times.items()},
    }


# ---------------------------------------------------------------------------- report
def report(switches, drift, tokens) -> None:
    err = sys.stderr
    for s in switches:
        print(
            f"\n{s['model']}: {s['params']:,} parameters, {s['targets']:,} target entries",
            file=err,
        )
        print(
            f"{'method':<19} {'density':>8} {'entries':>11} {'ms/switch':>10} {'range':>17} "
            f"{'held MiB':>9} {'peak +MiB':>9}",
            file=err,
        )
        for r in s["rows"]:
            st = r["switch_s"]
            held = sum(r["held_bytes"].values()) / 2**20
            dens = f"{r['density']:g}" if "density" in r else f"r={r['lora_r']}"
            print(
                f"{r['method']:<19} {dens:>8} {r['k']:>11,} {1e3 * st['median']:>10.3f} "
                f"{1e3 * st['min']:>8.3f}-{1e3 * st['max']:<8.3f} {held:>9.2f} "
                f"{r['peak_growth_mb']:>9.1f}",
                file=err,
            )
    print("\nmax |w - w0| after the switches and a switch back to the base:", file=err)
    for d in drift:
        print(
            f"  {d['model']:<5} {d['dtype']:<9} lota after {d['cycles']} switches "
            f"{d['lota_max_abs_diff']:.3g}; LoRA after {d['lora_cycles']} merge/unmerge "
            f"{d['lora_merge_unmerge_max_abs_diff']:.3g} ({d['lora_changed_entries']:,} "
            "entries changed)",
            file=err,
        )
    for t in tokens:
        print(f"\n{t['model']}: time per generated token ({t['new_tokens']} tokens)", file=err)
        for v, st in t["per_token_s"].items():
            print(
                f"  {v:<14} {1e3 * st['median']:8.3f} ms ({1e3 * st['min']:.3f}-"
                f"{1e3 * st['max']:.3f})  x{t['ratio_to_base'][v]:.3f} of base",
                file=err,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lab,200m")
    ap.add_argument("--switches", type=int, default=40, help="switches timed per method")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the switches")
    ap.add_argument("--cycles", type=int, default=1000, help="switches for the exactness check")
    ap.add_argument(
        "--lora-cycles", type=int, default=None, help="LoRA merge/unmerge cycles (default --cycles)"
    )
    ap.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the exactness check")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--parts", default="switches,exactness,tokens", help="what to measure")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from lota.model_folder import quiet_transformers

    quiet_transformers()
    t0 = time.time()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    switches, drift, tokens = [], [], []
    parts = set(args.parts.split(","))
    for m in models:
        if "switches" in parts:
            print(f"[{m}] switching ...", file=sys.stderr, flush=True)
            switches.append(bench_switches(m, args))
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        for dtype in dtypes if "exactness" in parts else ():
            print(f"[{m}] exactness, {dtype} ...", file=sys.stderr, flush=True)
            lora_cycles = args.cycles if args.lora_cycles is None else args.lora_cycles
            drift.append(bench_drift(m, dtype, args.cycles, lora_cycles, args))
        if "tokens" in parts:
            print(f"[{m}] cost per token ...", file=sys.stderr, flush=True)
            tokens.append(bench_tokens(m, args))
    report(switches, drift, tokens)
    out = {
        "bench": "hotswap",
        "torch": torch.__version__,
        "wall_s": time.time() - t0,
        "switches": switches,
        "exactness": drift,
        "per_token": tokens,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
