"""Hot-swap: one base model in memory, many sparse task vectors switched in and out in place.

``DeltaBank(model)`` holds deltas by name. Activating one saves the model's current values at the
delta's k entries and writes ``saved + delta`` there, with the arithmetic of ``lota apply`` (so
the model then equals the folder ``lota apply`` writes, bit for bit); deactivating writes the
saved values back. Each switch reads and writes only the k entries (O(k) time and memory), and
nothing is added to the forward pass, so ``model.generate`` runs at the base model's speed.

Invariants: the base is restored bit for bit after any number of switches, in any dtype; an entry
is never written by two active deltas unless overlap was explicitly allowed (then the active
deltas form a stack, and deactivating one below others takes those off and puts them back, so
the result is always what activating the remaining deltas in their order on the base gives);
before restoring, the bank checks that the entries still hold what it wrote, so a change made in
between (training, a user's own write) is refused rather than silently discarded; and every
change of the active set is a transaction: a refusal, an error or Ctrl-C part way through puts
back every entry it wrote, so the weights and ``active`` always agree.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .delta import SparseDelta, arithmetic_dtype, finite_sum
from .errors import InputError, MismatchError
from .settings import check_factors
from .ticket import TicketError, check_indices

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class _Part:
    """One tensor of a registered delta: where it goes and its entries (on the weight's device)."""

    name: str
    module: nn.Module
    attr: str
    index: torch.Tensor  # int64, sorted, unique
    values: torch.Tensor  # the delta's own dtype


@dataclass
class _Entry:
    name: str
    label: str
    parts: list[_Part]
    nnz: int


@dataclass
class _Active:
    name: str
    scale: float
    saved: list[torch.Tensor]  # the values before activation, in the weight's dtype
    written: list[torch.Tensor] | None  # what activation wrote (kept when verifying)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a floating-point tensor, so that -0.0 and NaN payloads compare exactly."""
    return t.view(_INT_VIEW[t.element_size()])


class DeltaBank:
    """Hold one base ``model`` and many sparse deltas; switch them in place, exactly.

    ``add(name, delta)`` registers a delta (a ``SparseDelta`` or a file path) after checking it
    against the model: its base fingerprint (that of the base, or of the base with the deltas
    registered before it applied in order, as for a LoTTO chain; unless ``allow_mismatch``), its
    tensor names and shapes, its values finite and its indices sorted and in range. The bank
    keeps its own copies of the indices and values, on the weights' device, so switching never
    reads a file or crosses devices, and changing the ``SparseDelta`` after ``add`` changes
    nothing in the bank.

    ``activate(*names)``, ``deactivate(*names)`` (no names: all active ones; none active: nothing
    to do), ``switch(*names)`` (exactly these active) and the context manager ``using(*names)``
    (these active inside the block, the previous set restored on exit) change the model in
    place. Each either completes or, on a refusal, an error or Ctrl-C part way through, leaves
    the weights bit for bit and ``active`` as they were before it. Activating deltas that share
    an entry with each other or with an active delta is refused unless ``allow_overlap``; a
    ``scale`` that is not a finite float32 number, or a sum that overflows the weight's dtype
    (a float16 weight ends at 65504), is refused before anything is written.

    Tied embeddings: a delta on an input embedding the model ties to its output head is refused,
    since writing the one shared tensor would change the head too, unlike ``lota apply`` (which
    gives the head its own copy). Untie the model first (``lota.untie_embeddings(model)``, one
    more vocabulary x hidden matrix); it keeps its tied base's fingerprint, so the bank then
    takes the deltas and equals the folder ``lota apply`` writes.

    The bank refuses to write a tensor that ``lota.prepare`` is training (unprepare first); a
    model prepared while deltas are active trains on top of them. Do not move or cast the model
    while a delta is active.

    Memory: each registered delta keeps 8 bytes of index plus its values per entry on the
    weights' device; each active one keeps the replaced values (the weight's dtype) and, with
    ``verify`` (the default), what it wrote, for the check before restoring.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        base_fingerprint: str | None = None,
        allow_overlap: bool = False,
        verify: bool = True,
    ):
        self.model = model
        self.allow_overlap = allow_overlap
        self.verify = verify
        self._fingerprint = base_fingerprint
        self._entries: dict[str, _Entry] = {}
        self._stack: list[_Active] = []
        self._overlaps: dict[frozenset, int] = {}
        self._chain: tuple[tuple, str | None] = ((), None)
        self._in_transaction = False

    # -- registry --------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Registered deltas, in the order they were added."""
        return list(self._entries)

    @property
    def active(self) -> list[str]:
        """Active deltas, in the order they were activated."""
        return [a.name for a in self._stack]

    def nnz(self, name: str) -> int:
        return self._entry(name).nnz

    @property
    def base_fingerprint(self) -> str:
        """The fingerprint of the base weights (computed once, on first use, with none active)."""
        if self._fingerprint is None:
            if self._stack:
                raise InputError(
                    "the base fingerprint is needed while deltas are active",
                    "DeltaBank",
                    "add deltas before activating any, or pass base_fingerprint=",
                )
            from .weights import model_fingerprint

            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def add(
        self, name: str, delta: SparseDelta | str | os.PathLike, *, allow_mismatch: bool = False
    ) -> DeltaBank:
        """Register ``delta`` under ``name`` (checked against the model; nothing is written)."""
        if not isinstance(name, str) or not name:
            raise InputError("a delta needs a non-empty name", "DeltaBank.add", "pass a string")
        if name in self._entries:
            raise InputError(
                f"a delta named '{name}' is already in the bank",
                "DeltaBank.add",
                "pick another name, or remove() the old one first",
            )
        label = name
        if not isinstance(delta, SparseDelta):
            from .format import load

            label = str(delta)
            delta = load(label)
            if not isinstance(delta, SparseDelta):
                raise InputError(
                    "is a ticket, not a delta: it has no values to switch in",
                    label,
                    "make a delta with 'lota delta BASE TUNED --ticket FILE'",
                )
        else:
            label = delta.meta.get("path", name)
        delta.check_finite(label)
        fp = delta.base_fingerprint
        if not allow_mismatch and fp != self.base_fingerprint and fp != self._chain_fingerprint():
            chain = f" (nor with {', '.join(self.names)} applied)" if self.names else ""
            raise MismatchError(
                f"the delta was made for base {fp or '(none)'}, this base is "
                f"{self.base_fingerprint}{chain}",
                label,
                "use the model it was trained from, or allow_mismatch=True (--allow-mismatch)",
            )
        self._refuse_tied(delta, label)
        parts = [
            self._part(label, n, delta.shapes[n], idx, delta.values[n])
            for n, idx in delta.indices.items()
        ]
        parts = [p for p in parts if p.index.numel()]
        self._entries[name] = _Entry(name, label, parts, sum(p.index.numel() for p in parts))
        return self

    def _refuse_tied(self, delta: SparseDelta, label: str) -> None:
        """A delta on an input embedding the model ties to its output head: switched in place it
        would change the head too, where ``lota apply`` gives the head its own copy first."""
        from .targets import tied_to

        tied = tied_to(self.model, [n for n, i in delta.indices.items() if i.numel()])
        if tied:
            raise InputError(
                f"the delta changes '{tied[0]}', which this model ties to '{tied[1]}': switched "
                "in place it would change both, while 'lota apply' gives the output head its own "
                "copy",
                label,
                "untie the model first with lota.untie_embeddings(model), as 'lota eval --delta' "
                "does",
            )

    def _chain_fingerprint(self) -> str | None:
        """The fingerprint of the base with every registered delta applied in order: what a
        delta trained on top of them (``lota adapt PREVIOUS_MODEL --protect ...``, LoTTO) was
        made for, as ``lota apply BASE A B`` accepts it. Computed only when a delta needs it."""
        if not self._entries:
            return None
        key = tuple(self._entries)
        if self._chain[0] != key:
            from .targets import writes_untied
            from .weights import model_fingerprint

            names = [p.name for e in self._entries.values() for p in e.parts]
            with self.using(*key, allow_overlap=True):
                fp = model_fingerprint(self.model, writes_untied(self.model, names))
                self._chain = (key, fp)
        return self._chain[1]

    def remove(self, name: str) -> None:
        """Forget a delta (deactivate it first)."""
        self._entry(name)
        if name in self.active:
            raise InputError(f"delta '{name}' is active", "DeltaBank.remove", "deactivate it first")
        del self._entries[name]
        self._overlaps = {k: v for k, v in self._overlaps.items() if name not in k}

    def _part(
        self, label: str, name: str, shape: tuple, idx: torch.Tensor, values: torch.Tensor
    ) -> _Part:
        from .sparse_model import module_and_attr

        fix = "use a delta made for this architecture"
        try:
            module, attr = module_and_attr(self.model, name)
            weight = _weight(module, attr)
        except (AttributeError, TypeError):
            raise InputError(
                f"delta has tensor '{name}' that the model does not have", label, fix
            ) from None
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise InputError(f"'{name}' is not a floating-point weight of the model", label, fix)
        if tuple(weight.shape) != tuple(shape):
            raise InputError(
                f"delta tensor '{name}' has shape {list(shape)}, the model has "
                f"{list(weight.shape)}",
                label,
                fix,
            )
        if _is_sharded(weight) or weight.device.type == "meta" or not weight.is_contiguous():
            raise InputError(
                f"weight '{name}' is sharded, offloaded or not contiguous",
                label,
                "switch deltas on a model whose weights are whole tensors on one device",
            )
        # the bank's own copies: a later change to the caller's delta must not bypass the checks
        idx = idx.to(device=weight.device, dtype=torch.long, copy=True)
        values = values.to(device=weight.device, copy=True)
        try:  # the ticket's own invariant, again: a delta may have been changed since it was made
            check_indices(name, idx, weight.numel())
        except TicketError:
            raise InputError(
                f"indices of '{name}' are not sorted, unique and inside its "
                f"{weight.numel():,} entries",
                label,
                "recreate the delta with lota",
            ) from None
        return _Part(name, module, attr, idx, values)

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            known = ", ".join(self._entries) or "none"
            raise InputError(
                f"no delta named '{name}' in the bank (registered: {known})",
                "DeltaBank",
                "add() it first",
            )
        return self._entries[name]

    # -- overlap ---------------------------------------------------------------------------------
    def overlap(self, a: str, b: str) -> int:
        """Entries that deltas ``a`` and ``b`` both write (tied weights count as one tensor)."""
        key = frozenset((a, b))
        if key not in self._overlaps:
            ea, eb = self._entry(a), self._entry(b)
            by_weight = {}
            for p in eb.parts:
                by_weight.setdefault(id(_weight(p.module, p.attr)), []).append(p.index)
            n = 0
            for p in ea.parts:
                for other in by_weight.get(id(_weight(p.module, p.attr)), []):
                    n += int(torch.isin(p.index, other, assume_unique=True).sum())
            self._overlaps[key] = n
        return self._overlaps[key]

    def _check_disjoint(self, names: list[str], others: list[str], allow: bool) -> None:
        if allow:
            return
        for i, name in enumerate(names):
            for other in others + names[:i]:
                shared = self.overlap(name, other)
                if shared:
                    raise InputError(
                        f"deltas '{name}' and '{other}' share {shared:,} entries",
                        "DeltaBank.activate",
                        "activate deltas with disjoint tickets (LoTTO), or allow_overlap=True "
                        "(--allow-overlap) to add them in order",
                    )

    # -- switching -------------------------------------------------------------------------------
    @torch.no_grad()
    def activate(self, *names: str, scale: float = 1.0, allow_overlap: bool | None = None) -> None:
        """Write ``scale * delta`` of each named delta into the model, in the order given."""
        names = list(names)
        check_factors([scale], "scale", "DeltaBank.activate", "pass a finite scale, e.g. 0.5")
        for name in names:
            self._entry(name)
            if name in self.active:
                raise InputError(f"delta '{name}' is already active", "DeltaBank.activate")
        if len(set(names)) != len(names):
            raise InputError("a delta is named twice", "DeltaBank.activate", "name each once")
        for name in names:
            self._writable(self._entries[name])
        allow = self.allow_overlap if allow_overlap is None else allow_overlap
        self._check_disjoint(names, self.active, allow)
        with self._transaction(names):
            for name in names:
                self._push(name, float(scale))

    @torch.no_grad()
    def deactivate(self, *names: str, discard_changes: bool = False) -> None:
        """Restore the entries of the named active deltas (all active ones when none is named, so
        with none active there is nothing to do).

        Refused if an entry no longer holds what activation wrote, unless ``discard_changes``."""
        targets = list(names) if names else self.active
        if not targets:
            return
        for name in targets:
            self._entry(name)
            if name not in self.active:
                raise InputError(f"delta '{name}' is not active", "DeltaBank.deactivate")
        for name in targets:
            self._writable(self._entries[name])
        # the lowest delta to remove, and everything above it that shares entries with it, come
        # off the stack (top first); the others of those go back on in their order
        low = min(self.active.index(n) for n in targets)
        above = self._stack[low:]
        tangled = self._tangled(above, set(targets))
        off = [a for a in above if a.name in tangled]
        with self._transaction([a.name for a in off]):
            for a in reversed(off):  # top first: each then sees exactly what it wrote
                if not discard_changes:
                    self._check_unchanged(a)
                self._restore(a)
            self._stack = [a for a in self._stack if a not in off]
            for a in off:
                if a.name not in targets:
                    self._push(a.name, a.scale)

    def _tangled(self, above: list[_Active], targets: set[str]) -> set[str]:
        """Names in ``above`` that must come off: the targets, and any delta above a removed one
        that shares entries with it (its writes were made on top of the removed values)."""
        off: set[str] = set()
        for i, a in enumerate(above):
            if a.name in targets or any(
                self.overlap(a.name, b.name) for b in above[:i] if b.name in off
            ):
                off.add(a.name)
        return off

    def switch(self, *names: str, allow_overlap: bool | None = None) -> None:
        """Make exactly ``names`` active (at scale 1): deactivate the others, activate the rest."""
        for name in names:
            self._entry(name)
        wanted = [(n, 1.0) for n in names]
        self._goto(wanted, allow_overlap)

    @contextlib.contextmanager
    def using(self, *names: str, allow_overlap: bool | None = None) -> Iterator[DeltaBank]:
        """Inside the block exactly ``names`` are active; on exit the previous set is back."""
        before = [(a.name, a.scale) for a in self._stack]
        self.switch(*names, allow_overlap=allow_overlap)
        try:
            yield self
        finally:
            self._goto(before, allow=True)

    def _goto(self, wanted: list[tuple[str, float]], allow: bool | None) -> None:
        """Reach the state of activating ``wanted`` (name, scale) in order on the base."""
        names = [n for n, _ in wanted]
        if len(set(names)) != len(names):
            raise InputError("a delta is named twice", "DeltaBank.switch", "name each once")
        for n in names:
            self._writable(self._entries[n])
        pairs = [(a, b) for i, a in enumerate(names) for b in names[:i] if self.overlap(a, b)]
        if pairs and not (self.allow_overlap if allow is None else allow):
            a, b = pairs[0]
            self._check_disjoint([a], [b], False)
        with self._transaction(self.active + names):
            extra = [n for n, s in ((a.name, a.scale) for a in self._stack) if (n, s) not in wanted]
            if extra:
                self.deactivate(*extra)
            if pairs:  # overlapping deltas: the order of writes matters, rebuild past the prefix
                current = [(a.name, a.scale) for a in self._stack]
                keep = 0
                while keep < len(current) and current[keep] == wanted[keep]:
                    keep += 1
                if keep < len(current):
                    self.deactivate(*[n for n, _ in current[keep:]])
            current = [(a.name, a.scale) for a in self._stack]
            for n, s in wanted:
                if (n, s) not in current:
                    self._push(n, s)

    # -- the writes ------------------------------------------------------------------------------
    def _writable(self, entry: _Entry) -> None:
        for p in entry.parts:
            if parametrize.is_parametrized(p.module, p.attr):
                raise InputError(
                    f"tensor '{p.name}' of delta '{entry.name}' is being trained (lota.prepare)",
                    "DeltaBank",
                    "switch deltas before prepare() or after unprepare()",
                )

    @contextlib.contextmanager
    def _transaction(self, names: list[str]) -> Iterator[None]:
        """Make the block all or nothing: the entries of the named deltas (all the block may write)
        and the active stack are saved first and put back on any exception, a refusal, an error
        or Ctrl-C alike. Saved values taken at one moment make the order of putting back
        irrelevant, also where deltas overlap or weights are tied. A block inside another's
        transaction is covered by that one."""
        if self._in_transaction:
            yield
            return
        parts = [p for n in dict.fromkeys(names) for p in self._entries[n].parts]
        saved = [_read(p) for p in parts]
        stack = list(self._stack)
        self._in_transaction = True
        try:
            yield
        except BaseException:
            for p, old in zip(parts, saved):
                _copy_into(p, old)
            self._stack = stack
            raise
        finally:
            self._in_transaction = False

    def _push(self, name: str, scale: float) -> None:
        """Activate one delta (inside a transaction, which undoes a part way write)."""
        entry = self._entries[name]
        saved, written = [], []
        for p in entry.parts:
            flat = _weight(p.module, p.attr).data.view(-1)
            if p.index.device != flat.device:  # the model moved since add()
                p.index, p.values = p.index.to(flat.device), p.values.to(flat.device)
            old = _read(p)  # [k], the weight's dtype
            v = p.values
            if scale != 1.0:
                v = v.to(arithmetic_dtype(v.dtype)) * scale
            fix = "activate it on a float32 or bfloat16 model, or at a smaller scale"
            new = finite_sum(old, v, flat.dtype, p.name, f"delta '{name}'", fix)
            _copy_into(p, new)
            saved.append(old)
            written.append(new)
        self._stack.append(_Active(name, scale, saved, written if self.verify else None))

    def _check_unchanged(self, a: _Active) -> None:
        if a.written is None:
            return
        for p, old, new in zip(self._entries[a.name].parts, a.saved, a.written):
            flat = _weight(p.module, p.attr).data.view(-1)
            if flat.dtype != old.dtype:
                raise InputError(
                    f"weight '{p.name}' was cast to {flat.dtype} while delta '{a.name}' was active",
                    "DeltaBank.deactivate",
                    "cast the model only with no delta active",
                )
            now = flat.index_select(0, p.index.to(flat.device))
            if not torch.equal(_bits(now), _bits(new.to(flat.device))):
                raise InputError(
                    f"entries of '{p.name}' changed since delta '{a.name}' was activated",
                    "DeltaBank.deactivate",
                    "deactivating would discard that change; pass discard_changes=True to "
                    "restore the base values anyway",
                )

    def _restore(self, a: _Active) -> None:
        for p, old in zip(self._entries[a.name].parts, a.saved):
            _copy_into(p, old)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes the bank holds: registered deltas (indices and values) and active state."""
        reg = sum(p.index.nbytes + p.values.nbytes for e in self._entries.values() for p in e.parts)
        act = sum(t.nbytes for a in self._stack for t in [*a.saved, *(a.written or [])])
        return {"registered": reg, "active": act}

    def __repr__(self) -> str:
        return f"DeltaBank({len(self._entries)} deltas, active: {', '.join(self.active) or 'none'})"


def _read(p: _Part) -> torch.Tensor:
    """The current values at ``p``'s entries, in the weight's dtype."""
    flat = _weight(p.module, p.attr).data.view(-1)
    return flat.index_select(0, p.index.to(flat.device))


def _copy_into(p: _Part, values: torch.Tensor) -> None:
    """Write ``values`` at ``p``'s entries: every change the bank makes goes through here."""
    flat = _weight(p.module, p.attr).data.view(-1)
    flat.index_copy_(0, p.index.to(flat.device), values.to(flat.device, flat.dtype))


def _weight(module: nn.Module, attr: str) -> torch.Tensor:
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


def _is_sharded(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
