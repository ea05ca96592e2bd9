"""Optimizers that may act on each gradient inside the backward pass (``in_backward``): as soon as
autograd has accumulated a parameter's gradient they use it and free it, so no more than one
dense gradient is alive at a time. Without ``in_backward`` (several processes, gradient
accumulation, a loss scale) ``step`` does the same from the accumulated gradients, bit for bit.

``SquaredGradients`` (``fisher``, the LoRA gradient score) sums squares and changes no weight;
``NormalizedSteps`` (``rmsprop``, ``adafactor``) moves each weight by its gradient over a running
root mean square, with each tensor's gradient clipped on its own (the official LoTA code clips per
tensor), which needs no other tensor's gradient.
"""

from __future__ import annotations

import torch


def one_backward_per_step(run) -> bool:
    """Whether each optimizer step of ``run`` sees exactly one backward pass with no loss scale,
    so that a gradient can be used as soon as the backward pass has it."""
    return (
        run.world.size == 1
        and run.cfg.grad_accum == 1
        and run.cfg.mixed_precision != "fp16"
        and run.stored_dtype != torch.float16
    )


class InBackward(torch.optim.Optimizer):
    """The hooks and the step of an optimizer whose per-parameter work is ``_use(p)``, called with
    ``p.grad`` set; ``close`` removes the hooks."""

    def __init__(self, params, defaults: dict, in_backward: bool = False):
        super().__init__(params, defaults)
        self.hooks = []
        if in_backward:
            for group in self.param_groups:
                for p in group["params"]:
                    self.hooks.append(p.register_post_accumulate_grad_hook(self._take))

    @torch.no_grad()
    def _take(self, p: torch.nn.Parameter) -> None:
        self._use(p, self._group_of(p))
        p.grad = None

    def _group_of(self, p: torch.nn.Parameter) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter is not in this optimizer")

    def _use(self, p: torch.nn.Parameter, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._use(p, group)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


class NormalizedSteps(InBackward):
    """RMSprop without momentum or weight decay (``torch.optim.RMSprop``'s update, bit for bit, when
    nothing is clipped), its gradients clipped per tensor to ``max_norm`` (None or 0: unclipped).

    ``factored``: the running mean square of a matrix kept as one value per row and one per column
    (Adafactor's factored second moment, ``v = outer(rows, cols) / mean(rows)``), so the optimizer
    holds O(rows + columns) per weight instead of a buffer of the weight's size. A tensor of one
    dimension keeps its full buffer either way."""

    def __init__(
        self,
        params,
        lr: float,
        alpha: float = 0.99,
        eps: float = 1e-8,
        max_norm: float | None = None,
        factored: bool = False,
        in_backward: bool = False,
    ):
        defaults = {"lr": lr, "alpha": alpha, "eps": eps, "max_norm": max_norm}
        self.factored = factored
        super().__init__(params, defaults, in_backward=in_backward)

    def _use(self, p: torch.nn.Parameter, group: dict) -> None:
        grad = p.grad
        if group["max_norm"]:
            norm = torch.linalg.vector_norm(grad)
            scale = (group["max_norm"] / (norm + 1e-6)).clamp(max=1.0)
            grad = grad * scale
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            if self.factored and p.dim() >= 2:
                rows = p.shape[:-1].numel()
                state["row"] = torch.zeros(rows, dtype=torch.float32, device=p.device)
                state["col"] = torch.zeros(p.shape[-1], dtype=torch.float32, device=p.device)
            else:
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        alpha, eps = group["alpha"], group["eps"]
        if "row" in state:
            g = grad.float()
            square = (g * g).reshape(state["row"].numel(), -1)
            del g
            state["row"].mul_(alpha).add_(square.mean(dim=1), alpha=1 - alpha)
            state["col"].mul_(alpha).add_(square.mean(dim=0), alpha=1 - alpha)
            del square
            mean = state["row"].mean().clamp(min=torch.finfo(torch.float32).tiny)
            avg = torch.outer(state["row"], state["col"]).div_(mean).sqrt_().add_(eps)
            p.addcdiv_(grad, avg.reshape(p.shape).to(p.dtype), value=-group["lr"])
            return
        square_avg = state["square_avg"]
        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        avg = square_avg.sqrt().add_(eps)
        p.addcdiv_(grad, avg, value=-group["lr"])
