"""What the calibrations that change no base weight (``fisher``, ``lora``) score with: a buffer of
summed squared gradients filled as a phase of the run, and the exact top-k of a score.

Both run as phases of the run, so a killed run resumes to the same ticket: a score buffer is the
phase's optimizer state in its checkpoints.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import selection
from ..phases import Run
from ..ticket import Ticket
from .inbackward import InBackward, one_backward_per_step


class SquaredGradients(InBackward):
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
        self.dtype = dtype
        super().__init__(params, {}, in_backward=in_backward)

    def _use(self, p: torch.nn.Parameter, group: dict) -> None:
        state = self.state[p]
        if "score" not in state:
            state["score"] = torch.zeros(p.shape, dtype=self.dtype, device=p.device)
        state["score"].addcmul_(p.grad, p.grad)

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


def select_top(run: Run, score, k: int, protected: Ticket | None, selector: str) -> Ticket:
    """The ticket of ``k`` entries of the targets by ``score(name)`` and ``selector``, disjoint
    from ``protected``."""
    with torch.no_grad():
        return selection.select(
            selector,
            run.targets,
            k,
            delta_fn=lambda n: score(n).float(),
            exclude=protected,
            seed=run.cfg.seed,
        )


def squared_gradients(run: Run, name: str, params: dict, steps: int, model=None, held=None):
    """``{name: sum of squared gradients}`` of ``params`` over ``steps`` batches (unclipped), as
    one phase of the run; nothing is updated."""
    cfg = run.cfg
    dtype = getattr(torch, cfg.fisher_dtype) if name == "calibration" else torch.float32
    # one backward pass per step and no loss scale: square each gradient as it comes, free it
    acc = SquaredGradients(list(params.values()), dtype, in_backward=one_backward_per_step(run))
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
