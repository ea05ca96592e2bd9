"""The method and ticket-source table is the one place ``lota adapt`` and the lab read."""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys

import pytest
import torch

from lota import format as fmt
from lota import sources
from lota.adapt import AdaptConfig, adapt
from lota.errors import InputError
from lota.lab.scales import lr_grid
from lota.ticket import Ticket

# What each --method name trained and where its ticket came from before the table existed:
# (trainer, its own source, the selector of that source, trains the input embedding as).
BEFORE = {
    "lota": ("sparse", "calibration", "magnitude", None),
    "fft": ("dense", None, None, None),
    "lora": ("lora", None, None, None),
    "random": ("sparse", "random", "random", None),
    "bottomk": ("sparse", "bottomk", "bottomk", None),
    "embeddings": ("dense", None, None, "fft"),
    "ks-lottery": ("sparse", "ks-rows", None, "lota"),
}


def config(**kw) -> AdaptConfig:
    return AdaptConfig(model="m", data="d", out="o", **kw)


def errors_of(cfg: AdaptConfig) -> str:
    """Every problem ``validate`` reports, joined by "; " as it reports them ("" if none)."""
    try:
        cfg.validate()
    except InputError as e:
        return e.what
    return ""


def errors(**kw) -> str:
    return errors_of(config(**kw))


def test_sources_module_imports_neither_torch_nor_transformers():
    code = (
        "import sys, lota.sources; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_method_resolves_to_what_it_trained_before():
    assert sources.method_names() == tuple(BEFORE)
    for name, (trainer, source, selector, embedding_as) in BEFORE.items():
        m = sources.METHODS[name]
        assert (m.trainer, m.source, m.embedding_as) == (trainer, source, embedding_as), name
        assert (sources.SOURCES[source].selector if source else None) == selector, name
        assert m.sparse == (trainer == "sparse")


def test_every_table_entry_is_reachable_and_declares_real_settings():
    fields = {f.name for f in dataclasses.fields(AdaptConfig)}
    own = {m.source for m in sources.METHODS.values() if m.source}
    for s in sources.SOURCES.values():
        assert s.name in own or s.chosen is not None, f"source {s.name} is never used"
        assert s.chosen is None or s.option, s.name
        assert set(s.settings) <= fields, s.name
        assert set(s.methods) <= set(sources.METHODS), s.name
        assert s.help and s.needs in {
            "calibration",
            "file",
            "model folder",
            "protect files",
            "nothing",
        }
    assert {m.trainer for m in sources.METHODS.values()} == set(sources.TRAINERS)
    for m in sources.METHODS.values():
        assert m.embedding_as is None or sources.METHODS[m.embedding_as].embedding_as is None


def _old_source(cfg) -> str:
    """The if/elif chain ``_sparse_run`` dispatched on before the table."""
    if cfg.ticket:
        return "file"
    if cfg.protect and cfg.protect_mode == "flip":
        return "flip"
    if cfg.method == "random":
        return "random"
    if cfg.calibrated:
        return "calibrated"
    return "bottomk" if cfg.method == "bottomk" else "calibration"


def test_settings_choose_the_same_source_selector_and_size_as_before():
    checked = 0
    for method, ticket, calibrated, mode in itertools.product(
        ["lota", "random", "bottomk"], [None, "t"], [None, "c"], ["constrained", "flip"]
    ):
        cfg = config(
            method=method, ticket=ticket, calibrated=calibrated, protect=["p"], protect_mode=mode
        )
        if errors_of(cfg):
            continue
        source = sources.source_for(cfg)
        assert source.name == _old_source(cfg), (method, ticket, calibrated, mode)
        assert source.sized == (method in ("lota", "random", "bottomk") and not ticket)
        ctx = sources.Context(cfg, {}, 0, None, [], None, {}, source)
        assert ctx.selector == {"random": "random", "bottomk": "bottomk"}.get(method, "magnitude")
        checked += 1
    assert checked == 12  # every valid combination


@pytest.mark.parametrize(
    "kw,message",
    [
        (
            {"method": "magic"},
            "--method 'magic' is not one of lota, fft, lora, random, bottomk, embeddings, ks-lottery",
        ),
        ({"method": "fft", "ticket": "t"}, "--ticket works with --method lota only"),
        (
            {"method": "random", "calibrated": "c"},
            "--calibrated works with --method lota or bottomk only",
        ),
        ({"ticket": "t", "calibrated": "c"}, "give --calibrated or --ticket, not both"),
        (
            {"method": "lora", "protect": ["p"]},
            "--protect needs a sparse method; --method lora trains every target entry",
        ),
        ({"protect_mode": "flip"}, "--protect-mode flip needs --protect FILE"),
        ({"calibration_steps": 0}, "--calibration-steps 0 must be >= 1"),
        ({"method": "bottomk", "calibration_steps": 0}, "--calibration-steps 0 must be >= 1"),
        (
            {"method": "lora", "fsdp": True},
            "--fsdp does not shard PEFT LoRA models; run --method lora without --fsdp",
        ),
        (
            {"protect": ["p"], "protect_mode": "flip", "fsdp": True},
            "--protect-mode flip does not run under --fsdp; use constrained or drop --fsdp",
        ),
    ],
)
def test_validation_messages_word_for_word(kw, message):
    assert message in errors(**kw)


def test_validation_lets_sources_that_need_no_calibration_skip_it():
    assert errors(method="random", calibration_steps=0) == ""
    assert errors(ticket="t", calibration_steps=0) == ""
    assert errors(method="random", protect=["p"]) == ""
    assert errors() == ""


def test_messages_keep_their_order():
    got = errors(method="fft", ticket="t", calibrated="c", protect=["p"])
    assert got == "; ".join(
        [
            "--ticket works with --method lota only",
            "--calibrated works with --method lota or bottomk only",
            "give --calibrated or --ticket, not both",
            "--protect needs a sparse method; --method fft trains every target entry",
        ]
    )


def test_help_and_lab_lists_come_from_the_table():
    assert sources.method_help() == (
        "lota | fft | lora | random | bottomk | embeddings | ks-lottery (default lota)"
    )
    assert sources.lab_methods() == ("fft", "lora", "lota", "random", "bottomk")
    assert lr_grid("fft", 3) == [3e-4, 1e-3, 3e-3] and lr_grid("lora", 1) == [3e-3]
    assert lr_grid("ks-lottery", 2) == [3e-3, 1e-2]


def test_embedding_methods_run_as_a_method_of_the_input_embedding(workdir, tmp_path):
    base = str(workdir / "base")
    cfg = sources.resolve(AdaptConfig(model=base, data="d", out="o", method="embeddings"))
    assert (cfg.method, cfg.targets) == ("fft", r"^model\.embed_tokens\.weight$")
    (tmp_path / "ks").mkdir()
    cfg = AdaptConfig(
        model=base, data="d", out="o", method="ks-lottery", ticket=str(tmp_path / "ks")
    )
    cfg = sources.resolve(cfg)
    assert (cfg.method, cfg.ticket) == ("lota", str(tmp_path / "ks" / "ticket.safetensors"))
    assert sources.source_for(cfg).name == "file"
    with pytest.raises(InputError) as e:
        sources.resolve(AdaptConfig(model=base, data="d", out="o", method="ks-lottery"))
    assert (e.value.what, e.value.where) == (
        "--method ks-lottery needs the selected tokens",
        "--tokens",
    )
    with pytest.raises(InputError) as e:
        sources.resolve(
            AdaptConfig(model=base, data="d", out="o", method="embeddings", targets="x")
        )
    assert e.value.what == "--method embeddings chooses its own target (the input embedding)"
    plain = config(method="lota")
    assert sources.resolve(plain) is plain


# ---------------------------------------------------------------------------- a new entry
def _first_k(ctx: sources.Context) -> Ticket:
    """The first k eligible entries in name order, skipping nothing but the protected ones."""
    left, indices = ctx.k, {}
    for n in sorted(ctx.targets):
        take = min(left, math.prod(ctx.targets[n]))
        indices[n], left = torch.arange(take), left - take
    return Ticket(shapes=dict(ctx.targets), indices=indices)


@pytest.fixture
def first_k(monkeypatch):
    """A source and a method of it, registered the way a new entry of ``sources.py`` is."""
    source = sources.Source(
        "first-k", "the first k entries", needs="nothing", settings=(), build=_first_k
    )
    method = sources.Method("first-k", "the first k entries", "sparse", "first-k", (7e-3,), lab=9)
    monkeypatch.setitem(sources.SOURCES, source.name, source)
    monkeypatch.setitem(sources.METHODS, method.name, method)
    return method


def test_a_new_entry_reaches_validation_help_and_the_lab(first_k):
    assert errors(method="first-k") == ""
    assert errors(method="first-k", calibration_steps=0) == ""  # it needs no calibration
    assert "ks-lottery, first-k" in errors(method="magic")
    assert sources.method_help().endswith("| ks-lottery | first-k (default lota)")
    assert sources.lab_methods()[-1] == "first-k" and lr_grid("first-k", 1) == [7e-3]
    assert sources.source_for(config(method="first-k")).name == "first-k"
    assert sources.source_for(config(method="first-k", ticket="t")).name == "file"


def test_a_new_setting_chosen_source_gets_option_checks(monkeypatch):
    fake = sources.Source(
        "fake",
        "a source a setting picks",
        needs="nothing",
        settings=("calibration_lr",),
        build=_first_k,
        option="--fake",
        chosen=lambda cfg: cfg.calibration_lr == 0.125,
        methods=("lota",),
        exclusive=True,
    )
    monkeypatch.setitem(sources.SOURCES, fake.name, fake)
    assert sources.source_for(config(calibration_lr=0.125)).name == "fake"
    assert "--fake works with --method lota only" in errors(method="random", calibration_lr=0.125)
    assert "give --fake or --ticket, not both" in errors(ticket="t", calibration_lr=0.125)


def test_adapt_trains_the_ticket_a_new_source_builds(workdir, tmp_path, first_k):
    cfg = AdaptConfig(
        model=str(workdir / "base"),
        data=str(workdir / "a.jsonl"),
        out=str(tmp_path / "run"),
        method="first-k",
        steps=2,
        lr=1e-2,
        batch_size=4,
        progress=False,
    )
    info = adapt(cfg)
    delta = fmt.load(tmp_path / "run" / "delta.safetensors")
    assert info["method"] == "first-k" and info["frozen_verified"] is True
    k = sum(math.prod(s) for s in delta.shapes.values()) // 10  # --sparsity 0.9
    assert delta.nnz == info["k"] == k
    left = k
    for n in sorted(delta.shapes):
        take = min(left, math.prod(delta.shapes[n]))
        assert torch.equal(delta.indices[n], torch.arange(take)), n
        left -= take
