"""``lota adapt``: LoTA's three phases, LoTTO protection and the baselines through one pipeline.

Phases for ``method="lota"``: calibration (dense training of the targets for a few steps), exact
global top-k extraction of the task vector (disjoint from protected tickets), reset to the
starting weights, then sparse training of the ticket's entries only. Baselines: ``fft`` (dense
training of the targets), ``lora`` (PEFT), ``random`` and ``bottomk`` (tickets of the same size).
Invariant, checked at the end of every sparse run: every entry outside the ticket, and every
protected entry, is bit-identical to the starting model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from . import format as fmt
from . import selection
from .data import batches, read_jsonl, steps_for, tokenize
from .delta import SparseDelta, apply_delta_, delta_from_weights
from .errors import InputError, LotaError
from .fileio import write_json, write_text
from .models import (
    load_model,
    load_tokenizer,
    model_fingerprint,
    named_weights,
    resolve_targets,
    save_model,
)
from .sparse_model import extract_delta, prepare, trainable_parameters, unprepare
from .ticket import Ticket
from .train import OPTIMIZERS, MetricsLog, TrainSettings, train

METHODS = ("lota", "fft", "lora", "random", "bottomk")
PROTECT_MODES = ("constrained", "flip")


@dataclass
class AdaptConfig:
    model: str
    data: str
    out: str
    method: str = "lota"
    sparsity: str = "0.9"
    calibration_steps: int = 8
    calibration_lr: float | None = None
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-5
    batch_size: int = 8
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    targets: str | None = None
    ticket: str | None = None
    protect: list[str] = field(default_factory=list)
    protect_mode: str = "constrained"
    max_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    dtype: str = "auto"
    values_dtype: str = "float32"
    save_model: bool = False
    force: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Check every setting, reporting all problems at once."""
        errors = []
        if self.method not in METHODS:
            errors.append(f"--method '{self.method}' is not one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            errors.append(f"--optimizer '{self.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
        if self.protect_mode not in PROTECT_MODES:
            errors.append(
                f"--protect-mode '{self.protect_mode}' is not one of {', '.join(PROTECT_MODES)}"
            )
        try:
            selection.parse_sparsity(self.sparsity)
        except InputError as e:
            errors.append(e.what)
        if not self.lr > 0:
            errors.append(f"--lr {self.lr} must be > 0")
        for name, lo in [("batch_size", 1), ("max_length", 2), ("lora_r", 1), ("lora_alpha", 1)]:
            if getattr(self, name) < lo:
                errors.append(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= {lo}")
        if self.calibration_lr is not None and not self.calibration_lr > 0:
            errors.append(f"--calibration-lr {self.calibration_lr} must be > 0")
        if self.steps is not None and self.steps < 1:
            errors.append(f"--steps {self.steps} must be >= 1")
        if self.epochs is not None and not self.epochs > 0:
            errors.append(f"--epochs {self.epochs} must be > 0")
        if self.steps is not None and self.epochs is not None:
            errors.append("give --steps or --epochs, not both")
        if self.calibration_steps < 1 and self.method in ("lota", "bottomk") and not self.ticket:
            errors.append(f"--calibration-steps {self.calibration_steps} must be >= 1")
        if self.weight_decay < 0 or self.momentum < 0:
            errors.append("--weight-decay and --momentum must be >= 0")
        if self.ticket and self.method not in ("lota",):
            errors.append("--ticket works with --method lota only")
        if self.protect and self.method in ("fft", "lora"):
            errors.append(
                f"--protect needs a sparse method; --method {self.method} trains every target entry"
            )
        if self.protect_mode == "flip" and not self.protect:
            errors.append("--protect-mode flip needs --protect FILE")
        if errors:
            raise InputError("; ".join(errors), "lota adapt", "fix the arguments above")

    def settings(self, lr: float, steps: int) -> TrainSettings:
        return TrainSettings(
            lr=lr,
            steps=steps,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
        )


def _load_tickets(paths: list[str], targets: dict[str, tuple[int, ...]], what: str) -> list[Ticket]:
    out = []
    for p in paths:
        obj = fmt.load(p)
        t = obj.ticket if isinstance(obj, SparseDelta) else obj
        try:
            Ticket(
                shapes=targets,
                indices={n: t.indices.get(n, torch.zeros(0, dtype=torch.long)) for n in targets},
            ).check_compatible(t, what)
        except LotaError as e:
            raise InputError(e.what, p, e.fix) from None
        out.append(t)
    return out


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError("output path is a file", str(out), "choose a folder for --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(
            "output folder exists and is not empty",
            str(out),
            "choose a new --out, or pass --force to replace lota's files in it",
        )


def adapt(cfg: AdaptConfig) -> dict:
    """Run one adaptation; returns a summary (also written to ``summary.json`` beside the outputs)."""
    cfg.validate()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    _check_out(out, cfg.force)
    # Everything that can be wrong with the inputs is checked before anything is written.
    examples = read_jsonl(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.dtype)
    data = tokenize(examples, tokenizer, cfg.max_length, where=cfg.data)
    targets = resolve_targets(model, cfg.targets)
    base_fp = model_fingerprint(model)
    protected = (
        Ticket.union(_load_tickets(cfg.protect, targets, "protect file"), targets)
        if cfg.protect
        else None
    )
    given = _load_tickets([cfg.ticket], targets, "ticket") if cfg.ticket else []
    if given and protected is not None and given[0].overlap(protected):
        raise InputError(
            f"the ticket shares {given[0].overlap(protected):,} entries with the protected tickets",
            cfg.ticket,
            "extract a ticket with --protect, or drop --protect",
        )
    numel = sum(selection.math.prod(s) for s in targets.values())
    k = selection.ticket_size(cfg.sparsity, numel)
    if protected is not None and cfg.protect_mode == "constrained" and k > numel - protected.nnz:
        raise InputError(
            f"the ticket needs {k:,} entries but only {numel - protected.nnz:,} are not protected",
            "--protect",
            "raise --sparsity or protect fewer tickets",
        )
    steps = steps_for(len(data), cfg.batch_size, cfg.steps, cfg.epochs)

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    log = MetricsLog(metrics_path)
    weights = named_weights(model)
    w0 = {n: weights[n].detach().clone() for n in targets}
    stream = batches(data, cfg.batch_size, cfg.seed, tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    info: dict = {
        "method": cfg.method,
        "numel": numel,
        "base_fingerprint": base_fp,
        "examples": len(data),
        "steps": steps,
    }

    if cfg.method in ("fft", "lora"):
        delta = _dense_run(cfg, model, targets, w0, stream, steps, log)
    else:
        delta = _sparse_run(cfg, model, targets, w0, stream, steps, log, k, protected, given, info)
    delta.ticket.base_fingerprint = base_fp
    delta.check_finite("trained delta")

    resolved = asdict(cfg)
    info.update(k=delta.nnz, density=delta.density)
    info["delta_bytes"] = fmt.save(
        delta, out / "delta.safetensors", config=resolved, values_dtype=cfg.values_dtype
    )
    write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    if cfg.save_model:
        save_model(
            model,
            tokenizer,
            out / "model",
            extra={
                "base_fingerprint": base_fp,
                "method": cfg.method,
                "delta": "../delta.safetensors",
            },
        )
    losses = [r["loss"] for r in log.records if r["phase"] == "train"]
    info.update(
        final_loss=losses[-1] if losses else None, seconds=round(time.perf_counter() - t_start, 2)
    )
    write_json(out / "summary.json", info)
    return info


def _dense_run(cfg, model, targets, w0, stream, steps, log) -> SparseDelta:
    if cfg.method == "fft":
        weights = named_weights(model)
        for p in model.parameters():
            p.requires_grad_(False)
        params = [weights[n].requires_grad_(True) for n in targets]
        train(model, params, stream, cfg.settings(cfg.lr, steps), "train", log, cfg.progress)
        for p in params:
            p.requires_grad_(False)
    else:
        model = _train_lora(cfg, model, targets, stream, steps, log)
    full = Ticket(
        shapes=targets,
        indices={n: torch.arange(selection.math.prod(s)) for n, s in targets.items()},
    )
    return delta_from_weights(full, w0, named_weights(model))


def _train_lora(cfg, model, targets, stream, steps, log):
    from peft import LoraConfig, get_peft_model

    modules = sorted({n.rsplit(".", 1)[0] for n in targets if n.endswith(".weight")})
    if len(modules) != len(targets):
        raise InputError(
            "LoRA needs targets that are weights of linear layers",
            "--targets",
            "match '.weight' parameters of linear layers, or use another --method",
        )
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=modules,
        lora_dropout=0.0,
        bias="none",
    )
    peft_model = get_peft_model(model, lcfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    train(peft_model, params, stream, cfg.settings(cfg.lr, steps), "train", log, cfg.progress)
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def _sparse_run(
    cfg, model, targets, w0, stream, steps, log, k, protected, given, info
) -> SparseDelta:
    weights = named_weights(model)
    flip = protected is not None and cfg.protect_mode == "flip"
    if given:
        ticket = given[0]
        ticket = Ticket(
            shapes=targets,
            indices={n: ticket.indices.get(n, torch.zeros(0, dtype=torch.long)) for n in targets},
        )
    elif flip:
        ticket = protected.complement()
    elif cfg.method == "random":
        ticket = selection.select("random", targets, k, exclude=protected, seed=cfg.seed)
    else:
        ticket = _calibrate_and_select(cfg, model, targets, w0, stream, log, k, protected, info)
    info["ticket_nnz"] = ticket.nnz
    prepare(model, ticket)
    train(
        model,
        trainable_parameters(model),
        stream,
        cfg.settings(cfg.lr, steps),
        "train",
        log,
        cfg.progress,
    )
    delta = extract_delta(model)
    unprepare(model)
    if flip:
        # "Flip": the run trained the whole complement; the task's own ticket is the top-k of that change.
        trained = delta.to_dense()
        own = selection.select(
            "magnitude", targets, k, delta_fn=trained.__getitem__, exclude=protected
        )
        delta = delta_from_weights(own, w0, named_weights(model))
        with torch.no_grad():
            for n in targets:
                weights[n].copy_(w0[n])
        apply_delta_(named_weights(model), delta)
    info["frozen_verified"] = _verify_frozen(named_weights(model), w0, delta.ticket, protected)
    return delta


def _calibrate_and_select(cfg, model, targets, w0, stream, log, k, protected, info) -> Ticket:
    weights = named_weights(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [weights[n].requires_grad_(True) for n in targets]
    lr = cfg.calibration_lr if cfg.calibration_lr is not None else cfg.lr
    train(
        model,
        params,
        stream,
        cfg.settings(lr, cfg.calibration_steps),
        "calibration",
        log,
        cfg.progress,
    )
    selector = "bottomk" if cfg.method == "bottomk" else "magnitude"
    with torch.no_grad():
        ticket = selection.select(
            selector,
            targets,
            k,
            delta_fn=lambda n: weights[n].detach() - w0[n],
            exclude=protected,
            seed=cfg.seed,
        )
        for n, p in zip(targets, params):
            p.requires_grad_(False)
            p.copy_(w0[n])  # reset: the sparse phase starts from the original weights
    info["calibration_steps"] = cfg.calibration_steps
    return ticket


def _verify_frozen(weights, w0, ticket: Ticket, protected: Ticket | None) -> bool:
    """Every entry outside the ticket (and every protected entry) equals the start, bit for bit."""
    for n, idx in ticket.indices.items():
        outside = torch.ones(w0[n].numel(), dtype=torch.bool)
        outside[idx] = False
        now, start = weights[n].detach().reshape(-1), w0[n].reshape(-1)
        if not _same_bits(now[outside], start[outside]):
            raise LotaError(
                f"entries outside the ticket of '{n}' changed", fix="report this as a lota bug"
            )
        if protected is not None and n in protected.indices:
            p = protected.indices[n]
            if not _same_bits(now[p], start[p]):
                raise LotaError(
                    f"protected entries of '{n}' changed", fix="report this as a lota bug"
                )
    return True


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


CONFIG_FIELDS = [f.name for f in fields(AdaptConfig)]
