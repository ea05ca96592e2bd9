"""The throughput benchmark's report: the table, report.md, the loss curves' plot, versions."""

from __future__ import annotations

import platform
from pathlib import Path

from .runs import PAIRS
from .summary import SHAPE_MATCH_R, TARGET_FFT_RATIO, mean_curve


def plot(runs: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (pair, (a, b)) in zip(axes, PAIRS.items()):
        for m, style in ((a, "-"), (b, "--")):
            curve = mean_curve(runs[m])
            ax.plot(range(1, len(curve) + 1), curve, style, marker=".", label=m)
        ax.set_title(f"{pair}: {a} vs {b} (mean of {args.repeats} repeats)")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (completion tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary: dict) -> str:
    """The markdown table of report.md (also printed to stderr)."""
    lines = [
        "| pair | median step ratio (lota / TRL) | min-max | IQR | cycle ratio | "
        "tokens/s lota | tokens/s TRL | real / completion tokens per step | loss r | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair, (a, b) in PAIRS.items():
        s = summary[pair]
        r, tps, tok, loss = s["step_ratio"], s["tokens_per_s"], s["tokens_per_step"], s["loss"]
        lines.append(
            f"| {a} / {b} | {r['median']:.3f} | {r['min']:.3f}-{r['max']:.3f} "
            f"| {r['iqr'][0]:.3f}-{r['iqr'][1]:.3f} | {s['cycle_ratio']['median']:.3f} "
            f"| {tps[a]['median']:.0f} | {tps[b]['median']:.0f} "
            f"| {tok[a]['real']:.0f}/{tok[a]['completion']:.0f} vs "
            f"{tok[b]['real']:.0f}/{tok[b]['completion']:.0f} "
            f"| {loss['pearson_r']:.4f} | {loss['max_abs_diff']:.4f} |"
        )
    return "\n".join(lines)


def write_report(out: Path, result: dict) -> None:
    s, st = result["summary"], result["settings"]
    fft = s["fft"]
    text = [
        "# Training throughput: lota adapt against TRL SFTTrainer (CPU)",
        "",
        f"Measured {result['date']} on {result['machine']['cpus']} CPUs, "
        f"{result['trl_threads']} torch thread(s) per run; torch "
        f"{result['versions']['torch']}, transformers {result['versions']['transformers']}, "
        f"peft {result['versions']['peft']}, trl {result['versions']['trl']}.",
        f"Model: random Llama, {result['model']['params']:,} parameters "
        f"({result['model']['target_params']:,} in the default targets), fp32. Data: "
        f"{result['model']['source']}, {result['model']['examples']} examples, max length "
        f"{st['max_length']}, batch {st['batch_size']}, {st['steps']} steps "
        f"(first {st['warmup']} not timed), {st['repeats']} repeats, pairs interleaved by "
        f"{st['interleave']}, lr {st['lr']}.",
        "",
        table(s),
        "",
        f"Target: FFT step ratio at most {TARGET_FFT_RATIO} "
        f"({'met' if result['met']['fft_step_ratio'] else 'not met'}: "
        f"{fft['step_ratio']['median']:.3f}); loss curves of the FFT pair match in shape "
        f"(Pearson r at least {SHAPE_MATCH_R}: "
        f"{'met' if result['met']['fft_loss_shape'] else 'not met'}). Token counts agree on every "
        f"step: fft {fft['token_counts_agree_every_step']}, sparse "
        f"{s['sparse']['token_counts_agree_every_step']}; TRL trained on lota's batches: "
        + ", ".join(
            f"{m} {c['batches_identical_to_lota']}"
            for m, c in result["checks"].items()
            if "batches_identical_to_lota" in c
        )
        + ".",
        "",
        "Step: lota's `step_s`, TRL's on_step_begin..on_step_end. Cycle: end of one step to the "
        "end of the next (data loading and logging included). The sparse pair compares "
        "different methods (lota's sparse phase against LoRA); its loss r is informational.",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(text))


def versions() -> dict:
    import peft
    import torch
    import transformers
    import trl

    import lota

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "lota": getattr(lota, "__version__", "?"),
    }
