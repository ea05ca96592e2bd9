"""``lota adapt``: LoTA's three phases, LoTTO protection and the baselines through one pipeline.

Phases for ``method="lota"``: calibration (dense training of the targets for a few steps), exact
global top-k extraction of the task vector (disjoint from protected tickets), reset to the
starting weights, then sparse training of the ticket's entries only. Baselines: ``fft`` (dense
training of the targets), ``lora`` (PEFT), ``random`` and ``bottomk`` (tickets of the same size).
What each ``--method`` trains and where its ticket comes from is the table in ``lota.sources``.
Invariant, checked at the end of every sparse run: every entry outside the ticket, and every
protected entry, is bit-identical to the starting model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from . import dist, selection, sources
from . import format as fmt
from .checkpoint import DIRNAME, Checkpointer, config_hash
from .data import (
    batches,
    fit_max_length,
    model_positions,
    pad_id,
    read_jsonl,
    steps_for,
    tokenize,
)
from .delta import SparseDelta, apply_delta_, delta_from_weights
from .errors import InputError, LotaError
from .fileio import (
    LOCKNAME,
    FolderLock,
    check_folder_files,
    create_folder,
    fault,
    remove_folders,
    remove_stale_temporaries,
    write_json,
    write_text,
)
from .models import (
    WeightReader,
    check_special_tokens,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    model_fingerprint,
    named_weights,
    resolve_targets,
    save_model,
)
from .precision import HALF, Precision, hold_float32_, restore_dtype_, weights_dtype
from .settings import AdaptConfig as AdaptConfig  # declared beside its command-line options
from .sparse_model import (
    delta_parameters,
    extract_delta,
    prepare,
    sync_shards_,
    unprepare,
)
from .ticket import Ticket, check_against
from .ticketfiles import load_tickets, protected_ticket
from .train import (
    MetricsLog,
    TrainSettings,
    heap_growth_limited,
    release_freed_memory,
    train,
)

# What a run writes into --out. A folder holding only these (and lota's temporaries of them) and
# marked by a run of the same settings is that run, interrupted, and the same command takes it up.
RUN_FILES = (
    DIRNAME,
    "metrics.jsonl",
    "config.yaml",
    "delta.safetensors",
    "summary.json",
    "model",
    "adapter",
    "tensorboard",
    LOCKNAME,
)


def _foreign_files(out: Path) -> list[str]:
    def own(name: str) -> bool:
        # temporaries, and the lock of a folder swap (``atomic_dir``) a kill left behind
        temporary = name.startswith(".") and name.endswith((".tmp", ".old", ".new", ".lock"))
        return name in RUN_FILES or (
            temporary and any(name.startswith(f".{f}.") for f in RUN_FILES)
        )

    return sorted(p.name for p in out.iterdir() if not own(p.name))


def _checkpointer(cfg: AdaptConfig, out: Path, world: dist.World) -> tuple[Checkpointer, bool]:
    """Decide between a fresh start and resuming; refuse to clobber anything else in ``out``.
    Every rank decides the same, once the main process holds the folder's lock; only the main
    process writes."""
    ckpt = Checkpointer(out, asdict(cfg), cfg.checkpoint_every, writer=world.main)
    if ckpt.dir.exists() and world.main:  # an interrupted run: its half-written temporaries
        remove_stale_temporaries(out)
        remove_stale_temporaries(ckpt.dir)
    if ckpt.dir.exists() and cfg.restart:
        return ckpt, False  # the interrupted run's files are replaced
    if ckpt.exists():
        if not ckpt.matches():
            raise InputError(
                "the output folder holds a checkpoint of a run with other settings",
                str(out),
                "rerun the same command to resume it, or pass --restart to discard it",
            )
        return ckpt, True
    if ckpt.dir.exists() and not cfg.force:  # a run killed before its first checkpoint
        if ckpt.started_hash() not in (None, ckpt.hash):
            raise InputError(
                "the output folder holds a run with other settings, stopped before its first "
                "checkpoint",
                str(out),
                "rerun that run's command, or pass --restart to discard it",
            )
        foreign = _foreign_files(out)
        if foreign:
            raise InputError(
                f"output folder holds files lota did not write ({', '.join(foreign[:3])})",
                str(out),
                "choose a new --out, or pass --force to replace lota's files in it",
            )
        return ckpt, False  # lota's own, with nothing to resume: it starts again
    if ckpt.dir.exists():
        return ckpt, False
    if cfg.resume:
        raise InputError(
            "there is no checkpoint to resume", str(out), "run without --resume to start"
        )
    if any(p.name != LOCKNAME for p in out.iterdir()) and not cfg.force:
        raise InputError(
            "output folder exists and is not empty",
            str(out),
            "choose a new --out, or pass --force to replace lota's files in it",
        )
    return ckpt, False


@dataclass
class _Hold:
    """The main process's hold on ``--out`` while a run writes there: the folder's lock, the
    folders this run created, and whether it has begun writing. A run refused for bad input
    leaves nothing behind; any other failure (a kill, a full disk, divergence) keeps what the
    same command resumes from."""

    out: Path
    lock: FolderLock | None = None
    created: list[Path] = field(default_factory=list)
    started: bool = False

    @classmethod
    def take(cls, out: Path, world: dist.World) -> _Hold:
        """Lock ``out`` (creating it if needed) before anything there is read or written. Only
        the main process locks: the ranks of one run share its folder, and its lock."""
        hold, error = cls(out), None
        if world.main:
            try:
                hold.created = create_folder(out)
                hold.lock = FolderLock(out, follow_link=True).acquire()
            except LotaError as e:
                error = e
                remove_folders(hold.created)
        if world.any(error is not None):
            raise error or InputError(
                "the main process could not lock the output folder", str(out), "see its message"
            )
        fault("locked")
        return hold

    def close(self, error: BaseException | None) -> None:
        if self.lock is None:
            return
        bad_input = isinstance(error, InputError)
        if bad_input and self.started and not self.created:
            shutil.rmtree(self.out / DIRNAME, ignore_errors=True)
            shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        self.lock.release()
        if error is not None and self.created and (bad_input or not self.started):
            remove_folders(self.created)


@dataclass
class _Run:
    """What the phases of one run share: the model, data stream, log and checkpoint state."""

    cfg: AdaptConfig
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
        start, opt_state, scaler_state = 0, None, None
        kept = params if held is None else held
        if self.state is not None and self.state["phase"] == name:
            with torch.no_grad():
                for n, p in kept.items():
                    if n in self.state["params"]:
                        p.copy_(dist.shard_like(self.state["params"][n], p))
                if self.sharded:
                    sync_shards_(self.model)
            torch.set_rng_state(self.state["rng"])
            if self.state.get("cuda_rng") is not None and self.world.device.type == "cuda":
                torch.cuda.set_rng_state(self.state["cuda_rng"], self.world.device)
            start, opt_state = self.state["step"], self.state["optimizer"]
            scaler_state = self.state.get("scaler")
            self.state = None
        precision = Precision.of(
            self.cfg.mixed_precision,
            self.world.device,
            list(params.values()),
            self.stored_dtype,
            masters,
        )

        def on_step(step, opt):
            if self.sharded and (
                name != "train" or sources.METHODS[self.cfg.method].trainer == "dense"
            ):
                return  # a sharded dense phase would gather the whole model: phase starts only
            self.ckpt.maybe_save(
                name,
                step,
                None if selects else steps,
                params=kept,
                optimizer=opt,
                batches=self.served[0],
                metric_lines=len(self.log.records),
                scaler=precision.state(),
            )

        if (
            start == 0
        ):  # a phase boundary is a checkpoint too, so a kill before step 1 loses nothing
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
            on_step=on_step,
            world=self.world,
            grad_accum=self.cfg.grad_accum,
            sharded=self.sharded,
            optimizer=optimizer,
            precision=precision,
            scaler_state=scaler_state,
        )


def _counted(stream, box: list[int]):
    for batch in stream:
        box[0] += 1
        yield batch


def adapt(cfg: AdaptConfig) -> dict:
    """Run one adaptation; returns a summary (also written to ``summary.json`` beside the outputs).

    A run killed at any moment, before its first checkpoint too, is taken up by the same command
    run again and ends with the same outputs as an uninterrupted run. While it runs, the output
    folder is locked: a second run into it is refused.
    """
    with dist.deterministic(cfg.deterministic):  # before CUDA is touched
        return _adapt_in(cfg)


def _adapt_in(cfg: AdaptConfig) -> dict:
    requested = cfg.method  # the summary names it, not the method it runs as
    cfg = sources.resolve(cfg)  # a method of the input embedding, as it runs
    if dist.accelerate_plugin() == "fsdp2" and not cfg.fsdp:  # an accelerate FSDP2 config
        cfg = dataclasses.replace(cfg, fsdp=True)
    # a device that is not there is refused first (a bad --dist-timeout by validate)
    timeout = cfg.dist_timeout if 0 < cfg.dist_timeout < math.inf else None
    world = dist.world(cfg.device, timeout)
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError("output path is a file", str(out), "choose a folder for --out")
    hold = _Hold.take(out, world)
    try:
        info = _adapt(cfg, world, out, hold, requested)
    except BaseException as e:
        hold.close(e)
        raise
    hold.close(None)
    return info


def _finished(cfg: AdaptConfig, out: Path) -> dict | None:
    """The summary of a run of these settings that already finished in ``out``, or None.

    A run killed after its last write (or simply run twice) is complete: the same command then
    reports it and changes nothing, as resuming it would end with the same bits."""
    if cfg.force or cfg.restart or (out / DIRNAME).exists():
        return None
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        written = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    outputs = [out / "delta.safetensors"] + ([out / "model"] if cfg.save_model else [])
    if (
        not isinstance(written, dict)
        or not isinstance(summary, dict)
        or summary.get("kind") != "summary"
        or config_hash(written) != config_hash(asdict(cfg))
        or not all(p.exists() for p in outputs)
        or _foreign_files(out)
    ):
        return None
    return {k: v for k, v in summary.items() if k not in ("format", "kind", "format_version")}


def _adapt(
    cfg: AdaptConfig, world: dist.World, out: Path, hold: _Hold, requested: str | None = None
) -> dict:
    t_start = time.perf_counter()
    check_folder_files(out, "output", [DIRNAME])  # its files are read by name, from here on
    done = _finished(cfg, out)
    if done is not None:
        return {**done, "already_finished": True}
    ckpt, resuming = _checkpointer(cfg, out, world)
    # Everything that can be wrong with the inputs is checked before anything is written.
    examples = read_jsonl(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    model = _load(cfg, world)
    check_special_tokens(tokenizer, model, cfg.model, need_eos=True)
    stored_dtype = weights_dtype(model)
    _check_precision(cfg, stored_dtype, world.device)
    positions = model_positions(model.config)
    max_length = fit_max_length(cfg.max_length, positions)
    data = tokenize(examples, tokenizer, max_length, where=cfg.data, positions=positions)
    targets = resolve_targets(model, cfg.targets)
    base_fp = model_fingerprint(model)
    world.check_same_weights(base_fp, cfg.model)  # every rank loaded the same weights
    tensors = {n: tuple(p.shape) for n, p in named_weights(model).items()}
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
    calibration = sources.CALIBRATIONS[cfg.calibration]
    if sources.calibration_runs(cfg) and calibration.check is not None:
        calibration.check(targets)
    if given and protected is not None and given[0].overlap(protected):
        raise InputError(
            f"the ticket shares {given[0].overlap(protected):,} entries with the protected tickets",
            cfg.ticket,
            "extract a ticket with --protect, or drop --protect",
        )
    numel = selection.numel_of(targets)
    sparsity = selection.Sparsity.of(cfg.sparsity)  # checked by validate
    method = sources.METHODS[cfg.method]
    source = sources.source_for(cfg) if method.sparse else None
    if source is not None and source.sized:  # a ticket of 0 entries would train nothing
        k = selection.require_trainable(sparsity, numel)
    else:
        k = sparsity.size(numel)
    if protected is not None and cfg.protect_mode == "constrained" and k > numel - protected.nnz:
        raise InputError(
            f"the ticket needs {k:,} entries but only {numel - protected.nnz:,} are not protected",
            "--protect",
            "raise --sparsity or protect fewer tickets",
        )
    steps = steps_for(len(data), cfg.batch_size, cfg.steps, cfg.epochs)
    ckpt.base_fingerprint = base_fp
    state = ckpt.load(targets) if resuming else None
    if state is not None and state["base_fingerprint"] != base_fp:
        raise InputError(
            "the model changed since the interrupted run started (its fingerprint differs)",
            cfg.model,
            "restore the original model, or pass --restart to start over",
        )
    world.barrier()  # every rank has read the inputs and the checkpoint before anything is written
    hold.started = True
    if not resuming:
        ckpt.clear()

    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt.mark_started()  # first, so a kill from here on leaves a folder known to be this run's
    log = MetricsLog(
        out / "metrics.jsonl" if world.main else None,
        keep=state["metric_lines"] if state else 0,
        tensorboard=out / "tensorboard" if world.main and cfg.report_to == "tensorboard" else None,
    )
    fault("started")
    # No in-memory copy of the starting weights: they are re-read from the model's files when needed,
    # so the sparse phase holds one dense copy of the model and O(k) more.
    w0 = WeightReader(cfg.model)
    torch.manual_seed(cfg.seed)
    served = [state["batches"] if state else 0]
    stream = _counted(
        batches(
            data,
            cfg.batch_size,
            cfg.seed,
            pad_id(tokenizer),
            skip=served[0],
            group_by_length=cfg.group_by_length,
        ),
        served,
    )
    run = _Run(cfg, model, targets, w0, log, ckpt, stream, state, served, world)
    run.stored_dtype = stored_dtype
    info: dict = {
        "method": requested or cfg.method,
        "numel": numel,
        "base_fingerprint": base_fp,
        "examples": len(data),
        "steps": steps,
        "resumed_from": f"{state['phase']}:{state['step']}" if state else None,
        "processes": world.size,
        "grad_accum": cfg.grad_accum,
        "fsdp": cfg.fsdp,
        "device": str(world.device),
        "weights_dtype": str(stored_dtype).removeprefix("torch."),
    }

    if source is None:
        delta = _dense_run(run, steps)
    else:
        ctx = sources.Context(cfg, targets, k, protected, given, run, info, source)
        delta = _sparse_run(ctx, steps)
    delta.ticket.base_fingerprint = base_fp
    delta.check_finite("trained delta")
    model = run.model
    if run.sharded:  # the trained model as plain weights: the base plus the delta
        model = load_model(cfg.model, cfg.dtype) if cfg.save_model and world.main else None
        if model is not None:
            apply_delta_(named_weights(model), delta)
    info.update(k=delta.nnz, density=delta.density, trained_parameters=delta.nnz)
    if run.adapter is not None:  # LoRA trains its adapter; the delta is its merged change
        info.update(
            trained_parameters=run.adapter["parameters"],
            lora_r=cfg.lora_r,
            lora_layers=run.adapter["layers"],
        )
    if not world.main:
        world.barrier()  # the main process writes the outputs
        return _finish(info, log, t_start)

    resolved = asdict(cfg)
    info["delta_bytes"] = fmt.save(
        delta, out / "delta.safetensors", config=resolved, values_dtype=cfg.values_dtype
    )
    fault("after-delta")
    if run.adapter is not None:
        info["adapter_bytes"] = _save_adapter(run.adapter, out / "adapter", base_fp)
    write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    if cfg.save_model:
        save_model(
            model,
            tokenizer,
            out / "model",
            extra={
                "kind": "model",
                "format": "lota",
                "format_version": 1,
                "base_fingerprint": base_fp,
                "method": cfg.method,
                "delta": "../delta.safetensors",
            },
        )
    _finish(info, log, t_start)
    log.close()
    write_json(
        out / "summary.json", {"format": "lota", "kind": "summary", "format_version": 1, **info}
    )
    ckpt.clear()
    world.barrier()
    return info


def _load(cfg: AdaptConfig, world: dist.World) -> torch.nn.Module:
    """The run's model on its device (read straight onto a GPU), checkpointing if asked."""
    model = load_model(cfg.model, cfg.dtype, world.device).to(world.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _dense_optimizers(cfg: AdaptConfig) -> list[str]:
    """The optimizers of the run's phases that update whole weights (fft, dense calibration)."""
    out = []
    if sources.METHODS[cfg.method].trainer == "dense":
        out.append(cfg.optimizer)
    if sources.calibration_runs(cfg) and cfg.calibration in ("adamw", "sgd"):
        out.append(cfg.optimizer if cfg.calibration == "adamw" else "sgd")
    return out


def _check_precision(
    cfg: AdaptConfig, stored: torch.dtype, device: torch.device | None = None
) -> None:
    """Refuse the precision settings that cannot train these weights, before anything is written."""
    _check_bf16_support(cfg, stored, device)
    dense = _dense_optimizers(cfg)
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


def _finish(info: dict, log: MetricsLog, t_start: float) -> dict:
    losses = [r["loss"] for r in log.records if r["phase"] == "train"]
    info.update(
        final_loss=losses[-1] if losses else None, seconds=round(time.perf_counter() - t_start, 2)
    )
    return info


def _dense_run(run: _Run, steps: int) -> SparseDelta:
    cfg, model, targets = run.cfg, run.model, run.targets
    if sources.METHODS[cfg.method].trainer == "dense":
        _train_only(model, targets)
        if cfg.fsdp:
            _shard(run)
        weights = named_weights(run.model)
        params = {n: weights[n] for n in targets}
        stored = _masters(run, params)
        run.phase("train", params, cfg.lr, steps, masters=bool(stored))
        for p in params.values():
            p.requires_grad_(False)
        model = run.model
    else:
        model, stored, params = _train_lora(run, steps), {}, {}
        run.model = model
    full = Ticket.every(targets)  # no index per entry: the file stores the "full" encoding
    weights = named_weights(model)
    # the exact change of the float32 masters; then the model holds its weights' dtype again
    delta = delta_from_weights(full, run.w0, {n: dist.full_tensor(weights[n]) for n in targets})
    restore_dtype_(params, stored)
    return delta


def _masters(run: _Run, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.dtype]:
    """Float32 master copies of 16-bit ``params`` for a dense phase (``--master-weights``)."""
    return hold_float32_(params) if run.cfg.master_weights == "float32" else {}


def _train_only(model: torch.nn.Module, targets) -> None:
    """Make the ``targets`` weights the model's only trainable parameters."""
    for n, p in named_weights(model).items():
        p.requires_grad_(n in targets)


def _shard(run: _Run) -> None:
    """FSDP2-shard the run's model for the phases that follow."""
    dist.shard_model(run.model, run.world)
    run.sharded = True


def _train_lora(run: _Run, steps: int):
    from .calibration import lora_model

    peft_model = lora_model(run)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    run.phase("train", params, run.cfg.lr, steps, model=peft_model)
    run.adapter = _adapter(peft_model)
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def _adapter(peft_model) -> dict:
    """The trained LoRA adapter as PEFT saves it (tensors by PEFT's keys, its config), and its
    own size: r x (in + out) parameters per adapted layer."""
    from peft import get_peft_model_state_dict

    tensors = {
        k: dist.full_tensor(v.detach()).cpu().clone()
        for k, v in get_peft_model_state_dict(peft_model).items()
    }
    config = peft_model.peft_config["default"]
    return {
        "tensors": tensors,
        "config": config,
        "parameters": sum(t.numel() for t in tensors.values()),
        "layers": len({k.rsplit(".lora_", 1)[0] for k in tensors}),
    }


def _save_adapter(adapter: dict, folder: Path, base_fp: str) -> int:
    """Write the adapter as a PEFT adapter folder (loadable with ``PeftModel.from_pretrained``)
    atomically; returns the size of its weights file."""
    from .fileio import atomic_dir, save_safetensors

    with atomic_dir(folder) as tmp:
        save_safetensors(
            adapter["tensors"],
            tmp / "adapter_model.safetensors",
            metadata={
                "format": "pt",  # what PEFT reads; the rest says what it is to lota
                "lota_kind": "lora-adapter",
                "lota_format_version": "1",
                "base_fingerprint": base_fp,
            },
        )
        adapter["config"].save_pretrained(str(tmp))
    return (folder / "adapter_model.safetensors").stat().st_size


def _sparse_run(ctx: sources.Context, steps: int) -> SparseDelta:
    """Build the ticket from its source (or take it from the checkpoint), train only its entries,
    and verify that every other entry is bit-identical to the start."""
    run, protected, given, info = ctx.run, ctx.protected, ctx.given, ctx.info
    cfg, model, w0 = run.cfg, run.model, run.w0
    if run.resumed_phase == "train":
        ticket = run.state["ticket"]  # extracted before the interruption
    else:
        ticket = ctx.source.build(ctx)
        run.ckpt.save_ticket(ticket)
        model = run.model  # a calibration may hand back another module (LoRA's, unloaded)
    info["ticket_nnz"] = ticket.nnz
    if run.sharded:  # calibration sharded the model; the sparse phase starts from a fresh copy
        run.model = model = _load(cfg, run.world)
        run.sharded = False
    prepare(model, ticket)
    if cfg.fsdp:
        _shard(run)
    # The prepared model holds the ticket now; dropping the other copies keeps the sparse phase at
    # O(k) memory beyond the model (the int64 ticket would be a third of it).
    del ticket
    given.clear()
    if run.state is not None:
        run.state["ticket"] = None
    release_freed_memory(run.world.device)  # what the calibration freed
    with heap_growth_limited(run.world.device):
        run.phase("train", delta_parameters(model), cfg.lr, steps)
    delta = extract_delta(model)
    if run.sharded:  # each rank checks its own rows of every weight
        info["frozen_verified"] = _verify_frozen_shards(
            model, w0, delta.ticket, protected, run.world
        )
        return delta
    unprepare(model)
    if ctx.source.finish is not None:
        delta = ctx.source.finish(ctx, delta, model)
    info["frozen_verified"] = _verify_frozen(named_weights(model), w0, delta.ticket, protected)
    info["frozen_verified_ranks"] = run.world.size
    return delta


def calibrate_and_select(
    run: _Run, k: int, protected: Ticket | None, info: dict, selector: str
) -> Ticket:
    """Run the ``--calibration`` of ``lota.sources.CALIBRATIONS``: it selects the ticket of ``k``
    entries from its scores with ``selector`` and leaves the targets at the starting weights."""
    cfg = run.cfg
    calibration = sources.CALIBRATIONS[cfg.calibration]
    ticket = calibration.select(run, k, protected, selector)
    info["calibration"] = cfg.calibration
    info["calibration_steps"] = cfg.calibration_steps
    info.update({name: getattr(cfg, name) for name in calibration.recorded})
    return ticket


def dense_calibration(
    run: _Run, k: int, protected: Ticket | None, selector: str, optimizer: str | None = None
) -> Ticket:
    """Train the targets densely for the calibration steps (with ``optimizer`` without momentum
    or weight decay, else the run's ``--optimizer``), select the ticket of ``k`` entries from the
    change with ``selector``, and reset the targets to the starting weights."""
    cfg, targets, w0 = run.cfg, run.targets, run.w0
    _train_only(run.model, targets)
    if cfg.fsdp:
        _shard(run)
    weights = named_weights(run.model)
    params = {n: weights[n] for n in targets}
    stored = _masters(run, params)
    lr = cfg.calibration_rate
    settings = cfg.settings(lr, cfg.calibration_steps)
    if optimizer is not None:
        settings = dataclasses.replace(
            settings, optimizer=optimizer, momentum=0.0, weight_decay=0.0
        )
    run.phase(
        "calibration",
        params,
        lr,
        cfg.calibration_steps,
        settings=settings,
        masters=bool(stored),
        selects=True,
    )
    with torch.no_grad():
        if run.sharded:
            ticket = _select_sharded(run, selector, weights, k, protected)
        else:
            ticket = selection.select(
                selector,
                targets,
                k,
                delta_fn=lambda n: (
                    weights[n].detach().float() - w0[n].to(weights[n].device).float()
                ),
                exclude=protected,
                seed=cfg.seed,
            )
        fault("extraction")
        restore_dtype_(params, stored)
        for n, p in params.items():
            p.requires_grad_(False)
            if not run.sharded:
                p.copy_(w0[n])  # reset: the sparse phase starts from the original weights
    return ticket


def _select_sharded(run: _Run, selector: str, weights, k: int, protected) -> Ticket:
    """The global top-k from each rank's rows of the calibrated weights (no tensor is gathered);
    then every rank receives the whole ticket (its indices only), which ``prepare`` needs."""
    local, first = {}, {}
    for n in run.targets:
        local[n], first[n] = dist.local_rows(weights[n])
    row = {n: math.prod(s[1:]) for n, s in run.targets.items()}
    shard = dist.Shard(
        run.world,
        numels={n: local[n].numel() for n in run.targets},
        offsets={n: first[n] * row[n] for n in run.targets},
    )

    def delta_fn(n):
        w0_rows = run.w0[n][first[n] : first[n] + local[n].shape[0]]
        return local[n].detach().float() - w0_rows.to(local[n].device).float()

    mine = selection.select(
        selector,
        run.targets,
        k,
        delta_fn=delta_fn,
        exclude=protected,
        seed=run.cfg.seed,
        shard=shard,
    )
    indices = {
        n: torch.cat(run.world.gather_varlen(mine.indices[n].to(run.world.device))).cpu()
        for n in sorted(run.targets)
    }
    return Ticket(shapes=dict(run.targets), indices=indices)


def _verify_frozen(weights, w0, ticket: Ticket, protected: Ticket | None) -> bool:
    """Every entry outside the ticket (and every protected entry) equals the start, bit for bit.

    Compared where the weights are (a GPU's never come over to the host): each starting tensor
    goes to the weight's device, takes the ticket's entries of the trained weight, and must then
    equal it bit for bit."""
    for n, idx in ticket.indices.items():
        now = weights[n].detach().reshape(-1)
        start = w0[n].to(device=now.device, dtype=now.dtype, copy=True).reshape(-1)
        if protected is not None and n in protected.indices:
            p = protected.indices[n].to(now.device)
            if not _same_bits(now[p], start[p]):
                raise LotaError(
                    f"protected entries of '{n}' changed", fix="report this as a lota bug"
                )
        idx = idx.to(now.device)
        start[idx] = now[idx]
        if not _same_bits(now, start):
            raise LotaError(
                f"entries outside the ticket of '{n}' changed", fix="report this as a lota bug"
            )
    return True


def _verify_frozen_shards(model, w0, ticket: Ticket, protected, world: dist.World) -> bool:
    """``_verify_frozen`` on this rank's rows of each sharded weight; true only if every rank's
    rows check out (a failure on any rank fails the run on all)."""
    from .sparse_model import _parametrized

    failed = None
    for name, module, attr, _ in _parametrized(model):
        local, start = dist.local_rows(module.parametrizations[attr].original)
        stop = start + local.shape[0]
        shard = dist.Shard(world, {name: local.numel()}, {name: start * local[0].numel()})
        rows = _rows_of(ticket, name, shard, local.shape)
        prot = None
        if protected is not None and name in protected.indices:
            prot = _rows_of(protected, name, shard, local.shape)
        try:
            _verify_frozen({name: local}, {name: w0[name][start:stop]}, rows, prot)
        except LotaError as e:
            failed = e
    if world.any(failed is not None):
        raise failed or LotaError(
            "frozen entries changed on another process", fix="report this as a lota bug"
        )
    return True


def _rows_of(t: Ticket, name: str, shard: dist.Shard, shape) -> Ticket:
    """Tensor ``name`` of ticket ``t`` restricted to a shard's rows, in local positions."""
    return Ticket(
        shapes={name: tuple(shape)}, indices={name: shard.local_indices(name, t.indices[name])}
    )


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )
