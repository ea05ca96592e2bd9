"""The projection of the pipeline part's measurements onto Llama-3.1-8B's shapes on one GPU
(computed from a meta-device model: nothing is allocated or downloaded)."""

from __future__ import annotations

import math

# Llama-3.1-8B's shapes, for the projection (a meta-device model: nothing is downloaded)
LLAMA_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)


def lora_params(targets: dict, r: int = 16) -> int:
    return sum(r * (shape[0] + shape[1]) for shape in targets.values())


def counts(config) -> dict:
    """Parameters, default targets and LoRA r=16 parameters of a model config, from a meta-device
    model (nothing is allocated or downloaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lota.targets import resolve_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = resolve_targets(model)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "targets": sum(math.prod(s) for s in targets.values()),
        "lora_params": lora_params(targets),
    }


def project(summary: dict, shapes: dict, gpu_gib: float, act_gib: float) -> dict:
    """Projected peak on one GPU: the weights plus, per phase, the measured bytes per target
    parameter times the 8B target count (per LoRA parameter for LoRA's training phase).

    ``peak_gib`` and ``fits`` count the phases that train (calibration and the training phase);
    after training, lota builds the delta's indices and values in host memory on a GPU run, so
    that phase is reported on its own (``whole_run_gib``: as if it were on the device too).
    """
    out = {}
    for dtype, methods in summary.items():
        weights = shapes["params"] * (4 if dtype == "float32" else 2) / 2**30
        act = act_gib * (2 if dtype == "float32" else 1)  # the assumption is for bf16 activations
        for m, s in methods.items():
            phases = {}
            for g, ph in s["phases"].items():  # calibration, train, finish
                if m.partition(":")[0] == "lora" and g == "train":  # LoRA trains its adapter
                    extra = ph["bytes_per_lora_param"]["median"] * shapes["lora_params"]
                else:
                    extra = ph["bytes_per_target_param"]["median"] * shapes["targets"]
                phases[g] = weights + extra / 2**30
            peak = max(phases["calibration"], phases["train"])
            whole = max(phases.values())
            out[f"{m}/{dtype}"] = {
                "weights_gib": weights,
                "phases_gib": phases,
                "peak_gib": peak,
                "whole_run_gib": whole,
                "assumed_activations_gib": act,
                "margin_gib": gpu_gib - peak - act,
                "fits": peak + act <= gpu_gib,
                "fits_whole_run": whole + act <= gpu_gib,
            }
    return out
