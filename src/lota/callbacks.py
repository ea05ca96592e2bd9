"""Calibration inside a user's own dense ``transformers.Trainer`` run.

``CalibrationCallback(base, out, at_step)`` watches an ordinary full fine-tune and, right after
optimizer step ``at_step``, writes the ticket of that run: the exact global top-k of
``|current - base|`` over the target tensors, the same ticket ``lota mask BASE CHECKPOINT`` makes
from a checkpoint saved at that step. The base weights are read from the model folder on disk one
tensor at a time (no second copy of the model in memory), and the ticket records the base's
fingerprint, so ``lota adapt --ticket`` and ``lota.prepare`` accept it for that base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from . import format as fmt
from .errors import InputError
from .model_folder import resolve_model_path
from .selection import Sparsity, numel_of, parse_sparsity
from .targets import named_weights
from .task_vectors import select_difference
from .ticket import Ticket
from .weights import WeightReader, differing_weight


class CalibrationCallback(TrainerCallback):
    """Extract a ticket from a dense ``Trainer`` run at one optimizer step and save it.

    ``base``: the folder of the model the run starts from (its safetensors are read tensor by
    tensor). ``out``: where the ticket goes (a ``.safetensors`` file, written atomically; an
    existing file is replaced). ``at_step``: the optimizer step (``state.global_step``, so after
    gradient accumulation) whose weights are compared with the base. ``sparsity`` and ``targets``
    mean what they mean for ``lota mask``. With ``stop=True`` the run stops after that step.

    At the start of training the model must hold the base's weights (their fingerprints are
    compared), unless the run resumes from a checkpoint; a run resumed after ``at_step`` loads the
    ticket written then instead of computing it again. The ticket is computed and saved on the main
    process only (``state.is_world_process_zero``); there it is also kept as ``self.ticket``. The
    model's parameters must be whole on that process (plain or DDP training, not FSDP/ZeRO-3).
    """

    def __init__(
        self,
        base: str,
        out: str,
        at_step: int,
        sparsity: str | float = "0.9",
        targets: str | None = None,
        stop: bool = True,
    ):
        if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 1:
            raise InputError(
                f"at_step must be a positive whole number of optimizer steps, got {at_step!r}",
                "CalibrationCallback",
                "pass at_step=N with N >= 1",
            )
        if not str(out).endswith(".safetensors") or Path(out).is_dir():
            raise InputError(
                "the ticket path must be a file ending in .safetensors",
                str(out),
                "pass out='ticket.safetensors'",
            )
        # a bad sparsity fails here, not after at_step steps
        self._sparsity = Sparsity(str(sparsity), parse_sparsity(sparsity))
        resolve_model_path(str(base), "base model")
        self.base, self.out, self.at_step = str(base), str(out), at_step
        self.sparsity, self.targets, self.stop = sparsity, targets, stop
        self.ticket: Ticket | None = None
        self.base_fingerprint = ""
        self._reader: WeightReader | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ checks at the start
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        reader = WeightReader(self.base, "base model")
        shapes = reader.targets(self.targets)
        live = named_weights(model)
        for name, shape in shapes.items():
            if name not in live or tuple(live[name].shape) != shape:
                got = "missing" if name not in live else f"shape {list(live[name].shape)}"
                raise InputError(
                    f"the trained model does not match the base: tensor '{name}' is {got}, "
                    f"the base has shape {list(shape)}",
                    self.base,
                    "pass the folder of the model this run fine-tunes (whole parameters, "
                    "not FSDP/ZeRO-3 shards)",
                )
        self._reader, self._shapes = reader, shapes
        # one hash of the weights: the base's, as they are read for the comparison with the model
        reader.hash_while_reading()
        differs = differing_weight(model, reader) if state.global_step == 0 else None
        self.base_fingerprint = reader.fingerprint()
        if differs is not None:
            raise InputError(
                f"the model being trained is not the base model (tensor '{differs}' differs)",
                self.base,
                "pass the folder the model was loaded from, before any training",
            )
        if state.global_step >= self.at_step:
            self._resume_after_calibration(state)
        return control

    def _resume_after_calibration(self, state) -> None:
        if not Path(self.out).is_file():
            raise InputError(
                f"the run resumes at step {state.global_step}, after the calibration step "
                f"{self.at_step}, and the ticket was not written",
                self.out,
                f"make it from the checkpoint of step {self.at_step} with "
                f"'lota mask BASE CHECKPOINT --sparsity {self.sparsity} --out {self.out}'",
            )
        if state.is_world_process_zero:
            self.ticket = fmt.load(self.out).ticket

    # ------------------------------------------------------------------ the calibration step
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.at_step:
            return control
        if state.is_world_process_zero:
            self.ticket = self._extract(model)
            fmt.save(
                self.ticket,
                self.out,
                config={
                    "command": "CalibrationCallback",
                    "base": self.base,
                    "at_step": self.at_step,
                    "sparsity": str(self.sparsity),
                    "targets": self.targets,
                },
            )
        if self.stop:
            control.should_training_stop = True  # on every process, so that all of them stop
        return control

    @torch.no_grad()
    def _extract(self, model) -> Ticket:
        reader, shapes = self._reader, self._shapes
        if reader is None:  # on_train_begin did not run (the callback was driven by hand)
            reader = WeightReader(self.base, "base model")
            shapes = reader.targets(self.targets)
            self.base_fingerprint = reader.fingerprint()
        live = named_weights(model)
        k = self._sparsity.size(numel_of(shapes))
        return select_difference(
            reader,
            lambda n: live[n].detach(),
            shapes,
            k,
            base_fingerprint=self.base_fingerprint,
        )
