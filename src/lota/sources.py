"""What ``lota adapt --method`` trains and where its ticket comes from: one table.

A ``--method`` name is a trainer (dense training of the targets, PEFT LoRA, or sparse training of
a ticket's entries) over its targets, and for the sparse trainer a ticket source. Each source is
one ``Source`` entry here: its name, what it needs, the settings it reads and the function that
builds the ticket. A source is the method's own, or chosen by a setting (``--ticket``,
``--calibrated``, ``--protect-mode flip``), the first such in table order winning.
``AdaptConfig.validate``, ``lota adapt``'s dispatch, the ``--method`` help and the lab's lists read
this table and nothing else, so a new source is one entry in this file. How the calibrating
sources (``lota``, ``bottomk``) score the entries is ``--calibration``: one module per calibration
in ``lota.calibrations``.

Invariant: importing this module loads neither torch nor transformers (the CLI builds its parser
from it); implementations import what they need when they run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .calibrations import CALIBRATIONS
from .calibrations import DEFAULT as DEFAULT_CALIBRATION
from .errors import InputError

if TYPE_CHECKING:
    from .delta import SparseDelta
    from .ticket import Ticket


# ---------------------------------------------------------------------------- what is trained
@dataclass(frozen=True)
class Trainer:
    """What a method trains. ``sparse``: only a ticket's entries (else every target entry);
    ``fsdp_refusal``: why it cannot run under ``--fsdp``, if it cannot."""

    name: str
    help: str
    sparse: bool
    fsdp_refusal: str | None = None


TRAINERS = {
    t.name: t
    for t in (
        Trainer("dense", "every entry of the targets", sparse=False),
        Trainer(
            "lora",
            "a PEFT LoRA adapter on the targets' linear layers, merged at the end",
            sparse=False,
            fsdp_refusal="--fsdp does not shard PEFT LoRA models; run --method lora without --fsdp",
        ),
        Trainer("sparse", "only the entries of the ticket", sparse=True),
    )
}


# ---------------------------------------------------------------------------- ticket sources
@dataclass
class Context:
    """What a source builds its ticket from: the run's settings, targets, exact ``k``, the
    protected entries, the ``--ticket`` file's ticket, and the run itself (for a calibration)."""

    cfg: Any  # the AdaptConfig
    targets: dict[str, tuple[int, ...]]
    k: int
    protected: Ticket | None
    given: list[Ticket]
    run: Any  # the run (lota.phases.Run): model, data stream, log, checkpoints
    info: dict  # the run's summary, which a source may add to
    source: Source

    @property
    def selector(self) -> str:
        """The selector of the method's own source (``magnitude`` for lota, ``bottomk``...)."""
        return SOURCES[METHODS[self.cfg.method].source].selector


@dataclass(frozen=True)
class Source:
    """Where a ticket comes from.

    ``needs``: what it takes besides the base ("calibration", "file", "model folder",
    "protect files", "nothing"). ``settings``: the ``AdaptConfig`` fields it reads. ``build``:
    the ticket from a ``Context``. ``chosen``: for a source a setting picks, whether ``cfg``
    picks it, with ``option`` the flag and ``methods`` the ``--method`` names it works with (all,
    if empty); ``exclusive`` sources refuse each other. ``requires``: the settings error, if any,
    of a chosen source. ``sized``: its ticket has the size ``--sparsity`` gives (a file's has
    its own). ``check``: verifies its inputs before anything is written. ``finish``: turns the
    trained delta into the run's delta. ``resolve``: settings it rewrites before validation.
    """

    name: str
    help: str
    needs: str
    settings: tuple[str, ...]
    build: Callable[[Context], Ticket]
    selector: str | None = None
    option: str | None = None
    chosen: Callable[[Any], bool] | None = None
    methods: tuple[str, ...] = ()
    exclusive: bool = False
    requires: Callable[[Any], str | None] | None = None
    sized: bool = True
    fsdp_refusal: str | None = None
    check: Callable[[Any], None] | None = None
    finish: Callable[[Context, SparseDelta, Any], SparseDelta] | None = None
    resolve: Callable[[Any], dict] | None = None


SOURCES: dict[str, Source] = {}


def register(source: Source) -> Source:
    """Add ``source`` to the table (after the others: earlier setting-chosen sources win)."""
    if source.name in SOURCES:
        raise ValueError(f"ticket source '{source.name}' is registered twice")
    SOURCES[source.name] = source
    return source


def _given(ctx: Context) -> Ticket:
    """The ``--ticket`` file's ticket, over every target (tensors it lacks train nothing)."""
    import torch

    from .ticket import Ticket

    given = ctx.given[0]
    empty = torch.zeros(0, dtype=torch.long)
    return Ticket(shapes=ctx.targets, indices={n: given.indices.get(n, empty) for n in ctx.targets})


def _complement(ctx: Context) -> Ticket:
    return ctx.protected.complement()


def _flip_back(ctx: Context, delta: SparseDelta, model) -> SparseDelta:
    """The run trained the whole complement of the protected entries; the task's own ticket is
    the top-k of that change, and the model keeps only it."""
    import torch

    from .delta import apply_delta_, delta_from_weights
    from .selection import select
    from .targets import named_weights

    trained = delta.to_dense()
    own = select(
        ctx.source.selector, ctx.targets, ctx.k, delta_fn=trained.__getitem__, exclude=ctx.protected
    )
    w0 = ctx.run.w0
    delta = delta_from_weights(own, w0, named_weights(model))
    weights = named_weights(model)
    with torch.no_grad():
        for n in ctx.targets:
            weights[n].copy_(w0[n])
    apply_delta_(weights, delta)
    return delta


def _random(ctx: Context) -> Ticket:
    from .selection import select

    return select(ctx.source.selector, ctx.targets, ctx.k, exclude=ctx.protected, seed=ctx.cfg.seed)


def _calibration(ctx: Context) -> Ticket:
    """Run the ``--calibration``: it selects the ticket of ``k`` entries from its scores with the
    source's selector and leaves the targets at the starting weights."""
    cfg = ctx.cfg
    calibration = CALIBRATIONS[cfg.calibration]
    ticket = calibration.select(ctx.run, ctx.k, ctx.protected, ctx.source.selector)
    ctx.info["calibration"] = cfg.calibration
    ctx.info["calibration_steps"] = cfg.calibration_steps
    ctx.info.update({name: getattr(cfg, name) for name in calibration.recorded})
    return ticket


def _check_calibrated(cfg) -> None:
    """The fine-tuned model exists and has the base's target tensors."""
    from .task_vectors import model_pair

    model_pair(cfg.model, cfg.calibrated, cfg.targets)


def _from_calibrated(ctx: Context) -> Ticket:
    """The task vector of a model already fine-tuned from the base, read tensor by tensor."""
    from .task_vectors import model_pair, select_difference
    from .train import heap_growth_limited

    cfg = ctx.cfg
    rb, rt, shapes = model_pair(cfg.model, cfg.calibrated, cfg.targets)
    # per-tensor temporaries (read on the host) must not fragment the heap the ticket grows in
    with heap_growth_limited("cpu"):
        ticket = select_difference(rb, rt.get, shapes, ctx.k, ctx.selector, ctx.protected)
    ctx.info["calibrated_from"] = cfg.calibrated
    return ticket


def _ks_tokens(cfg) -> dict:
    """``--tokens``: the folder written by ``lota ks`` (its ``ticket.safetensors``) or a ticket."""
    if not cfg.ticket:
        raise InputError(
            f"--method {cfg.method} needs the selected tokens",
            "--tokens",
            "pass the folder written by 'lota ks'",
        )
    ticket = Path(cfg.ticket)
    if ticket.is_dir():
        ticket = ticket / "ticket.safetensors"
    return {"ticket": str(ticket)}


_CALIBRATING = (
    "calibration_steps",
    "calibration_lr",
    "lr",
    "seed",
    "calibration",
    *sorted({f for c in CALIBRATIONS.values() for f in c.settings}),
)
# Setting-chosen sources come first, in the order they win: --ticket, then flip, then --calibrated.
register(
    Source(
        "file",
        "the ticket of a ticket or delta file (--ticket); no calibration",
        needs="file",
        settings=("ticket",),
        build=_given,
        option="--ticket",
        chosen=lambda cfg: bool(cfg.ticket),
        methods=("lota",),
        exclusive=True,
        sized=False,
    )
)
register(
    Source(
        "flip",
        "the complement of the protected tickets; the task keeps the top-k of what it trained",
        needs="protect files",
        settings=("protect", "protect_mode"),
        build=_complement,
        selector="magnitude",
        option="--protect-mode flip",
        chosen=lambda cfg: cfg.protect_mode == "flip",
        requires=lambda cfg: None if cfg.protect else "--protect-mode flip needs --protect FILE",
        fsdp_refusal="--protect-mode flip does not run under --fsdp; use constrained or drop --fsdp",
        finish=_flip_back,
    )
)
register(
    Source(
        "calibrated",
        "the task vector of a model already fine-tuned from the base (--calibrated)",
        needs="model folder",
        settings=("calibrated", "targets"),
        build=_from_calibrated,
        option="--calibrated",
        chosen=lambda cfg: bool(cfg.calibrated),
        methods=("lota", "bottomk"),
        exclusive=True,
        check=_check_calibrated,
    )
)
register(
    Source(
        "calibration",
        "dense calibration steps, then the exact top-k of |task vector|",
        needs="calibration",
        settings=_CALIBRATING,
        build=_calibration,
        selector="magnitude",
    )
)
register(
    Source(
        "bottomk",
        "the same calibration, then the k entries of smallest |task vector|",
        needs="calibration",
        settings=_CALIBRATING,
        build=_calibration,
        selector="bottomk",
    )
)
register(
    Source(
        "random",
        "k entries drawn uniformly at random",
        needs="nothing",
        settings=("seed",),
        build=_random,
        selector="random",
    )
)
register(
    Source(
        "ks-rows",
        "the rows of a 'lota ks' ticket in the input embedding (--tokens); runs as --ticket",
        needs="file",
        settings=("ticket",),
        build=_given,
        sized=False,
        resolve=_ks_tokens,
    )
)


# ---------------------------------------------------------------------------- --method names
@dataclass(frozen=True)
class Method:
    """A ``--method`` name: its ``trainer``, its own ticket ``source`` (sparse trainers), the
    learning rates the lab searches, and its place in the lab's single-task comparison
    (``lab``; None: not compared). ``embedding_as``: the method trains only the input embedding
    and runs as this method with ``--targets`` set to it."""

    name: str
    help: str
    trainer: str
    source: str | None
    lr_grid: tuple[float, ...]
    lab: int | None = None
    embedding_as: str | None = None

    @property
    def sparse(self) -> bool:
        return TRAINERS[self.trainer].sparse


_SPARSE_LRS = (3e-3, 1e-2, 3e-2)
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "lota", "LoTA: calibration, then the ticket", "sparse", "calibration", _SPARSE_LRS, 2
        ),
        Method("fft", "full fine-tuning of the targets", "dense", None, (3e-4, 1e-3, 3e-3), 0),
        Method("lora", "PEFT LoRA on the targets", "lora", None, (1e-3, 3e-3, 1e-2), 1),
        Method("random", "a random ticket of the same size", "sparse", "random", _SPARSE_LRS, 3),
        Method(
            "bottomk", "the bottom-k ticket of the same size", "sparse", "bottomk", _SPARSE_LRS, 4
        ),
        Method(
            "embeddings",
            "dense training of the input embedding alone",
            "dense",
            None,
            _SPARSE_LRS,
            embedding_as="fft",
        ),
        Method(
            "ks-lottery",
            "the input embedding's rows a 'lota ks' ticket selects",
            "sparse",
            "ks-rows",
            _SPARSE_LRS,
            embedding_as="lota",
        ),
    )
}
DEFAULT_METHOD = "lota"


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def method_help(default: str = DEFAULT_METHOD) -> str:
    """The help of ``--method``: every name, in table order, and the default."""
    return " | ".join(METHODS) + f" (default {default})"


def lab_methods() -> tuple[str, ...]:
    """The methods the lab's single-task claim compares, in its order."""
    ranked = sorted((m.lab, m.name) for m in METHODS.values() if m.lab is not None)
    return tuple(name for _, name in ranked)


def lr_grids() -> dict[str, list[float]]:
    """``{method: learning rates the lab searches}``."""
    return {m.name: list(m.lr_grid) for m in METHODS.values()}


# ---------------------------------------------------------------------------- reading the table
def resolve(cfg):
    """``cfg`` as it runs: a method of the input embedding becomes its ``embedding_as`` method
    with ``--targets`` set to that embedding (and its source's settings rewritten). Where the
    output head is tied to it, the run gives the head its own frozen copy first
    (``phases.load_run_model``), so that only the input embedding trains."""
    m = METHODS.get(cfg.method)
    if m is None or m.embedding_as is None:
        return cfg
    import re

    from .ks import input_embedding
    from .weights import WeightReader

    if cfg.targets is not None:
        raise InputError(
            f"--method {cfg.method} chooses its own target (the input embedding)",
            "--targets",
            "drop --targets",
        )
    name = input_embedding(WeightReader(cfg.model, "model"))
    changes = {"method": m.embedding_as, "targets": "^" + re.escape(name) + "$"}
    own = SOURCES.get(m.source) if m.source else None
    if own is not None and own.resolve is not None:
        changes.update(own.resolve(cfg))
    return dataclasses.replace(cfg, **changes)


def chosen(cfg) -> list[Source]:
    """The sources ``cfg``'s settings pick, in table order."""
    return [s for s in SOURCES.values() if s.chosen is not None and s.chosen(cfg)]


def source_for(cfg) -> Source:
    """The source of a sparse run's ticket: the first a setting picks, else the method's own."""
    picked = chosen(cfg)
    return picked[0] if picked else SOURCES[METHODS[cfg.method].source]


def calibrates(cfg) -> bool:
    """Whether ``cfg``'s method calibrates by default and no ``--ticket`` replaces that."""
    m = METHODS.get(cfg.method)
    return (
        m is not None
        and m.source is not None
        and SOURCES[m.source].needs == "calibration"
        and not cfg.ticket
    )


def option_errors(cfg) -> list[str]:
    """Setting-chosen sources given with a method they do not work with, or with each other."""
    picked = chosen(cfg)
    errors = [
        f"{s.option} works with --method {' or '.join(s.methods)} only"
        for s in picked
        if s.methods and cfg.method not in s.methods
    ]
    exclusive = sorted(s.option for s in picked if s.exclusive)
    if len(exclusive) > 1:
        errors.append(f"give {' or '.join(exclusive)}, not both")
    return errors


def requirement_errors(cfg) -> list[str]:
    """What the chosen sources need and ``cfg`` lacks."""
    return [e for s in chosen(cfg) if s.requires is not None and (e := s.requires(cfg))]


def fsdp_errors(cfg) -> list[str]:
    """Why ``cfg``'s trainer, chosen sources or calibration cannot run under ``--fsdp``."""
    m = METHODS.get(cfg.method)
    refusals = [TRAINERS[m.trainer].fsdp_refusal] if m is not None else []
    refusals += [s.fsdp_refusal for s in chosen(cfg)]
    if calibration_runs(cfg) and cfg.calibration in CALIBRATIONS:
        refusals.append(CALIBRATIONS[cfg.calibration].fsdp_refusal)
    return [r for r in refusals if r]


def calibration_runs(cfg) -> bool:
    """Whether ``cfg``'s ticket comes from a calibration run (its sparse method's own source
    calibrates and no setting picks another source)."""
    m = METHODS.get(cfg.method)
    return m is not None and m.sparse and source_for(cfg).needs == "calibration"


def calibration_errors(cfg) -> list[str]:
    """An unknown ``--calibration`` or its settings' values, and a calibration other than the
    default where no calibration runs."""
    errors = []
    if cfg.calibration not in CALIBRATIONS:
        errors.append(f"--calibration '{cfg.calibration}' is not one of {', '.join(CALIBRATIONS)}")
    for c in CALIBRATIONS.values():
        if c.errors is not None:
            errors += c.errors(cfg)
    m = METHODS.get(cfg.method)
    if cfg.calibration != DEFAULT_CALIBRATION and m is not None and not calibration_runs(cfg):
        calibrating = [
            n for n, x in METHODS.items() if x.source and SOURCES[x.source].needs == "calibration"
        ]
        errors.append(
            f"--calibration {cfg.calibration} needs a run that calibrates (--method "
            f"{' or '.join(calibrating)}, without --ticket, --calibrated or --protect-mode flip)"
        )
    return errors
