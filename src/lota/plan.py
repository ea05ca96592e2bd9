"""The plan of a ``lota adapt`` run: its settings as it runs, where it runs, and what it reads,
with every refusal made before anything is written.

``make_plan`` resolves the settings (a method of the input embedding, an accelerate FSDP2
launch), probes the environment (the processes, the launcher, tensorboard) and validates; it
touches no file. ``load_inputs`` reads the data, tokenizer, model and tickets, and refuses what
cannot run with them (precision, tickets, the ticket's size).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import dist, phases, selection, sources
from .adapt_config import AdaptConfig, Environment
from .calibrations import CALIBRATIONS
from .data import Fields, TokenizedData, fit_max_length, model_positions, read_data, steps_for
from .errors import InputError
from .models import check_special_tokens, load_tokenizer
from .precision import HALF, weights_dtype
from .targets import named_weights, resolve_targets
from .ticket import Ticket, check_against
from .ticketfiles import load_tickets, protected_ticket
from .weights import model_fingerprint


@dataclass
class Plan:
    """A run's settings as it runs (``cfg``), the ``--method`` asked for (the summary names it),
    this process's world, the output folder and ``--sparsity`` parsed."""

    cfg: AdaptConfig
    requested: str
    world: dist.World
    out: Path
    sparsity: selection.Sparsity


def make_plan(cfg: AdaptConfig) -> Plan:
    """``cfg`` resolved and validated in this process's environment; nothing is read or written."""
    requested = cfg.method
    cfg = sources.resolve(cfg)  # a method of the input embedding, as it runs
    launcher = dist.accelerate_plugin()
    if launcher == "fsdp2" and not cfg.fsdp:  # an accelerate FSDP2 config
        cfg = dataclasses.replace(cfg, fsdp=True)
    # a device that is not there is refused first (a bad --dist-timeout by validate)
    timeout = cfg.dist_timeout if 0 < cfg.dist_timeout < math.inf else None
    world = dist.world(cfg.device, timeout)
    sparsity = cfg.validate(environment(cfg, world, launcher))
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError("output path is a file", str(out), "choose a folder for --out")
    return Plan(cfg, requested, world, out, sparsity)


def environment(cfg: AdaptConfig, world: dist.World, launcher: str | None) -> Environment:
    """What ``cfg.validate`` needs to know of where the run starts."""
    wanted = cfg.report_to == "tensorboard"
    tensorboard = not wanted or importlib.util.find_spec("tensorboard") is not None
    return Environment(world.size, world.distributed, launcher, tensorboard)


@dataclass
class Inputs:
    """What a run reads, checked: the tokenized data (read again as batches need it), the model on its device and its tokenizer,
    the targets, the protected entries and the ``--ticket`` file's ticket, the ticket's source
    (None: the method trains every target entry) and size, and the training steps."""

    data: TokenizedData
    tokenizer: Any
    model: torch.nn.Module
    stored_dtype: torch.dtype
    targets: dict[str, tuple[int, ...]]
    base_fp: str
    protected: Ticket | None
    given: list[Ticket]
    source: sources.Source | None
    numel: int
    k: int
    steps: int


def load_inputs(plan: Plan) -> Inputs:
    """Read everything the run needs, refusing what cannot run before anything is written."""
    cfg, world = plan.cfg, plan.world
    examples = read_data(cfg.data, cfg.split, Fields.of(cfg))
    tokenizer = load_tokenizer(cfg.model)
    model = phases.load_run_model(cfg, world)
    check_special_tokens(tokenizer, model, cfg.model, need_eos=True)
    stored_dtype = weights_dtype(model)
    check_precision(cfg, stored_dtype, world.device)
    positions = model_positions(model.config)
    max_length = fit_max_length(cfg.max_length, positions)
    data = TokenizedData(examples, tokenizer, max_length, where=cfg.data, positions=positions)
    targets = resolve_targets(model, cfg.targets)
    base_fp = model_fingerprint(model)
    world.check_same_weights(base_fp, cfg.model)  # every rank loaded the same weights
    tensors = {n: tuple(p.shape) for n, p in named_weights(model).items()}
    protected, given = _tickets(cfg, targets, tensors)
    source, numel, k = _ticket_size(plan, targets, protected)
    steps = steps_for(len(data), cfg.batch_size, cfg.steps, cfg.epochs)
    return Inputs(
        data, tokenizer, model, stored_dtype, targets, base_fp, protected, given, source, numel,
        k, steps,
    )  # fmt: skip


def _tickets(cfg: AdaptConfig, targets: dict, tensors: dict) -> tuple[Ticket | None, list[Ticket]]:
    """The protected entries (``--protect``) and the ``--ticket`` file's ticket, checked against
    the targets, each other and what the chosen sources and calibration need."""
    protected = protected_ticket(cfg.protect, targets, tensors)
    given = load_tickets([cfg.ticket], tensors) if cfg.ticket else []
    if given:
        check_against(targets, given[0], "ticket")
    if given and given[0].nnz == 0:
        raise InputError(
            "the ticket selects no entry, so the run would train nothing",
            cfg.ticket,
            "give a ticket with entries (for 'lota ks', select rows with a larger --alpha or --top N)",
        )
    for source in sources.chosen(cfg):
        if source.check is not None:
            source.check(cfg)
    calibration = CALIBRATIONS[cfg.calibration]
    if sources.calibration_runs(cfg) and calibration.check is not None:
        calibration.check(targets)
    if given and protected is not None and given[0].overlap(protected):
        raise InputError(
            f"the ticket shares {given[0].overlap(protected):,} entries with the protected tickets",
            cfg.ticket,
            "extract a ticket with --protect, or drop --protect",
        )
    return protected, given


def _ticket_size(
    plan: Plan, targets: dict, protected: Ticket | None
) -> tuple[sources.Source | None, int, int]:
    """The source of a sparse run's ticket (None for a dense one), the number of target entries
    and the ticket's exact size ``k``."""
    cfg = plan.cfg
    numel = selection.numel_of(targets)
    source = sources.source_for(cfg) if sources.METHODS[cfg.method].sparse else None
    if source is not None and source.sized:  # a ticket of 0 entries would train nothing
        k = selection.require_trainable(plan.sparsity, numel)
    else:
        k = plan.sparsity.size(numel)
    if protected is not None and cfg.protect_mode == "constrained" and k > numel - protected.nnz:
        raise InputError(
            f"the ticket needs {k:,} entries but only {numel - protected.nnz:,} are not protected",
            "--protect",
            "raise --sparsity or protect fewer tickets",
        )
    return source, numel, k


# ---------------------------------------------------------------------------- precision
def dense_optimizers(cfg: AdaptConfig) -> list[str]:
    """The optimizers of the run's phases that update whole weights (fft, dense calibration)."""
    out = []
    if sources.METHODS[cfg.method].trainer == "dense":
        out.append(cfg.optimizer)
    calibration = CALIBRATIONS.get(cfg.calibration)
    if sources.calibration_runs(cfg) and calibration and calibration.dense_optimizer is not None:
        out.append(calibration.dense_optimizer(cfg))
    return out


def check_precision(
    cfg: AdaptConfig, stored: torch.dtype, device: torch.device | None = None
) -> None:
    """Refuse the precision settings that cannot train these weights, before anything is written."""
    _check_bf16_support(cfg, stored, device)
    dense = dense_optimizers(cfg)
    if not dense or stored not in HALF:
        return
    name = str(stored).removeprefix("torch.")
    if cfg.master_weights == "float32" and cfg.fsdp:
        raise InputError(
            f"--fsdp cannot hold float32 master copies of {name} weights (FSDP2 shards one "
            "dtype per block)",
            "--master-weights",
            "pass --master-weights none, or load with --dtype float32 and add "
            "--mixed-precision bf16",
        )
    if cfg.master_weights == "none" and stored == torch.float16 and set(dense) - {"sgd"}:
        raise InputError(
            f"--master-weights none would run {' and '.join(sorted(set(dense) - {'sgd'}))} on "
            "float16 weights, whose epsilon (1e-8) is 0 in float16: the first step divides by zero",
            "--master-weights",
            "keep --master-weights float32 (the default), or use bfloat16 weights "
            "(--dtype bfloat16)",
        )


def _check_bf16_support(cfg: AdaptConfig, stored: torch.dtype, device: torch.device | None) -> None:
    """A GPU without bfloat16 (before Ampere) cannot compute in it: refuse bf16 compute there."""
    bf16 = cfg.mixed_precision == "bf16" or (
        stored == torch.bfloat16 and cfg.mixed_precision == "no"
    )
    if device is None or device.type != "cuda" or not bf16 or torch.cuda.is_bf16_supported():
        return
    gpu = torch.cuda.get_device_name(device)
    if cfg.mixed_precision == "bf16":
        raise InputError(
            f"{gpu} has no bfloat16 support",
            "--mixed-precision",
            "use --mixed-precision fp16 (float16 compute with loss scaling)",
        )
    raise InputError(
        f"the weights are bfloat16 and {gpu} has no bfloat16 support",
        "--dtype",
        "load them with --dtype float32 and add --mixed-precision fp16 (or --dtype float16)",
    )
