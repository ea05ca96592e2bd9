"""The phases of a ``lota adapt`` run: what they share (``Run``) and the runner that trains one.

A phase trains some parameters for some steps on the run's data stream, checkpointing as it goes,
and continues from the checkpoint when the run was interrupted in it. The calibrations
(``lota.calibrations``), the trainers and the pipeline (``lota.adapt``) call down into this module;
it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import dist, events
from .checkpoint import Checkpointer
from .errors import InputError
from .models import enable_gradient_checkpointing, load_model
from .precision import Precision, hold_float32_
from .sparse_model import sync_shards_
from .targets import named_weights, resolve_targets, untie_embeddings
from .train import MetricsLog, TrainSettings, train
from .weights import WeightReader


@dataclass
class Run:
    """What the phases of one run share: the model, data stream, log and checkpoint state."""

    cfg: Any  # the run's AdaptConfig
    model: torch.nn.Module
    targets: dict[str, tuple[int, ...]]
    w0: WeightReader  # the starting weights, read from disk one tensor at a time when needed
    log: MetricsLog
    ckpt: Checkpointer
    stream: object
    state: dict | None
    served: list[int]  # batches served so far, boxed so the stream can count
    world: dist.World = field(default_factory=dist.World)
    sharded: bool = False  # the model is FSDP2-sharded now
    adapter: dict | None = None  # --method lora: the trained adapter, in PEFT's layout
    stored_dtype: torch.dtype = torch.float32  # the weights' dtype as loaded (and saved)
    dense: bool = False  # the "train" phase updates whole weights (fft), not a ticket's entries

    @property
    def resumed_phase(self) -> str | None:
        return self.state["phase"] if self.state else None

    def phase(
        self,
        name: str,
        params: dict[str, torch.nn.Parameter],
        lr: float,
        steps: int,
        model: torch.nn.Module | None = None,
        settings: TrainSettings | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        held: dict[str, torch.Tensor] | None = None,
        masters: bool = False,
        selects: bool = False,
    ) -> None:
        """Train ``params`` for one phase, continuing from the checkpoint when it is of this phase.

        ``settings`` and ``optimizer`` replace the run's (``--optimizer`` at rate ``lr``).
        ``held``: the tensors the phase's checkpoints keep and a resume restores, if not
        ``params`` (none for a phase that changes no weight; an earlier phase's result it starts
        from is held from its first checkpoint on). ``masters``: ``params`` are float32 copies of
        16-bit weights (``lota.precision``). ``selects``: a ticket is selected from the phase's
        result, and the ticket is what the next checkpoint holds: the phase's last step writes no
        checkpoint of its own (only the ``--checkpoint-every`` ones), which for a dense
        calibration would hold the targets and both AdamW moments."""
        kept = params if held is None else held
        start, opt_state, scaler_state = self._resume(name, kept)
        precision = Precision.of(
            self.cfg.mixed_precision,
            self.world.device,
            list(params.values()),
            self.stored_dtype,
            masters,
        )
        if start == 0:  # a phase start is a checkpoint too: a kill before step 1 loses nothing
            self.ckpt.save(
                name,
                0,
                params={} if held is None else held,
                optimizer=None,
                batches=self.served[0],
                metric_lines=len(self.log.records),
            )
        train(
            model or self.model,
            list(params.values()),
            self.stream,
            settings or self.cfg.settings(lr, steps),
            name,
            self.log,
            self.cfg.progress,
            start_step=start,
            optimizer_state=opt_state,
            on_step=self._checkpointing(name, kept, None if selects else steps, precision),
            world=self.world,
            grad_accum=self.cfg.grad_accum,
            sharded=self.sharded,
            optimizer=optimizer,
            precision=precision,
            scaler_state=scaler_state,
        )

    def _checkpointing(self, name: str, kept: dict, last: int | None, precision: Precision):
        """The ``on_step`` of a phase: its ``--checkpoint-every`` checkpoints (and one at step
        ``last``, its end, unless None)."""

        def on_step(step, opt):
            if self.sharded and (name != "train" or self.dense):
                return  # a sharded dense phase would gather the whole model: phase starts only
            self.ckpt.maybe_save(
                name,
                step,
                last,
                params=kept,
                optimizer=opt,
                batches=self.served[0],
                metric_lines=len(self.log.records),
                scaler=precision.state(),
            )

        return on_step

    def _resume(self, name: str, kept: dict[str, torch.Tensor]) -> tuple[int, Any, Any]:
        """Restore the checkpoint's tensors and random state if it is of phase ``name``; returns
        the step to start from, the optimizer's and the loss scaler's state."""
        if self.state is None or self.state["phase"] != name:
            return 0, None, None
        with torch.no_grad():
            for n, p in kept.items():
                if n in self.state["params"]:
                    p.copy_(dist.shard_like(self.state["params"][n], p))
            if self.sharded:
                sync_shards_(self.model)
        torch.set_rng_state(self.state["rng"])
        if self.state.get("cuda_rng") is not None and self.world.device.type == "cuda":
            torch.cuda.set_rng_state(self.state["cuda_rng"], self.world.device)
        resumed = self.state["step"], self.state["optimizer"], self.state.get("scaler")
        self.state = None
        return resumed


def counted(stream, box: list[int]):
    """``stream``'s batches, counting each one served into ``box[0]``."""
    for batch in stream:
        box[0] += 1
        yield batch


def load_run_model(cfg, world: dist.World) -> torch.nn.Module:
    """The run's model on its device (read straight onto a GPU), checkpointing if asked. Targets
    that hold an input embedding tied to the output head untie it: the head gets its own frozen
    copy (one more vocabulary x hidden matrix), so training the embedding leaves the head."""
    model = load_model(cfg.model, cfg.dtype, world.device).to(world.device)
    if cfg.targets is not None:
        untie_embeddings(model, resolve_targets(model, cfg.targets))
    events.emit("model_loaded", model=model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def train_only(model: torch.nn.Module, targets) -> None:
    """Make the ``targets`` weights the model's only trainable parameters."""
    for n, p in named_weights(model).items():
        p.requires_grad_(n in targets)


def masters(run: Run, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.dtype]:
    """Float32 master copies of 16-bit ``params`` for a dense phase (``--master-weights``)."""
    return hold_float32_(params) if run.cfg.master_weights == "float32" else {}


def shard(run: Run) -> None:
    """FSDP2-shard the run's model for the phases that follow."""
    dist.shard_model(run.model, run.world)
    run.sharded = True


# ---------------------------------------------------------------------------- LoRA on the targets
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


def lora_model(run: Run, option: str = "--method"):
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
