"""``lota adapt``: LoTA's three phases, LoTTO protection and the baselines through one pipeline.

Phases for ``method="lota"``: calibration (dense training of the targets for a few steps), exact
global top-k extraction of the task vector (disjoint from protected tickets), reset to the
starting weights, then sparse training of the ticket's entries only. Baselines: ``fft`` (dense
training of the targets), ``lora`` (PEFT), ``random`` and ``bottomk`` (tickets of the same size).
What each ``--method`` trains and where its ticket comes from is the table in ``lota.sources``.
Invariant, checked at the end of every sparse run: every entry outside the ticket, and every
protected entry, is bit-identical to the starting model.

The recipe reads top to bottom and calls down into the library: plan (``lota.plan``), load
(``lota.plan``), ticket (``lota.sources``, ``lota.calibrations``), train (``lota.trainers``,
``lota.phases``), verify (``lota.frozen``), write (``lota.run_folder``).
"""

from __future__ import annotations

import time

import torch

from . import dist, sources
from .adapt_config import AdaptConfig as AdaptConfig  # the settings, beside their options
from .checkpoint import DIRNAME, Checkpointer
from .data import batches, pad_id
from .delta import SparseDelta, apply_delta_, saved_change
from .errors import InputError
from .fileio import fault
from .frozen import verify
from .input_files import check_folder_files
from .models import load_model
from .phases import Run, counted
from .plan import Inputs, Plan, load_inputs, make_plan
from .run_folder import Hold, checkpointer, finished, write_outputs, write_summary
from .targets import named_weights, untie_embeddings, untied_record
from .train import MetricsLog
from .trainers import ticket_of, train_dense, train_sparse
from .weights import WeightReader


def adapt(cfg: AdaptConfig) -> dict:
    """Run one adaptation; returns a summary (also written to ``summary.json`` beside the outputs).

    A run killed at any moment, before its first checkpoint too, is taken up by the same command
    run again and ends with the same outputs as an uninterrupted run. While it runs, the output
    folder is locked: a second run into it is refused.
    """
    with dist.deterministic(cfg.deterministic):  # before CUDA is touched
        plan = make_plan(cfg)
        hold = Hold.take(plan.out, plan.world)
        try:
            info = _adapt(plan, hold)
        except BaseException as e:
            hold.close(e)
            raise
        hold.close(None)
        return info


def _adapt(plan: Plan, hold: Hold) -> dict:
    t_start = time.perf_counter()
    cfg, world, out = plan.cfg, plan.world, plan.out
    check_folder_files(out, "output", [DIRNAME])  # its files are read by name, from here on
    done = finished(cfg, out)
    if done is not None:
        return {**done, "already_finished": True}
    ckpt, resuming = checkpointer(cfg, out, world)
    # load: everything that can be wrong with the inputs is refused before anything is written
    inputs = load_inputs(plan)
    ckpt.base_fingerprint = inputs.base_fp  # what every checkpoint records
    state = _resumed_state(ckpt, inputs, cfg.model) if resuming else None
    world.barrier()  # every rank has read the inputs and the checkpoint before anything is written
    hold.started = True
    run = _start(plan, ckpt, inputs, state, resuming)
    info = _info(plan, inputs, run)
    # ticket, train, verify
    if inputs.source is None:
        delta = train_dense(run, inputs.steps)
    else:
        ctx = sources.Context(
            cfg, inputs.targets, inputs.k, inputs.protected, inputs.given, run, info, inputs.source
        )
        box = [ticket_of(ctx)]  # emptied by the trainer: the model is then its only holder
        delta = train_sparse(ctx, box, inputs.steps)
        verify(run, delta.ticket, inputs.protected, info)
    delta.ticket.base_fingerprint = inputs.base_fp
    delta.check_finite("trained delta")
    model = _trained_model(run, delta)
    _record_trained(info, delta, run)
    # write (the main process alone)
    if not world.main:
        world.barrier()
        return _finish(info, run.log, t_start)
    delta, values_dtype = _delta_to_write(run, delta, model)
    write_outputs(cfg, out, delta, values_dtype, run.adapter, model, inputs.tokenizer, info)
    _finish(info, run.log, t_start)
    run.log.close()
    write_summary(out, info)
    ckpt.clear()
    world.barrier()
    return info


def _resumed_state(ckpt: Checkpointer, inputs: Inputs, model: str) -> dict:
    """The interrupted run's checkpoint, refused if the model changed since it started."""
    state = ckpt.load(inputs.targets)
    if state is not None and state["base_fingerprint"] != inputs.base_fp:
        raise InputError(
            "the model changed since the interrupted run started (its fingerprint differs)",
            model,
            "restore the original model, or pass --restart to start over",
        )
    return state


def _start(
    plan: Plan, ckpt: Checkpointer, inputs: Inputs, state: dict | None, resuming: bool
) -> Run:
    """Mark the folder as this run's, open the metrics log and the data stream (past the batches
    an interrupted run served): the run every phase trains in."""
    cfg, world, out = plan.cfg, plan.world, plan.out
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
    stream = batches(
        inputs.data,
        cfg.batch_size,
        cfg.seed,
        pad_id(inputs.tokenizer),
        skip=served[0],
        group_by_length=cfg.group_by_length,
    )
    return Run(
        cfg, inputs.model, inputs.targets, w0, log, ckpt, counted(stream, served), state, served,
        world, stored_dtype=inputs.stored_dtype,
        dense=sources.METHODS[cfg.method].trainer == "dense",
    )  # fmt: skip


def _info(plan: Plan, inputs: Inputs, run: Run) -> dict:
    """The summary's first entries: what the run is, on what, and where it resumed from."""
    state, world = run.state, plan.world
    return {
        "method": plan.requested,
        "numel": inputs.numel,
        "base_fingerprint": inputs.base_fp,
        "examples": len(inputs.data),
        "steps": inputs.steps,
        "resumed_from": f"{state['phase']}:{state['step']}" if state else None,
        "processes": world.size,
        "grad_accum": plan.cfg.grad_accum,
        "fsdp": plan.cfg.fsdp,
        "device": str(world.device),
        "weights_dtype": str(inputs.stored_dtype).removeprefix("torch."),
        **untied_record(inputs.model),
    }


def _trained_model(run: Run, delta: SparseDelta) -> torch.nn.Module | None:
    """The trained model as plain weights; for a sharded run, the base plus the delta, loaded by
    the main process when ``--save-model`` writes it."""
    if not run.sharded:
        return run.model
    cfg = run.cfg
    if not (cfg.save_model and run.world.main):
        return None
    model = load_model(cfg.model, cfg.dtype)
    untie_embeddings(model, delta.names)
    apply_delta_(named_weights(model), delta)
    return model


def _delta_to_write(
    run: Run, delta: SparseDelta, model: torch.nn.Module | None
) -> tuple[SparseDelta, str]:
    """The delta the run writes, and the values dtype ``format.save`` writes it in.

    ``--values-dtype auto`` on 16-bit weights: the change the saved model holds (``saved_change``;
    of ``base + delta`` where the model is not at hand), stored by ``format.save`` in 16 bits
    with float32 values where 16 bits do not hold it. ``lota apply`` of the file gives the saved
    model bit for bit, in about half the bytes of the float32 master values. On float32 weights
    ``auto`` writes the float32 values."""
    values_dtype = run.cfg.values_dtype
    if values_dtype != "auto":
        return delta, values_dtype
    if run.stored_dtype not in (torch.bfloat16, torch.float16):
        return delta, "float32"
    saved = None if model is None else named_weights(model)
    return saved_change(delta, run.w0, run.stored_dtype, saved), "auto"


def _record_trained(info: dict, delta: SparseDelta, run: Run) -> None:
    info.update(k=delta.nnz, density=delta.density, trained_parameters=delta.nnz)
    if run.adapter is not None:  # LoRA trains its adapter; the delta is its merged change
        info.update(
            trained_parameters=run.adapter["parameters"],
            lora_r=run.cfg.lora_r,
            lora_layers=run.adapter["layers"],
        )


def _finish(info: dict, log: MetricsLog, t_start: float) -> dict:
    losses = [r["loss"] for r in log.records if r["phase"] == "train"]
    info.update(
        final_loss=losses[-1] if losses else None, seconds=round(time.perf_counter() - t_start, 2)
    )
    return info
