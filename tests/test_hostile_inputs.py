"""Hostile data, chat templates and settings: one line on stderr, exit 2, nothing written.

Deeply nested or huge JSONL lines, chat templates that raise, break out of their sandbox or never
finish, examples longer than the model's positions, a sparsity that leaves no entry trainable, and
non-finite or absurd optimizer settings.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from fractions import Fraction

import pytest
import torch

from lota import data as lota_data
from lota.adapt import AdaptConfig
from lota.errors import InputError
from lota.selection import ticket_size
from lota.toy import byte_tokenizer, save_toy_model

from .conftest import ADAPT, write_jsonl
from .test_cli import assert_refused, lota

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def _adapt(capsys, model, data, out, *extra):
    return lota(capsys, "adapt", model, "--data", data, "--out", out, *ADAPT, *extra)


def _nothing_written(*paths):
    for p in paths:
        assert not p.exists(), p


# -- data lines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_line_is_refused_naming_the_line(workdir, capsys, tmp_path, depth):
    rows = '{"prompt": "1+1=", "completion": "2"}\n'
    nested = '{"prompt": "1+1=", "completion": "2", "meta": ' + "[" * depth + "]" * depth + "}\n"
    data = tmp_path / "deep.jsonl"
    data.write_text(rows + nested, encoding="utf-8")
    out = tmp_path / "o"
    assert_refused(*_adapt(capsys, workdir / "base", data, out), f"{data}:2", "nested")
    _nothing_written(out)
    assert_refused(*lota(capsys, "eval", workdir / "base", "--data", data), f"{data}:2", "nested")


def test_huge_data_line_is_refused_naming_the_line(workdir, capsys, tmp_path):
    size = lota_data.MAX_LINE_CHARS if hasattr(lota_data, "MAX_LINE_CHARS") else 16 * 2**20
    row = '{"prompt": "1+1=", "completion": "2", "pad": "' + "x" * size + '"}\n'
    data = tmp_path / "huge.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n' + row, encoding="utf-8")
    out = tmp_path / "o"
    assert_refused(*_adapt(capsys, workdir / "base", data, out), f"{data}:2", "characters")
    _nothing_written(out)


def test_data_is_read_line_by_line_never_whole(tmp_path, monkeypatch):
    """A line is read with a bound on its size: a file of one example and then a gigabyte
    without a newline is refused at its second line, having read at most that bound."""
    from pathlib import Path

    data = tmp_path / "endless.jsonl"
    with open(data, "wb") as f:
        f.write(b'{"prompt": "1+1=", "completion": "2"}\n')
        f.truncate(2**30)  # sparse: a gigabyte of NUL bytes, no disk used

    def whole(self, *a, **k):
        raise AssertionError(f"read whole: {self}")

    monkeypatch.setattr(Path, "read_text", whole)
    monkeypatch.setattr(Path, "read_bytes", whole)
    with pytest.raises(InputError, match="bytes long") as e:
        lota_data.read_jsonl(data)
    assert e.value.where == f"{data}:2"


_LONG_INT = "9" * 5000  # past Python's int <-> str digit limit
# A field value Python's JSON parser accepts but lota could not use: half a surrogate pair (no
# UTF-8 form: the tokenizer cannot encode it), a number of more digits than int() converts.
FIELD_CASES = {
    "surrogate-prompt": ('{"prompt": "a\\ud800", "completion": "2"}', "lone surrogate"),
    "surrogate-completion": ('{"prompt": "a", "completion": "\\udfff"}', "lone surrogate"),
    "surrogate-message": (
        '{"messages": [{"role": "user", "content": "\\udbff"}, '
        '{"role": "assistant", "content": "b"}]}',
        "lone surrogate",
    ),
    "surrogate-other-field": ('{"prompt": "a", "completion": "2", "id": "\\ud800"}', "surrogate"),
    "surrogate-key": ('{"prompt": "a", "completion": "2", "\\ud800": 1}', "lone surrogate"),
    "long-int": ('{"prompt": "a", "completion": "2", "n": ' + _LONG_INT + "}", "digits"),
    "long-int-nested": ('{"prompt": "a", "completion": "2", "m": [[' + _LONG_INT + "]]}", "digits"),
}


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_data_fields_python_cannot_use_are_refused_naming_the_line(workdir, capsys, tmp_path, case):
    line, words = FIELD_CASES[case]
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n' + line + "\n", encoding="utf-8")
    assert_refused(*lota(capsys, "eval", workdir / "base", "--data", data), f"{data}:2", words)


def test_a_surrogate_pair_escape_is_one_character(tmp_path):
    data = tmp_path / "pair.jsonl"
    data.write_text('{"prompt": "smile \\ud83d\\ude00", "completion": "2"}\n')
    assert lota_data.read_jsonl(data)[0].prompt == "smile \U0001f600"


def test_an_empty_prompt_is_refused_by_eval_naming_the_line(workdir, capsys, tmp_path):
    """Generation needs a token to start from; a tokenizer that adds none to an empty prompt
    leaves nothing (training on such an example is fine: its completion is the text)."""
    data = tmp_path / "empty.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "", "completion": "2"}\n')
    got = lota(capsys, "eval", workdir / "base", "--data", data)
    assert_refused(*got, f"{data}:2", "prompt is empty")


def test_fuzzed_data_lines_are_read_or_refused_naming_the_line(tmp_path):
    """Any line at all (valid JSON or not, any characters, numbers of any size, any nesting)
    either reads and tokenizes or is refused as bad input naming its line; nothing else."""
    hyp = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st

    tok = byte_tokenizer()
    # every code point, lone surrogates included (json.dumps escapes them)
    text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()))
    scalar = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        text,
        st.sampled_from([_LONG_INT, "-" + _LONG_INT, "1e999", "NaN", "-Infinity"]).map(_Raw),
    )
    value = st.recursive(
        scalar,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)
        ),
        max_leaves=8,
    )
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant"]), "content": text}
    )
    example = st.one_of(
        st.fixed_dictionaries({"prompt": text, "completion": text}, optional={"meta": value}),
        st.fixed_dictionaries({"messages": st.lists(message, min_size=2, max_size=3)}),
        value,
    )
    line = st.one_of(
        example.map(_dumps),
        st.tuples(example.map(_dumps), st.integers(0, 40)).map(lambda t: t[0][: t[1]]),  # cut
        st.integers(0, 200).map(lambda d: '{"prompt": "a", "m": ' + "[" * d + "]" * d + "}"),
        text,
    )
    path = tmp_path / "fuzz.jsonl"

    @hyp.given(line=line, raw=st.booleans())
    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    def check(line, raw):
        # raw: the line's own characters as bytes (lone surrogates become bytes UTF-8 forbids)
        path.write_bytes(
            b'{"prompt": "1+1=", "completion": "2"}\n'
            + line.encode("utf-8", "surrogatepass" if raw else "backslashreplace")
            + b"\n"
        )
        try:
            examples = lota_data.read_jsonl(path)
        except InputError as e:
            # a fuzzed line may hold line breaks of its own: it is then lines 2, 3, ... of the file
            lines = {f"{path}:{n}" for n in range(2, 3 + line.count("\n"))}
            assert e.where in lines | {str(path)}, e.line()
            return
        lota_data.tokenize(examples, tok, 64)

    check()


class _Raw(str):
    """JSON text put into a line as it is (a number no JSON writer would write)."""


def _dumps(obj) -> str:
    """``json.dumps`` that writes ``_Raw`` strings as they are."""
    if isinstance(obj, _Raw):
        return str(obj)
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_dumps(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ", ".join(_dumps(v) for v in obj) + "]"
    return json.dumps(obj)


# -- chat templates ------------------------------------------------------------------------------


def _with_template(workdir, tmp_path, template: str):
    model = tmp_path / "templated"
    shutil.copytree(workdir / "base", model)
    tok = byte_tokenizer()
    tok.chat_template = template
    tok.save_pretrained(model)
    return model


@pytest.mark.parametrize(
    "template, words",
    [
        ("{{ raise_exception('system messages are not supported') }}", ["not supported"]),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", ["sandbox", "SecurityError"]),
        ("{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}", ["nosuchfilter"]),
        ("{{ messages[0]['content'] + 1 }}", ["TypeError"]),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", ["RecursionError"]),
        ("{{ 'x' * 20000000 }}", ["20,000,000 characters"]),
    ],
    ids=["raises", "escapes-sandbox", "bad-syntax", "type-error", "recursion", "huge-output"],
)
def test_failing_chat_template_is_bad_input(workdir, capsys, tmp_path, template, words):
    model = _with_template(workdir, tmp_path, template)
    data = workdir / "b.jsonl"  # conversations: the prompt goes through the template
    out = tmp_path / "o"
    assert_refused(*_adapt(capsys, model, data, out), "chat template", f"{data}:1", *words)
    _nothing_written(out)
    assert_refused(
        *lota(capsys, "eval", model, "--data", data, "--quiet"), "chat template", f"{data}:1"
    )


def test_endless_chat_template_is_refused_within_seconds(workdir, capsys, tmp_path):
    model = _with_template(workdir, tmp_path, NESTED_LOOPS)
    out = tmp_path / "o"
    start = time.monotonic()
    code, o, err = _adapt(capsys, model, workdir / "b.jsonl", out)
    elapsed = time.monotonic() - start
    assert_refused(code, o, err, "chat template", "longer than", "seconds")
    assert elapsed < lota_data.TEMPLATE_SECONDS + 20, elapsed
    _nothing_written(out)


def test_endless_chat_template_is_refused_off_the_main_thread(monkeypatch):
    """Off the main thread there is no SIGALRM: the limit must hold there too."""
    monkeypatch.setattr(lota_data, "TEMPLATE_SECONDS", 1.0, raising=False)
    tok = byte_tokenizer()
    tok.chat_template = NESTED_LOOPS
    ex = lota_data.Example(
        prompt="",
        completion="b",
        messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        line=3,
    )
    caught = []

    def render():
        try:
            lota_data.prompt_ids(ex, tok)
        except InputError as e:
            caught.append(e)

    worker = threading.Thread(target=render, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the template ran past its limit"
    assert caught and "longer than" in caught[0].what


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_template_time_limit_restores_the_callers_alarm():
    seen = []

    def handler(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        tok = byte_tokenizer()
        ex = lota_data.Example(
            prompt="",
            completion="b",
            messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        )
        assert lota_data.prompt_ids(ex, tok)
        assert signal.getsignal(signal.SIGALRM) is handler
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90 < left <= 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not seen


# -- lengths -------------------------------------------------------------------------------------


def _gpt2_folder(folder):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=259, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return folder, GPT2LMHeadModel


def _llama_folder(folder):
    from transformers import LlamaForCausalLM

    save_toy_model(folder, seed=0, hidden=32, layers=2, heads=2, max_positions=32)
    return folder, LlamaForCausalLM


@pytest.mark.parametrize("arch", [_gpt2_folder, _llama_folder], ids=["gpt2", "llama"])
def test_long_examples_are_cut_to_the_models_positions(capsys, tmp_path, monkeypatch, arch):
    model, cls = arch(tmp_path / "m32")
    widths = []
    forward = cls.forward

    def recording(self, *a, **k):
        widths.append(k["input_ids"].shape[1])
        return forward(self, *a, **k)

    monkeypatch.setattr(cls, "forward", recording)
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 10, "completion": "y" * 60}] * 8)
    out = tmp_path / "o"
    code, o, err = _adapt(capsys, model, data, out)
    assert code == 0, err
    assert widths and max(widths) == 32  # the completion was truncated at the model's positions
    assert (out / "summary.json").exists()
    assert not (out / ".lota-checkpoint").exists()


def test_prompts_longer_than_the_models_positions_are_refused(capsys, tmp_path):
    model, _ = _llama_folder(tmp_path / "m32")
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 40, "completion": "y"}] * 4)
    out = tmp_path / "o"
    assert_refused(*_adapt(capsys, model, data, out), "32 positions", "shorten the prompts")
    _nothing_written(out)


def test_max_length_above_the_models_positions_is_refused(workdir, capsys, tmp_path):
    out = tmp_path / "o"
    code, o, err = _adapt(
        capsys, workdir / "base", workdir / "a.jsonl", out, "--max-length", "20000"
    )
    assert_refused(code, o, err, "--max-length 20000", "256 positions", "--max-length 256")
    _nothing_written(out)


# -- a sparsity that leaves nothing to train -----------------------------------------------------

NUMEL = 20_480  # target entries of the tiny base: 2 layers x (4 x 32 x 32 + 3 x 64 x 32)


def test_sparsity_that_leaves_no_entry_is_refused_by_adapt(workdir, capsys, tmp_path):
    out = tmp_path / "o"
    code, o, err = _adapt(
        capsys, workdir / "base", workdir / "a.jsonl", out, "--sparsity", "0.99999999"
    )
    assert_refused(code, o, err, "--sparsity", f"leaves 0 of {NUMEL:,}", "use at most 0.9999511 ")
    _nothing_written(out)


def test_sparsity_that_leaves_no_entry_is_refused_by_mask_and_delta(
    workdir, trained, capsys, tmp_path
):
    base, tuned = workdir / "base", trained / "model"
    t = tmp_path / "t.safetensors"
    code, o, err = lota(capsys, "mask", base, tuned, "--sparsity", "0.99999999", "--out", t)
    assert_refused(code, o, err, "--sparsity", f"leaves 0 of {NUMEL:,}", "use at most")
    d = tmp_path / "d.safetensors"
    code, o, err = lota(capsys, "delta", base, tuned, "--sparsity", "0.99999999", "--out", d)
    assert_refused(code, o, err, "--sparsity", "leaves 0 of")
    _nothing_written(t, d)
    # the value the message suggests keeps exactly one entry
    code, o, err = lota(capsys, "mask", base, tuned, "--sparsity", "0.9999511", "--out", t)
    assert code == 0, err
    assert ticket_size("0.9999511", NUMEL) == 1
    assert ticket_size("0.9999512", NUMEL) == 0


@pytest.mark.parametrize("numel", [1, 2, 3, 7, 10, 10_240, 20_480, 999_999, 1_769_472, 7 * 10**9])
def test_suggested_sparsity_keeps_one_entry(numel):
    from lota.selection import require_trainable

    with pytest.raises(InputError) as e:
        require_trainable("0.9999999999999", numel)
    suggested = e.value.fix.split("use at most ")[1].split()[0]
    assert ticket_size(suggested, numel) == 1
    # and it is the largest such value to within 1 % of one entry's share
    assert 1 - Fraction(suggested) - Fraction(1, numel) < Fraction(1, 100 * numel)


# -- optimizer settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--calibration-lr", "inf"),
        ("--calibration-lr", "nan"),
        ("--weight-decay", "inf"),
        ("--weight-decay", "nan"),
        ("--momentum", "inf"),
        ("--momentum", "nan"),
        ("--max-grad-norm", "nan"),
        ("--max-grad-norm", "inf"),
        ("--max-grad-norm", "-1"),
        ("--epochs", "inf"),
    ],
)
def test_non_finite_settings_are_refused_up_front(workdir, capsys, tmp_path, flag, value):
    args = list(ADAPT)
    for drop in (flag, "--steps") if flag == "--epochs" else (flag,):
        if drop in args:
            i = args.index(drop)
            del args[i : i + 2]
    out = tmp_path / "o"
    code, o, err = lota(
        capsys, "adapt", workdir / "base", "--data", workdir / "a.jsonl", "--out", out, *args,
        flag, value,
    )  # fmt: skip
    assert_refused(code, o, err, f"{flag} {value}")
    _nothing_written(out)


@pytest.mark.parametrize("scales", ["inf", "1,nan", "1e39", "1,-1e39"])
def test_non_finite_apply_scales_are_refused(workdir, trained, capsys, tmp_path, scales):
    delta = trained / "delta.safetensors"
    deltas = [delta] * len(scales.split(","))
    out = tmp_path / "m"
    code, o, err = lota(
        capsys, "apply", workdir / "base", *deltas, "--scales", scales, "--out", out
    )
    assert_refused(code, o, err, "--scales")
    _nothing_written(out)


def test_apply_that_overflows_a_float16_base_is_refused(fp16_base, capsys, tmp_path):
    from .conftest import constant_delta

    delta = constant_delta(fp16_base, tmp_path / "big.safetensors", 1e5)  # float16 ends at 65504
    out = tmp_path / "m"
    code, o, err = lota(capsys, "apply", fp16_base, delta, "--out", out)
    assert_refused(code, o, err, "big.safetensors", "q_proj.weight' overflows its float16")
    _nothing_written(out)
    small = constant_delta(fp16_base, tmp_path / "small.safetensors", 5e4)
    code, o, err = lota(capsys, "apply", fp16_base, small, "--scales", "2", "--out", out)
    assert_refused(code, o, err, "small.safetensors", "overflows its float16")
    _nothing_written(out)


def test_absurd_learning_rate_warns_but_runs(workdir, capsys, tmp_path):
    out = tmp_path / "o"
    args = [a for a in ADAPT if a not in ("--lr", "1e-2")]
    code, o, err = lota(
        capsys, "adapt", workdir / "base", "--data", workdir / "a.jsonl", "--out", out, *args,
        "--lr", "2", "--optimizer", "sgd",
    )  # fmt: skip
    assert code == 0, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lota: warning:"), err
    assert "--lr 2" in lines[0]
    assert (out / "delta.safetensors").exists()
    cfg = AdaptConfig(model="m", data="d", out="o", lr=1e-3, calibration_lr=5.0)
    assert [w for w in cfg.warnings() if "--calibration-lr 5" in w]
    assert AdaptConfig(model="m", data="d", out="o", lr=1e-3).warnings() == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_eval_past_the_models_positions_is_refused(tmp_path, capsys, arch):
    from lota.toy import byte_tokenizer

    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=259, n_embd=32, n_layer=1, n_head=2, n_positions=32)
        )
    else:
        from lota.toy import tiny_llama

        model = tiny_llama(hidden=32, layers=1, heads=2, max_positions=32)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"prompt": "short", "completion": "x"})
        + "\n"
        + json.dumps({"prompt": "p" * 30, "completion": "x"})
        + "\n"
    )
    args = ["eval", tmp_path / "m", "--data", data, "--quiet"]
    assert_refused(*lota(capsys, *args, "--max-new-tokens", "8"), "d.jsonl:2", "32 positions")
    assert_refused(*lota(capsys, *args, "--max-new-tokens", "40"), "--max-new-tokens")
    code, _, err = lota(capsys, *args, "--limit", "1", "--max-new-tokens", "8")
    assert code == 0, err
