"""Settings declared once: the options of ``lota merge`` and ``lota adapt`` come from
``MergeSettings`` and ``AdaptConfig``, a new field is a new option, and building the command line
imports nothing heavy."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from lota import format as fmt
from lota import merge as merge_module
from lota import settings as decl
from lota import sources
from lota.adapt import AdaptConfig
from lota.cli import build_parser, main
from lota.delta import SparseDelta
from lota.errors import InputError
from lota.settings import MergeSettings, setting
from lota.ticket import Ticket

MERGE_FLAGS = [
    "-h",
    "--help",
    "--quiet",
    "--debug",
    "--method",
    "--weights",
    "--lambda",
    "--density",
    "--drop",
    "--gamma",
    "--epsilon",
    "--seed",
    "--base",
    "--targets",
    "--out",
    "--out-model",
    "--force",
]


def merge_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["merge"]


def parse(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["merge", "a", "b", "--out", "m", *args])


def test_merge_parser_accepts_exactly_todays_flags():
    flags = [s for a in merge_parser()._actions for s in a.option_strings]
    assert flags == MERGE_FLAGS
    assert [a.dest for a in merge_parser()._actions if not a.option_strings] == ["inputs"]
    lam = next(a for a in merge_parser()._actions if "--lambda" in a.option_strings)
    assert (lam.dest, lam.type, lam.metavar) == ("lam", float, None)


def test_an_included_settings_class_adds_its_options_in_place():
    @dataclass(kw_only=True)
    class Command:
        inputs: list[str] = setting(positional=True, nargs="+")
        merge: MergeSettings = decl.included(MergeSettings)
        out: str = setting(required=True)

    p = argparse.ArgumentParser()
    decl.add_arguments(p, Command)
    merge_flags = MERGE_FLAGS[MERGE_FLAGS.index("--method") : MERGE_FLAGS.index("--base")]
    assert decl.flags(MergeSettings) == merge_flags
    assert decl.flags(Command) == ["inputs", *merge_flags, "--out"]
    assert [s for a in p._actions for s in a.option_strings] == [
        "-h",
        "--help",
        *merge_flags,
        "--out",
    ]
    s = decl.from_args(Command, p.parse_args(["a", "b", "--method", "ties", "--out", "m"]))
    assert s == Command(inputs=["a", "b"], merge=MergeSettings(method="ties"), out="m")


def test_defaults_are_the_dataclass_defaults():
    a = parse()
    assert decl.from_args(MergeSettings, a) == MergeSettings()
    assert decl.explicit(MergeSettings, a) == set()
    assert merge_module.DEFAULTS == {
        "density": "0.2",
        "drop": "0.9",
        "gamma": "0.01",
        "epsilon": "0.05",
    }
    assert list(merge_module.DEFAULTS) == ["density", "drop", "gamma", "epsilon"]


def test_given_is_what_the_user_typed():
    a = parse("--method", "ties", "--density", "0.3", "--lambda", "1", "--weights", "1,0.5")
    assert decl.explicit(MergeSettings, a) == {"method", "density", "lambda", "weights"}
    s = decl.from_args(MergeSettings, a, given={"density"})
    assert (s.method, s.density, s.lam, s.weights, s.seed) == ("ties", "0.3", 1.0, [1.0, 0.5], 0)
    assert s.given == {"density"}
    with pytest.raises(InputError, match="'1,x' is not a comma-separated list of numbers"):
        decl.from_args(MergeSettings, parse("--weights", "1,x"))


def test_config_keys_and_order():
    assert list(decl.as_config(MergeSettings())) == [
        "method",
        "weights",
        "lambda",
        "density",
        "drop",
        "gamma",
        "epsilon",
        "seed",
    ]


def test_merged_file_records_the_resolved_config(tmp_path, capsys, monkeypatch):
    save, written = fmt.save, []

    def spy(obj, path, **kw):
        written.append(kw["config"])
        return save(obj, path, **kw)

    paths = []
    for i in range(2):
        t = Ticket({"w": (3, 4)}, {"w": torch.tensor([i, 5, 7 + i])})
        paths.append(str(tmp_path / f"d{i}.safetensors"))
        fmt.save(SparseDelta(t, {"w": torch.tensor([1.0, -2.0, 0.5 * i])}), paths[-1])
    out = tmp_path / "m.safetensors"
    argv = ["merge", *paths, "--method", "ties", "--density", "0.5", "--weights", "1,2"]
    monkeypatch.setattr(fmt, "save", spy)
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    assert fmt.describe(out)["config"] == written[0]
    assert list(written[0].items()) == list(
        {
            "command": "merge",
            "inputs": paths,
            "method": "ties",
            "weights": [1.0, 2.0],
            "lambda": 1.0,
            "density": "0.5",
            "drop": None,
            "gamma": None,
            "epsilon": None,
            "seed": 0,
            "base": None,
        }.items()
    )
    assert main([*argv, "--seed", "1", "--out", str(tmp_path / "n.safetensors")]) == 2
    assert "method 'ties' does not use --seed" in capsys.readouterr().err


def test_help_shows_each_settings_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option
    helps = {a.dest: a.help for a in merge_parser()._actions}
    assert {f.name: helps[f.name] for f, _ in decl.declared(MergeSettings)} == {
        "method": " | ".join(sorted(merge_module.METHODS)) + " (default add)",
        "weights": "comma-separated weight per input",
        "lam": "scale of the result",
        "density": "ties, breadcrumbs: fraction kept (0.2)",
        "drop": "dare-*, della: drop probability (0.9)",
        "gamma": "breadcrumbs: top outlier fraction (0.01)",
        "epsilon": "della: drop spread (0.05)",
        "seed": "dare-*, della: random seed (0)",
    }
    text = merge_parser().format_help()
    assert all(h in text for h in helps.values() if h)


def test_a_new_field_is_a_new_option():
    @dataclass
    class Settings:
        size: int = setting(3, help="how many ({default})")
        fancy: bool = setting(False, help="be fancy")
        not_an_option: bool = True

    p = argparse.ArgumentParser()
    decl.add_arguments(p, Settings)
    assert "how many (3)" in p.format_help() and "--not-an-option" not in p.format_help()
    s = decl.from_args(Settings, p.parse_args(["--size", "5", "--fancy"]))
    assert s == Settings(size=5, fancy=True)
    assert decl.explicit(Settings, p.parse_args([])) == set()
    assert decl.as_config(Settings()) == {"size": 3, "fancy": False}


def test_every_kind_of_option():
    """What ``lota adapt`` spells: positionals, required options, typed None defaults, choices,
    metavars, lists, a second flag for one field, exclusive groups, parsed values."""

    @dataclass
    class Settings:
        model: str = setting(positional=True, help="model folder")
        data: str = setting(required=True, help="training data")
        steps: int | None = setting(None, type=int, help="training steps")
        dtype: str = setting("auto", choices=["auto", "float32"], help="load precision")
        method: str = setting("lota", names=("lota", "fft"), help="{names} (default {default})")
        calibrated: str | None = setting(None, metavar="TUNED", help="a tuned model")
        ticket: str | None = setting(None, help="a ticket", aliases={"--tokens": "ks tokens"})
        protect: list[str] = setting(factory=list, nargs="+", metavar="FILE", help="protected")
        delta: list[str] = setting(factory=list, action="append", metavar="FILE")
        out: str | None = setting(None, exclusive="out", required=True)
        out_model: str | None = setting(None, exclusive="out", required=True)
        max_grad_norm: float | None = setting(1.0, parse=lambda v, flag: v or None)
        progress: bool = field(default=True)

    p = argparse.ArgumentParser(prog="x")
    decl.add_arguments(p, Settings)
    usage = " ".join(p.format_usage().split())
    assert "[--calibrated TUNED]" in usage and "[--protect FILE [FILE ...]]" in usage
    assert "(--out OUT | --out-model OUT_MODEL)" in usage and usage.endswith("model")
    assert "lota | fft (default lota)" in p.format_help()
    a = p.parse_args(["m", "--data", "d", "--out", "o", "--tokens", "t", "--delta", "x"])
    s = decl.from_args(Settings, a, progress=False)
    assert s == Settings("m", "d", ticket="t", delta=["x"], out="o", progress=False)
    assert decl.explicit(Settings, a) == {"data", "out", "ticket", "delta"}
    argv = ["m", "--data", "d", "--out-model", "o", "--steps", "4", "--max-grad-norm", "0"]
    s = decl.from_args(Settings, p.parse_args([*argv, "--protect", "a", "b", "--dtype", "float32"]))
    assert (s.steps, s.max_grad_norm, s.protect, s.dtype, s.out) == (
        4,
        None,
        ["a", "b"],
        "float32",
        None,
    )
    for bad in (["m", "--data", "d"], ["m", "--data", "d", "--out", "o", "--dtype", "int8"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_building_the_command_line_imports_nothing_heavy():
    code = (
        "import sys; from lota.cli import build_parser; build_parser(); "
        "print(sorted({'torch', 'transformers', 'peft', 'numpy'} & set(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- lota adapt
# {flag: (dest, type, nargs, metavar, choices, required, help)} of every option of `lota adapt`
ADAPT_OPTIONS = {
    "--data": ("data", None, None, None, None, True, "training data (prompt/completion, messages or text rows): JSONL, JSON array, CSV/TSV, Parquet, a datasets save_to_disk folder or a Hub dataset name"),
    "--out": ("out", None, None, None, None, True, "output folder"),
    "--split": ("split", None, None, None, None, False, "the split of a datasets folder or Hub dataset to read (default train)"),
    "--prompt-field": ("prompt_field", None, None, "NAME", None, False, "the field of the prompt (default prompt)"),
    "--completion-field": ("completion_field", None, None, "NAME", None, False, "the field of the completion (default completion)"),
    "--messages-field": ("messages_field", None, None, "NAME", None, False, "the field of a conversation, whose last message is the assistant's answer (default messages)"),
    "--text-field": ("text_field", None, None, "NAME", None, False, "the field of a plain text trained on every token (default text)"),
    "--method": ("method", None, None, None, None, False, "lota | fft | lora | random | bottomk | embeddings | ks-lottery (default lota)"),
    "--sparsity": ("sparsity", None, None, None, None, False, "fraction of target entries frozen, in [0, 1) (default 0.9)"),
    "--calibration-steps": ("calibration_steps", int, None, None, None, False, "dense steps before extraction (default 8)"),
    "--calibration-lr": ("calibration_lr", float, None, None, None, False, "learning rate of calibration (default --lr)"),
    "--calibration": ("calibration", None, None, None, None, False, "how --method lota and bottomk calibrate: adamw | sgd | rmsprop | adafactor | fisher | lora (default adamw)"),
    "--fisher-dtype": ("fisher_dtype", None, None, None, None, False, "--calibration fisher: precision of the score buffer, float32 | bfloat16 (default float32)"),
    "--lora-calibration-score": ("lora_calibration_score", None, None, None, None, False, "--calibration lora: the ticket from the adapter's merged change or the full weights' squared gradients, change | gradient (default change)"),
    "--calibrated": ("calibrated", None, None, "TUNED", None, False, "a model already fine-tuned from MODEL (e.g. a Trainer checkpoint): its task vector gives the ticket, no calibration run"),
    "--steps": ("steps", int, None, None, None, False, "training steps (default: one epoch)"),
    "--epochs": ("epochs", float, None, None, None, False, "training epochs instead of --steps"),
    "--lr": ("lr", float, None, None, None, False, "learning rate (default 1e-5)"),
    "--batch-size": ("batch_size", int, None, None, None, False, None),
    "--group-by-length": ("group_by_length", None, 0, None, None, False, "batch examples of similar length together, so that less of each batch is padding (batches keep a random order)"),
    "--optimizer": ("optimizer", None, None, None, None, False, "adamw | rmsprop | sgd (default adamw)"),
    "--weight-decay": ("weight_decay", float, None, None, None, False, None),
    "--momentum": ("momentum", float, None, None, None, False, "momentum for rmsprop and sgd"),
    "--max-grad-norm": ("max_grad_norm", float, None, None, None, False, "gradient clipping, 0 to disable"),
    "--grad-accum": ("grad_accum", int, None, None, None, False, "micro-batches per process and step; --batch-size is the global batch (default 1)"),
    "--dist-timeout": ("dist_timeout", float, None, None, None, False, "minutes a process waits for the others (the main process alone writes checkpoints and outputs) before the run fails (default 120.0)"),
    "--report-to": ("report_to", None, None, None, None, False, "also log metrics to: none | tensorboard (OUT/tensorboard); OUT/metrics.jsonl always"),
    "--fsdp": ("fsdp", None, 0, None, None, False, "shard weights across processes with FSDP2 (under torchrun / accelerate launch)"),
    "--seed": ("seed", int, None, None, None, False, None),
    "--targets": ("targets", None, None, None, None, False, "regex of parameter names to adapt (default: linear layers in blocks)"),
    "--ticket": ("ticket", None, None, None, None, False, "reuse this ticket (or delta's ticket); skips calibration"),
    "--tokens": ("ticket", None, None, None, None, False, "--method ks-lottery: the folder (or ticket) written by 'lota ks'"),
    "--protect": ("protect", None, "+", "FILE", None, False, "tickets or deltas to keep untouched (LoTTO)"),
    "--protect-mode": ("protect_mode", None, None, None, None, False, "constrained | flip (default constrained)"),
    "--max-length": ("max_length", int, None, None, None, False, "tokens per example, at most the model's positions (default 512, or the positions if fewer)"),
    "--lora-r": ("lora_r", int, None, None, None, False, None),
    "--lora-alpha": ("lora_alpha", int, None, None, None, False, None),
    "--device": ("device", None, None, None, None, False, "where to train: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N (default auto)"),
    "--dtype": ("dtype", None, None, None, ("auto", "float32", "bfloat16", "float16"), False, "load precision"),
    "--mixed-precision": ("mixed_precision", None, None, None, None, False, "compute precision of the forward and backward passes (torch autocast): no | bf16 | fp16 (default no: the weights' own)"),
    "--master-weights": ("master_weights", None, None, None, None, False, "dense phases (calibration, fft) on 16-bit weights: the optimizer updates float32 copies of the targets, or the 16-bit weights themselves: float32 | none (default float32)"),
    "--gradient-checkpointing": ("gradient_checkpointing", None, 0, None, None, False, "recompute each block's activations in the backward pass (transformers' non-reentrant checkpointing): less memory, about a third more compute"),
    "--deterministic": ("deterministic", None, 0, None, None, False, "on a GPU, deterministic kernels only (torch.use_deterministic_algorithms, cuBLAS's fixed workspace), so that a resumed run ends with the same bits as an uninterrupted one; slower, and refused by ops that have no deterministic kernel"),
    "--values-dtype": ("values_dtype", None, None, None, ("auto", "float32", "bfloat16", "float16"), False, "precision of the delta's values on disk: auto (default) writes on bf16/fp16 weights the saved model's exact change (16 bits, float32 where they do not hold it), on float32 weights float32; float32 keeps the float32 master values; bfloat16 / float16 round them"),
    "--save-model": ("save_model", None, 0, None, None, False, "also write a loadable model folder to OUT/model"),
    "--checkpoint-every": ("checkpoint_every", int, None, None, None, False, "steps between checkpoints (default 100; every phase start and the end of training always checkpoint, and a calibration ends in its ticket)"),
    "--resume": ("resume", None, 0, None, None, False, "continue an interrupted run (also automatic)"),
    "--restart": ("restart", None, 0, None, None, False, "discard an interrupted run's checkpoint and start over"),
    "--force": ("force", None, 0, None, None, False, "write into an existing, non-empty --out"),
}  # fmt: skip
# the defaults of the options, as `lota adapt` has always had them
ADAPT_DEFAULTS = {
    "split": None,
    "prompt_field": "prompt",
    "completion_field": "completion",
    "messages_field": "messages",
    "text_field": "text",
    "method": "lota",
    "sparsity": "0.9",
    "calibration_steps": 8,
    "calibrated": None,
    "calibration_lr": None,
    "calibration": "adamw",
    "fisher_dtype": "float32",
    "lora_calibration_score": "change",
    "steps": None,
    "epochs": None,
    "lr": 1e-5,
    "batch_size": 8,
    "group_by_length": False,
    "optimizer": "adamw",
    "weight_decay": 0.0,
    "momentum": 0.0,
    "max_grad_norm": 1.0,
    "grad_accum": 1,
    "fsdp": False,
    "dist_timeout": 120.0,
    "report_to": "none",
    "seed": 0,
    "targets": None,
    "ticket": None,
    "protect": [],
    "protect_mode": "constrained",
    "max_length": None,
    "lora_r": 16,
    "lora_alpha": 32,
    "device": "auto",
    "dtype": "auto",
    "mixed_precision": "no",
    "master_weights": "float32",
    "gradient_checkpointing": False,
    "deterministic": False,
    "values_dtype": "auto",
    "save_model": False,
    "checkpoint_every": 100,
    "force": False,
    "resume": False,
    "restart": False,
}


def adapt_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["adapt"]


def parse_adapt(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["adapt", "m", "--data", "d", "--out", "o", *args])


def test_adapt_parser_has_exactly_todays_options():
    actions = [a for a in adapt_parser()._actions if a.dest not in ("help", "quiet", "debug")]
    got = {
        flag: (
            a.dest,
            a.type,
            a.nargs,
            a.metavar,
            a.choices and tuple(a.choices),
            a.required,
            a.help,
        )
        for a in actions
        for flag in a.option_strings
    }
    assert got == ADAPT_OPTIONS
    assert sum(len(a.option_strings) for a in actions) == len(ADAPT_OPTIONS)
    (model,) = [a for a in actions if not a.option_strings]
    assert (model.dest, model.help) == (
        "model",
        "model folder (config, safetensors weights, tokenizer)",
    )
    assert ADAPT_OPTIONS["--method"][-1] == sources.method_help()


def test_adapt_defaults_are_the_dataclass_defaults():
    fields = dataclasses.fields(AdaptConfig)
    defaults = {
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
        for f in fields[3:]
    }
    assert [f.name for f in fields[:3]] == ["model", "data", "out"]
    assert defaults == {**ADAPT_DEFAULTS, "progress": True}
    assert list(defaults) == [*ADAPT_DEFAULTS, "progress"]  # config.yaml's key order
    a = parse_adapt()
    assert decl.from_args(AdaptConfig, a) == AdaptConfig("m", "d", "o")
    assert decl.from_args(AdaptConfig, a, progress=False) == AdaptConfig(
        "m", "d", "o", progress=False
    )


def test_adapt_options_fill_their_fields():
    cfg = decl.from_args(AdaptConfig, parse_adapt("--max-grad-norm", "0"))
    assert cfg.max_grad_norm is None
    assert decl.from_args(AdaptConfig, parse_adapt("--max-grad-norm", "0.5")).max_grad_norm == 0.5
    assert decl.from_args(AdaptConfig, parse_adapt("--tokens", "ks")).ticket == "ks"
    argv = ["--protect", "a", "b", "--steps", "3", "--lr", "1e-4", "--fsdp", "--dtype", "bfloat16"]
    cfg = decl.from_args(AdaptConfig, parse_adapt(*argv))
    assert (cfg.protect, cfg.steps, cfg.lr, cfg.fsdp, cfg.dtype) == (
        ["a", "b"],
        3,
        1e-4,
        True,
        "bfloat16",
    )
    assert cfg.progress is True and decl.explicit(AdaptConfig, parse_adapt()) == {"data", "out"}


def test_adapt_config_is_one_class_everywhere():
    import lota
    from lota import adapt as adapt_module
    from lota import adapt_config as decl

    assert adapt_module.AdaptConfig is lota.AdaptConfig is decl.AdaptConfig


def test_a_new_adapt_field_is_a_new_option():
    @dataclass
    class Config(AdaptConfig):
        warmup: int = decl.setting(0, help="warmup steps ({default})")

    p = argparse.ArgumentParser()
    decl.add_arguments(p, Config)
    assert "warmup steps (0)" in p.format_help()
    cfg = decl.from_args(Config, p.parse_args(["m", "--data", "d", "--out", "o", "--warmup", "5"]))
    assert cfg == Config("m", "d", "o", warmup=5)
    assert dataclasses.asdict(cfg)["warmup"] == 5  # and config.yaml records it


def test_adapt_config_and_its_options_import_nothing_heavy():
    code = (
        "import sys, lota; from lota.cli import build_parser; build_parser().parse_args("
        "['adapt', 'm', '--data', 'd', '--out', 'o']); lota.AdaptConfig('m', 'd', 'o').warnings(); "
        "print(sorted({'torch', 'transformers', 'peft', 'numpy'} & set(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
