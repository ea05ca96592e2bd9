"""Where a ticket puts its entries: the density of a lota file's ticket by layer and by tensor kind
(``lota inspect``), so that two tickets (a cheap calibration's and AdamW's, say) can be compared
beyond the entries they share.

A tensor's layer is the first whole-number part of its name (``model.layers.3.mlp.up_proj.weight``:
3; an expert's number comes after its layer's); a tensor with none (an embedding) is in layer
``-``. Its kind is the module's own name (``up_proj``), with the parameter's name added when it is
not ``weight`` (``c_attn.bias``).
"""

from __future__ import annotations

NO_LAYER = "-"


def layer_and_kind(name: str) -> tuple[str, str]:
    """``(layer, kind)`` of the tensor ``name``."""
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), NO_LAYER)
    param = parts[-1] if len(parts) > 1 else "weight"
    modules = [p for p in parts[:-1] if not p.isdigit()] or [parts[0]]
    kind = modules[-1] if param == "weight" else f"{modules[-1]}.{param}"
    return layer, kind


def _order(key: str) -> tuple:
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def densities(tensors: dict[str, dict]) -> dict:
    """``{"by_layer": {layer: row}, "by_kind": {kind: row}}`` of a file's ``tensors`` (each with
    ``nnz`` and ``numel``, as ``describe`` gives them); a row holds ``nnz``, ``numel`` and
    ``density``."""
    out: dict[str, dict] = {"by_layer": {}, "by_kind": {}}
    for name, t in tensors.items():
        for table, key in zip(("by_layer", "by_kind"), layer_and_kind(name)):
            row = out[table].setdefault(key, {"nnz": 0, "numel": 0})
            row["nnz"] += t["nnz"]
            row["numel"] += t["numel"]
    for table in out:
        rows = dict(sorted(out[table].items(), key=lambda kv: _order(kv[0])))
        for row in rows.values():
            row["density"] = row["nnz"] / row["numel"] if row["numel"] else 0.0
        out[table] = rows
    return out


def side_by_side(infos: list[dict], table: str) -> list[str]:
    """The lines of one table (``by_layer`` or ``by_kind``) of every file's densities, a column
    per file, as ``lota inspect`` prints them."""
    keys: list[str] = []
    for info in infos:
        keys += [k for k in info[table] if k not in keys]
    keys.sort(key=_order)
    width = max([len(k) for k in keys] + [5])
    head = "layer" if table == "by_layer" else "kind"
    lines = [
        f"  {head:<{width}}  " + "  ".join(f"{'file ' + str(i + 1):>8}" for i in range(len(infos)))
    ]
    for k in keys:
        cells = [info[table].get(k) for info in infos]
        lines.append(
            f"  {k:<{width}}  "
            + "  ".join(f"{c['density']:>8.4f}" if c else f"{'-':>8}" for c in cells)
        )
    return lines


def inspect_report(infos: list[dict], pairs: list[dict] | None) -> tuple[list[str], dict]:
    """What ``lota inspect`` prints for files described by ``infos`` (``format.describe``) and
    their ``pairs`` (``merge.overlap``, two files or more): the text lines, and the JSON object
    (one file's description alone, else every file's and the pairs)."""
    for info in infos:
        info.update(densities(info["tensors"]))
    lines = []
    for info in infos:
        lines += _file_lines(info)
    for pair in pairs or []:
        conflicts = pair["sign_conflicts"]
        lines.append(
            f"overlap {pair['a']} | {pair['b']}: {pair['shared']:,} shared entries "
            f"({100 * pair['shared_of_smaller']:.3g} % of the smaller)"
            + ("" if conflicts is None else f", {conflicts:,} with opposite signs")
        )
        lines.append(
            f"  recall    the second holds {_percent(pair['a_held_by_b'])} of the first's "
            f"entries, the first {_percent(pair['b_held_by_a'])} of the second's"
        )
    if len(infos) > 1:
        for i, info in enumerate(infos):
            lines.append(f"file {i + 1}: {info['path']}")
        for table, title in (("by_kind", "tensor kind"), ("by_layer", "layer")):
            lines.append(f"density by {title}:")
            lines += side_by_side(infos, table)
    out = infos[0] if len(infos) == 1 else {"files": infos, "overlap": pairs}
    return lines, out


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3g} %"


def _file_lines(info: dict) -> list[str]:
    lines = [
        f"{info['path']}: lota {info['kind']}, format v{info['format_version']}",
        f"  entries   {info['nnz']:,} of {info['numel']:,} ({100 * info['density']:.4g} %)",
        f"  base      {info['base_fingerprint'] or '(none)'}",
    ]
    bpe = info["bits_per_entry"]
    lines.append(
        f"  file      {info['file_bytes']:,} bytes"
        + (f" ({bpe:.3f} bits per eligible entry)" if bpe else "")
    )
    if info["kind"] == "delta":
        lines.append(
            f"  values    {', '.join(info['values_dtype']) or '-'}, L2 norm {info['l2_norm']:.6g}"
        )
    width = max((len(n) for n in info["tensors"]), default=0)
    for name, t in info["tensors"].items():
        dtype = f"  {t['values_dtype']}" if "values_dtype" in t else ""
        lines.append(
            f"  {name:<{width}}  {t['nnz']:>10,} / {t['numel']:<10,} {t['encoding']}{dtype}"
        )
    return lines
