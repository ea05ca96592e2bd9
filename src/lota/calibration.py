"""The memory-light calibrations of ``lota adapt``: ``--calibration fisher`` and ``lora``.

``fisher`` adds each calibration batch's squared gradient into one score buffer per target (a
diagonal Fisher score) and changes no weight. ``lora`` trains a PEFT LoRA adapter on the targets
for the calibration steps, scores every target entry by the adapter's merged change
``scale * B @ A`` or by the full weights' squared gradient at the end of the warm-up, then removes
the adapter. Both select the exact global top-k of their scores with ``lota.selection.select``,
disjoint from the protected entries, and run as phases of the run, so a killed run resumes to the
same ticket: a score buffer is the phase's optimizer state in its checkpoints.

Invariant: the targets end at their starting weights, bit for bit, and frozen. (The calibrations
that train the targets, ``adamw`` and ``sgd``, are ``lota.adapt.dense_calibration``.)
"""

from __future__ import annotations

import dataclasses

import torch

from . import selection
from .errors import InputError
from .fileio import fault
from .models import named_weights
from .ticket import Ticket
from .train import heap_growth_limited


class SquaredGradients(torch.optim.Optimizer):
    """An optimizer that changes no parameter: each step adds every parameter's squared gradient
    into its score buffer of ``dtype``, so the training loop's batches, gradient averaging and
    checkpoints carry the score, and ``zero_grad`` frees the gradients after each step.

    ``in_backward``: add each parameter's square as soon as the backward pass has its gradient,
    and free that gradient there, so no more than one dense gradient is alive at a time (the same
    sums, bit for bit, where a step's gradient is one backward pass's: one process, one
    micro-batch, no loss scaling). ``close`` removes the hooks."""

    def __init__(
        self, params: list[torch.nn.Parameter], dtype: torch.dtype, in_backward: bool = False
    ):
        super().__init__(params, {})
        self.dtype = dtype
        self.hooks = []
        if in_backward:
            for group in self.param_groups:
                for p in group["params"]:
                    self.hooks.append(p.register_post_accumulate_grad_hook(self._take))

    @torch.no_grad()
    def _take(self, p: torch.nn.Parameter) -> None:
        self._add(p)
        p.grad = None

    def _add(self, p: torch.nn.Parameter) -> None:
        state = self.state[p]
        if "score" not in state:
            state["score"] = torch.zeros(p.shape, dtype=self.dtype, device=p.device)
        state["score"].addcmul_(p.grad, p.grad)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._add(p)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def load_state_dict(self, state_dict: dict) -> None:
        """The saved buffers as they were (``Optimizer``'s own would cast them to the weights'
        precision)."""
        params = [p for group in self.param_groups for p in group["params"]]
        for i, entry in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {"score": entry["score"].to(device=p.device, dtype=self.dtype)}

    def scores(self) -> list[torch.Tensor]:
        """One buffer per parameter, in order (zeros where no gradient ever came)."""
        params = [p for group in self.param_groups for p in group["params"]]
        return [
            self.state[p]["score"]
            if "score" in self.state[p]
            else torch.zeros(p.shape, dtype=self.dtype, device=p.device)
            for p in params
        ]


def _select(run, score, k: int, protected: Ticket | None, selector: str) -> Ticket:
    with torch.no_grad():
        return selection.select(
            selector,
            run.targets,
            k,
            delta_fn=lambda n: score(n).float(),
            exclude=protected,
            seed=run.cfg.seed,
        )


def _squared_gradients(run, name: str, params: dict, steps: int, model=None, held=None):
    """``{name: sum of squared gradients}`` of ``params`` over ``steps`` batches (unclipped), as
    one phase of the run; nothing is updated."""
    cfg = run.cfg
    dtype = getattr(torch, cfg.fisher_dtype) if name == "calibration" else torch.float32
    # one backward pass per step and no loss scale: square each gradient as it comes, free it
    in_backward = (
        run.world.size == 1
        and cfg.grad_accum == 1
        and cfg.mixed_precision != "fp16"
        and run.stored_dtype != torch.float16
    )
    acc = SquaredGradients(list(params.values()), dtype, in_backward=in_backward)
    settings = dataclasses.replace(cfg.settings(0.0, steps), max_grad_norm=None)
    try:
        run.phase(
            name,
            params,
            0.0,
            steps,
            model=model,
            settings=settings,
            optimizer=acc,
            held=held,
            selects=True,  # the scores' checkpoint is the ticket
        )
    finally:
        acc.close()
    return dict(zip(params, acc.scores()))


def fisher(run, k: int, protected: Ticket | None, selector: str) -> Ticket:
    """The ticket of the largest summed squared gradients over the calibration batches."""
    from .adapt import _train_only

    _train_only(run.model, run.targets)
    weights = named_weights(run.model)
    params = {n: weights[n] for n in run.targets}
    # one gradient alive at a time, each handed back to the system when freed (as in the sparse
    # phase), so the process holds the weights, the score buffers and activations
    with heap_growth_limited(run.world.device):
        # no weight changes, so the checkpoints hold the score buffers alone
        scores = _squared_gradients(run, "calibration", params, run.cfg.calibration_steps, held={})
        ticket = _select(run, scores.__getitem__, k, protected, selector)
    fault("extraction")
    del scores
    for p in params.values():
        p.requires_grad_(False)
    return ticket


def lora_modules(targets: dict, option: str = "--method") -> list[str]:
    """The modules of the targets, refusing targets that are not weights of linear layers (one
    matrix per module)."""
    modules = sorted({n.rsplit(".", 1)[0] for n in targets if n.endswith(".weight")})
    if len(modules) != len(targets) or any(len(s) != 2 for s in targets.values()):
        raise InputError(
            "LoRA needs targets that are weights of linear layers",
            "--targets",
            f"match '.weight' parameters of linear layers, or use another {option}",
        )
    return modules


def lora_model(run, option: str = "--method"):
    """The run's model with a fresh PEFT LoRA adapter (``--lora-r``, ``--lora-alpha``) on the
    targets' layers; only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    cfg = run.cfg
    modules = lora_modules(run.targets, option)
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=modules,
        lora_dropout=0.0,
        bias="none",
        # GPT-2's Conv1D stores its weight transposed (PEFT would set this itself, warning)
        fan_in_fan_out=any(isinstance(run.model.get_submodule(m), Conv1D) for m in modules),
    )
    return get_peft_model(run.model, lcfg)


def lora(run, k: int, protected: Ticket | None, selector: str) -> Ticket:
    """A LoRA warm-up, the ticket from its change or from the full weights' squared gradients
    (``--lora-calibration-score``), and the model without the adapter."""
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
        scores = _squared_gradients(run, "score", base, 1, model=peft_model, held=adapter)
        score = scores.__getitem__
    else:
        layers = {n: run.model.get_submodule(n.rsplit(".", 1)[0]) for n in run.targets}

        def score(n):  # scale * B @ A, laid out like the weight
            return layers[n].get_delta_weight("default").detach()

    ticket = _select(run, score, k, protected, selector)
    fault("extraction")
    run.model = peft_model.unload()  # the LoRA layers out, the base layers back in their place
    for p in run.model.parameters():
        p.requires_grad_(False)
    return ticket
