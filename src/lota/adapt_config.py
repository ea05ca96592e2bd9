"""The settings of one ``lota adapt`` run (``AdaptConfig``), each declared once with its
command-line option (``lota.settings.setting``), and their value rules (``validate``).

The fields are grouped by concern under comments; their order is the order of ``lota adapt
--help`` and of the keys of the ``config.yaml`` a run writes, so a field is only ever added. What
the environment says (processes, launcher, installed packages) reaches ``validate`` as an
``Environment`` that ``lota.plan`` probes.

Invariant: importing this module loads neither torch nor transformers (the CLI builds its parser
from it); what the checks need is imported when they run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import calibrations, sources
from . import options as opt
from .calibrations import fisher
from .calibrations import lora as lora_calibration
from .errors import InputError
from .settings import (
    LARGE_LR,
    LOAD_DTYPES,
    MASTER_WEIGHTS,
    MIXED_PRECISION,
    OPTIMIZERS,
    PROTECT_MODES,
    REPORT_TO,
    VALUE_DTYPES,
    setting,
    zero_is_none,
)

if TYPE_CHECKING:
    from .selection import Sparsity
    from .train import TrainSettings


@dataclass(frozen=True)
class Environment:
    """Where a run starts, as ``validate`` needs to know it (probed by ``lota.plan``): the number
    of processes, whether they form a process group, the accelerate launcher's plugin
    (``"fsdp2"``, ``"fsdp1"``, ``"deepspeed"`` or None) and whether tensorboard is installed."""

    processes: int = 1
    distributed: bool = False
    launcher: str | None = None
    tensorboard: bool = True


@dataclass
class AdaptConfig:
    """The settings of one ``lota adapt`` run; written, resolved, beside its outputs.

    The fields are grouped by concern in the order they always had: the order of ``--help`` and
    of the keys of ``config.yaml``."""

    # -- what is adapted, on what, and where the outputs go
    model: str = setting(
        positional=True, help="model folder (config, safetensors weights, tokenizer)"
    )
    data: str = opt.data("training data (prompt/completion, messages or text rows)")
    out: str = setting(required=True, help="output folder")
    split: str | None = opt.split("train")
    prompt_field: str = opt.prompt_field()
    completion_field: str = opt.completion_field()
    messages_field: str = opt.messages_field()
    text_field: str = opt.text_field()
    # -- the method and its ticket: size, calibration (each calibration's own settings)
    method: str = setting(
        sources.DEFAULT_METHOD, help="{names} (default {default})", names=sources.method_names()
    )
    sparsity: str = setting(
        "0.9", help="fraction of target entries frozen, in [0, 1) (default {default})"
    )
    calibration_steps: int = setting(8, help="dense steps before extraction (default {default})")
    calibrated: str | None = setting(
        None,
        metavar="TUNED",
        help="a model already fine-tuned from MODEL (e.g. a Trainer checkpoint): its task vector "
        "gives the ticket, no calibration run",
    )
    calibration_lr: float | None = setting(
        None, type=float, help="learning rate of calibration (default --lr)"
    )
    calibration: str = setting(
        calibrations.DEFAULT,
        names=calibrations.names(),
        help="how --method lota and bottomk calibrate: {names} (default {default})",
    )
    fisher_dtype: str = setting(
        "float32",
        names=fisher.DTYPES,
        help="--calibration fisher: precision of the score buffer, {names} (default {default})",
    )
    lora_calibration_score: str = setting(
        "change",
        names=lora_calibration.SCORES,
        help="--calibration lora: the ticket from the adapter's merged change or the full "
        "weights' squared gradients, {names} (default {default})",
    )
    # -- training: length, rate, batches, optimizer
    steps: int | None = setting(None, type=int, help="training steps (default: one epoch)")
    epochs: float | None = setting(None, type=float, help="training epochs instead of --steps")
    lr: float = setting(1e-5, help="learning rate (default 1e-5)")
    batch_size: int = setting(8)
    group_by_length: bool = setting(
        False,
        help="batch examples of similar length together, so that less of each batch is padding "
        "(batches keep a random order)",
    )
    optimizer: str = setting("adamw", help="{names} (default {default})", names=OPTIMIZERS)
    weight_decay: float = setting(0.0)
    momentum: float = setting(0.0, help="momentum for rmsprop and sgd")
    max_grad_norm: float | None = setting(
        1.0, parse=zero_is_none, help="gradient clipping, 0 to disable"
    )
    grad_accum: int = setting(
        1,
        help="micro-batches per process and step; --batch-size is the global batch "
        "(default {default})",
    )
    # -- processes, logging, seed
    fsdp: bool = setting(
        False,
        help="shard weights across processes with FSDP2 (under torchrun / accelerate launch)",
    )
    dist_timeout: float = setting(
        120.0,
        help="minutes a process waits for the others (the main process alone writes checkpoints "
        "and outputs) before the run fails (default {default})",
    )
    report_to: str = setting(
        "none",
        names=REPORT_TO,
        help="also log metrics to: {names} (OUT/tensorboard); OUT/metrics.jsonl always",
    )
    seed: int = setting(0)
    # -- which entries: targets, a given ticket, protected tickets; example length; LoRA's rank
    targets: str | None = setting(
        None, help="regex of parameter names to adapt (default: linear layers in blocks)"
    )
    ticket: str | None = setting(
        None,
        help="reuse this ticket (or delta's ticket); skips calibration",
        aliases={"--tokens": "--method ks-lottery: the folder (or ticket) written by 'lota ks'"},
    )
    protect: list[str] = setting(
        factory=list, nargs="+", metavar="FILE", help="tickets or deltas to keep untouched (LoTTO)"
    )
    protect_mode: str = setting(
        "constrained", help="{names} (default {default})", names=PROTECT_MODES
    )
    max_length: int | None = setting(  # None: 512, or the model's positions if it has fewer
        None,
        type=int,
        help="tokens per example, at most the model's positions (default 512, or the positions "
        "if fewer)",
    )
    lora_r: int = setting(16)
    lora_alpha: int = setting(32)
    # -- device, precision and memory
    device: str = setting(
        "auto",
        help="where to train: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N "
        "(default {default})",
    )
    dtype: str = setting("auto", choices=LOAD_DTYPES, help="load precision")
    mixed_precision: str = setting(
        "no",
        names=MIXED_PRECISION,
        help="compute precision of the forward and backward passes (torch autocast): {names} "
        "(default {default}: the weights' own)",
    )
    master_weights: str = setting(
        "float32",
        names=MASTER_WEIGHTS,
        help="dense phases (calibration, fft) on 16-bit weights: the optimizer updates float32 "
        "copies of the targets, or the 16-bit weights themselves: {names} (default {default})",
    )
    gradient_checkpointing: bool = setting(
        False,
        help="recompute each block's activations in the backward pass (transformers' "
        "non-reentrant checkpointing): less memory, about a third more compute",
    )
    deterministic: bool = setting(
        False,
        help="on a GPU, deterministic kernels only (torch.use_deterministic_algorithms, cuBLAS's "
        "fixed workspace), so that a resumed run ends with the same bits as an uninterrupted one; "
        "slower, and refused by ops that have no deterministic kernel",
    )
    # -- outputs, checkpoints and resume
    values_dtype: str = setting(
        "auto",
        choices=("auto", *VALUE_DTYPES),
        help="precision of the delta's values on disk: auto (default) writes on bf16/fp16 "
        "weights the saved model's exact change (16 bits, float32 where they do not hold it), "
        "on float32 weights float32; float32 keeps the float32 master values; bfloat16 / "
        "float16 round them",
    )
    save_model: bool = setting(False, help="also write a loadable model folder to OUT/model")
    checkpoint_every: int = setting(
        100,
        help="steps between checkpoints (default {default}; every phase start and the end of "
        "training always checkpoint, and a calibration ends in its ticket)",
    )
    force: bool = setting(False, help="write into an existing, non-empty --out")
    resume: bool = setting(False, help="continue an interrupted run (also automatic)")
    restart: bool = setting(False, help="discard an interrupted run's checkpoint and start over")
    progress: bool = True  # the command line's --quiet turns it off

    def validate(self, env: Environment | None = None) -> Sparsity:
        """Check every setting, reporting all problems at once; returns ``--sparsity`` parsed.
        ``env``: where the run starts (``lota.plan`` probes it); without it, the rules that
        depend on the environment are not checked."""
        from .selection import Sparsity

        errors = []
        method = sources.METHODS.get(self.method)
        if method is None:
            names = ", ".join(sources.method_names())
            errors.append(f"--method '{self.method}' is not one of {names}")
        if self.optimizer not in OPTIMIZERS:
            errors.append(f"--optimizer '{self.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
        if self.protect_mode not in PROTECT_MODES:
            errors.append(
                f"--protect-mode '{self.protect_mode}' is not one of {', '.join(PROTECT_MODES)}"
            )
        sparsity = None
        try:
            sparsity = Sparsity.of(self.sparsity)
        except InputError as e:
            errors.append(e.what)
        errors += self._float_errors()
        errors += self._count_errors()
        errors += sources.option_errors(self)
        if self.protect and method is not None and not method.sparse:
            errors.append(
                f"--protect needs a sparse method; --method {self.method} trains every target entry"
            )
        errors += sources.requirement_errors(self)
        errors += sources.calibration_errors(self)
        if env is not None:
            errors += self._split_errors(env)
        for name, names in [
            ("mixed_precision", MIXED_PRECISION),
            ("master_weights", MASTER_WEIGHTS),
            ("report_to", REPORT_TO),
        ]:
            if getattr(self, name) not in names:
                errors.append(
                    f"--{name.replace('_', '-')} '{getattr(self, name)}' is not one of "
                    f"{', '.join(names)}"
                )
        if env is not None:
            errors += self._environment_errors(env)
        if self.fsdp:
            errors += sources.fsdp_errors(self)
        if errors:
            raise InputError("; ".join(errors), "lota adapt", "fix the arguments above")
        return sparsity

    def _count_errors(self) -> list[str]:
        """Counts below their least value, and settings given together that exclude each other."""
        errors = []
        for name, lo in [
            ("batch_size", 1),
            ("max_length", 2),
            ("lora_r", 1),
            ("lora_alpha", 1),
            ("grad_accum", 1),
        ]:
            value = getattr(self, name)
            if value is not None and value < lo:
                errors.append(f"--{name.replace('_', '-')} {value} must be >= {lo}")
        if self.steps is not None and self.steps < 1:
            errors.append(f"--steps {self.steps} must be >= 1")
        if self.steps is not None and self.epochs is not None:
            errors.append("give --steps or --epochs, not both")
        if self.calibration_steps < 1 and sources.calibrates(self):
            errors.append(f"--calibration-steps {self.calibration_steps} must be >= 1")
        if self.checkpoint_every < 0:
            errors.append(f"--checkpoint-every {self.checkpoint_every} must be >= 0")
        if self.resume and self.restart:
            errors.append("give --resume or --restart, not both")
        return errors

    def _split_errors(self, env: Environment) -> list[str]:
        """A global batch that does not split into the processes' equal micro-batches."""
        parts = env.processes * self.grad_accum
        if self.batch_size >= 1 and self.grad_accum >= 1 and self.batch_size % parts:
            return [
                f"--batch-size {self.batch_size} does not split into {env.processes} process(es) "
                f"x --grad-accum {self.grad_accum} equal micro-batches; make it a multiple of "
                f"{parts}"
            ]
        return []

    def _environment_errors(self, env: Environment) -> list[str]:
        """What the launcher, the processes or the installed packages cannot do."""
        errors = []
        if self.report_to == "tensorboard" and not env.tensorboard:
            errors.append("--report-to tensorboard needs the tensorboard package (pip install it)")
        if env.launcher == "deepspeed":
            errors.append(
                "lota adapt does not run under DeepSpeed; launch with torchrun or accelerate "
                "without a DeepSpeed config (add --fsdp to shard)"
            )
        if env.launcher == "fsdp1":
            errors.append(
                "lota shards with FSDP2 only; set fsdp_version: 2 in the accelerate config"
            )
        if self.fsdp and not env.distributed:
            errors.append(
                "--fsdp needs several processes: start lota with torchrun or accelerate launch"
            )
        return errors

    def _float_errors(self) -> list[str]:
        """Non-finite numbers first: inf passes a ``> 0`` check and would only fail (or wreck the
        model) after training started."""
        errors = []
        for name, positive in [
            ("lr", True),
            ("calibration_lr", True),
            ("epochs", True),
            ("weight_decay", False),
            ("momentum", False),
            ("max_grad_norm", False),
            ("dist_timeout", True),
        ]:
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if value is None:
                continue
            if not math.isfinite(value):
                errors.append(f"{flag} {value} must be a finite number")
            elif positive and not value > 0:
                errors.append(f"{flag} {value} must be > 0")
            elif not positive and value < 0:
                disable = " (0 disables clipping)" if name == "max_grad_norm" else ""
                errors.append(f"{flag} {value} must be >= 0{disable}")
        return errors

    def warnings(self) -> list[str]:
        """Settings that are valid but very likely a mistake, one line each."""
        out = []
        for name in ("lr", "calibration_lr"):
            value = getattr(self, name)
            if value is not None and math.isfinite(value) and value > LARGE_LR:
                out.append(
                    f"--{name.replace('_', '-')} {value:g} is above {LARGE_LR:g}: a rate this large "
                    "usually wrecks the model even when the loss stays finite -- check the value "
                    "(1e-5 to 1e-3 are usual)"
                )
        return out

    @property
    def calibration_rate(self) -> float:
        """The learning rate of calibration: ``--calibration-lr``, else ``--lr``."""
        return self.calibration_lr if self.calibration_lr is not None else self.lr

    def settings(self, lr: float, steps: int) -> TrainSettings:
        from .train import TrainSettings

        return TrainSettings(
            lr=lr,
            steps=steps,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
        )
