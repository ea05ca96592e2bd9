"""``--calibration lora``: a PEFT LoRA warm-up on the targets for the calibration steps, then the
exact top-k of the adapter's merged change ``scale * B @ A`` or of the full weights' squared
gradients at the warmed-up adapter (``--lora-calibration-score``); the adapter is then removed.

Invariant: no base weight changes; the targets end frozen.
"""

from __future__ import annotations

from .base import Calibration, one_of, register

SCORES = ("change", "gradient")  # --lora-calibration-score


def _select(run, k, protected, selector):
    """A LoRA warm-up, the ticket from its change or from the full weights' squared gradients
    (``--lora-calibration-score``), and the model without the adapter."""
    from ..fileio import fault
    from ..phases import lora_model
    from ..targets import named_weights
    from . import scoring

    cfg = run.cfg
    weights = named_weights(run.model)  # the base weights, kept as they are by the LoRA layers
    peft_model = lora_model(run, "--calibration")
    adapter = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    lr = cfg.calibration_rate
    if run.resumed_phase != "score":  # a run killed while scoring has its warm-up done
        run.phase("calibration", adapter, lr, cfg.calibration_steps, model=peft_model, selects=True)
    for p in adapter.values():
        p.requires_grad_(False)
    if cfg.lora_calibration_score == "gradient":
        base = {n: weights[n] for n in run.targets}
        for p in base.values():
            p.requires_grad_(True)
        # one more batch, at the warmed-up adapter (held by the phase's checkpoints)
        scores = scoring.squared_gradients(run, "score", base, 1, model=peft_model, held=adapter)
        score = scores.__getitem__
    else:
        layers = {n: run.model.get_submodule(n.rsplit(".", 1)[0]) for n in run.targets}

        def score(n):  # scale * B @ A, laid out like the weight
            return layers[n].get_delta_weight("default").detach()

    ticket = scoring.select_top(run, score, k, protected, selector)
    fault("extraction")
    run.model = peft_model.unload()  # the LoRA layers out, the base layers back in their place
    for p in run.model.parameters():
        p.requires_grad_(False)
    return ticket


def _check(targets: dict) -> None:
    from ..phases import lora_modules

    lora_modules(targets, "--calibration")


register(
    Calibration(
        "lora",
        "a PEFT LoRA warm-up, then the top-k of its merged change or of the full weights' "
        "squared gradients (--lora-calibration-score); the adapter is then removed",
        "about what LoRA training needs (gradient score: plus one gradient step of the targets)",
        ("lora_r", "lora_alpha", "lora_calibration_score"),
        _select,
        check=_check,
        fsdp_refusal="--calibration lora does not run under --fsdp; use --calibration adamw "
        "or drop --fsdp",
        recorded=("lora_calibration_score",),
        errors=lambda cfg: one_of(cfg, "lora_calibration_score", SCORES),
    )
)
