"""Precision of a training phase: autocast, loss scaling and float32 master weights.

Three settings decide it (``lota adapt --dtype``, ``--mixed-precision``, ``--master-weights``):

- the weights' storage dtype (the checkpoint's by default) is what the model holds and what
  ``--save-model`` writes;
- ``--mixed-precision bf16|fp16`` runs the forward (and so the backward) under ``torch.autocast``
  in that dtype; ``no`` computes in the weights' own dtype;
- what the optimizer updates is float32 wherever lota owns it: the sparse phase's ``delta`` vectors
  and LoRA's adapters always; the dense phases (calibration, ``fft``) on 16-bit weights hold the
  targets as float32 master copies for the phase (``--master-weights float32``, the default),
  whose forward then runs under autocast in the weights' dtype, unless ``--mixed-precision``
  names another. ``--master-weights none`` lets the optimizer update the 16-bit weights
  themselves (pure low-precision training, half the optimizer memory, refused for AdamW and
  RMSprop on float16, whose epsilon of 1e-8 is 0 there).

When the compute is float16 and everything trained is float32, the loss is scaled
(``torch.amp.GradScaler``): steps whose gradients overflow are skipped and the scale lowered. The
scaler's state is part of each checkpoint, so a resumed run scales as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

COMPUTE = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
HALF = (torch.bfloat16, torch.float16)


@dataclass
class Precision:
    """How one phase computes: ``autocast`` (None: no autocast) and the loss scaler, if any."""

    device_type: str = "cpu"
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def of(
        cls,
        mixed_precision: str,
        device: torch.device,
        params: list[torch.Tensor],
        weights_dtype: torch.dtype,
        masters: bool = False,
    ) -> Precision:
        """The precision of a phase training ``params`` of a model whose weights are stored in
        ``weights_dtype``: autocast in ``mixed_precision`` if given, else in the weights' dtype
        when the phase holds float32 ``masters`` of 16-bit weights (the forward would mix dtypes
        without it); a loss scaler when the compute is float16 and every trained tensor is
        float32 (``GradScaler`` cannot unscale float16 gradients)."""
        dtype = COMPUTE[mixed_precision]
        if dtype is None and masters:
            dtype = weights_dtype
        compute = dtype or weights_dtype
        scaler = None
        if compute == torch.float16 and {p.dtype for p in params} == {torch.float32}:
            scaler = torch.amp.GradScaler(device.type)
        return cls(device.type, dtype, scaler)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """The true gradients in place (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    scale: float | None = None  # the loss scale after the last step (read once per step)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """One optimizer step; False when the scaler skipped it (an overflow), which lowered the
        scale: the scale is read from the device once per step, after its update."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scale if self.scale is not None else self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        self.scale = self.scaler.get_scale()
        return self.scale >= before

    def state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
        self.scale = None


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    """The storage dtype of the model's floating-point weights (the most common one)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def hold_float32_(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.dtype]:
    """Turn the 16-bit ``params`` into float32 masters, in place; returns their stored dtypes
    for ``restore_dtype_``. Float32 parameters stay as they are (no copy)."""
    stored = {}
    for n, p in params.items():
        if p.dtype in HALF:
            stored[n] = p.dtype
            p.data = p.data.float()
    return stored


def restore_dtype_(params: dict[str, torch.nn.Parameter], stored: dict[str, torch.dtype]) -> None:
    """Round float32 masters back to the dtype they were stored in (``hold_float32_``)."""
    for n, dtype in stored.items():
        p = params[n]
        p.data = p.data.to(dtype)
        if p.grad is not None:
            p.grad = None
