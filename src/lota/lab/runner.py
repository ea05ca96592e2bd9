"""The lab's run cache: every training run, merged model and score is computed once and kept.

A run is described by a plain dictionary (its *spec*: start model, task, method, learning rate,
seed, ...). Its folder under ``CACHE/runs`` is named from a readable label and a hash of the spec,
the scale and the base model's fingerprint, so a finished run is found again by an identical
request and never confused with a different one. ``result.json`` is written last (atomically):
a folder without it is an unfinished run and is redone from the start. Scores live beside it in
``scores.json``, one entry per (task, split, template).

``prefetch`` runs independent specs in worker processes (``--jobs``), each with one torch thread;
the claims then read the cached results in order, so a parallel run and a serial run give the
same results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..fileio import FolderLock, create_folder, remove_folders, write_json, write_text
from . import tasks as T
from .ledger import Ledger
from .scales import DATA_SEED, GENERAL, MAX_NEW_TOKENS, SCALES


def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=5).hexdigest()


@dataclass
class Run:
    id: str
    folder: Path
    spec: dict
    info: dict

    @property
    def model(self) -> str:
        return str(self.folder / "model")

    @property
    def delta(self) -> str:
        return str(self.folder / "delta.safetensors")


class Pending(Exception):
    """A result the lab would have to train for, asked of a lab that does not train; the message
    is the run's or model's name."""


class Lab:
    """Data, runs and scores of one bench directory."""

    def __init__(
        self,
        out: str | Path,
        base: str,
        scale: str = "full",
        jobs: int = 1,
        progress=True,
        ledger: str | Path | None = None,
        commit: bool = False,
        device: str = "auto",
        trains: bool = True,
    ):
        from ..models import load_tokenizer
        from ..weights import WeightReader
        from .base import lab_recipe
        from .realbase import is_real_base

        # The ledger (optional) keeps what the report needs of every run and model, without
        # weights, so a bench continued on another machine retrains only what a missing result
        # needs.
        self.ledger = Ledger(ledger, commit, read_only=not trains) if ledger is not None else None
        # ``trains=False`` (a report from what is done): nothing is trained, a run or model
        # whose results are missing raises ``Pending``, and the ledger is only read
        self.trains = trains
        self.device = device  # training and scoring: auto is the GPU when torch sees one
        self._builders: dict[str, object] = {}  # derived folder name -> its build function
        self.out = Path(out)
        self.cache = self.out / "cache"
        self.base = str(base)
        self.scale_name = scale
        self.scale = SCALES[scale]
        self.jobs = max(1, int(jobs))
        self.progress = progress
        # a base the lab cannot use is refused here, before anything is trained or written
        self.recipe = None if is_real_base(self.base) else lab_recipe(self.base)
        self.base_fp = WeightReader(self.base, "base model").fingerprint()
        load_tokenizer(self.base)
        self.log: list[str] = []

    @contextmanager
    def writing(self):
        """Hold the bench folder while this process fills it: a second demo or bench into the same
        folder is refused naming this one. (The workers of ``prefetch`` write only the run folders
        this process hands them, each under that run's own lock.)"""
        created = create_folder(self.out)
        try:
            lock = FolderLock(self.out, follow_link=True).acquire()
        except BaseException:
            remove_folders(created)
            raise
        try:
            yield self
        finally:
            lock.release()

    # ------------------------------------------------------------------------ data
    def rows(self, task: str, split: str, template: str = "default") -> list[dict]:
        s = self.scale
        if task == "sql-real":
            limit = {"train": s["n_train"], "validation": s["n_val"]}.get(split, s["real_sql"])
            rows = T.real_sql(split, limit=limit) or []
        else:
            rows = T.generate(task, DATA_SEED, s["n_train"], s["n_val"], s["n_test"])[split]
        if template == "paraphrase":
            rows = [T.paraphrase(task, r) for r in rows]
        return rows

    def data_file(self, task: str, split: str = "train") -> str:
        path = self.cache / "data" / self.scale_name / f"{task}_{split}.jsonl"
        if not path.exists():
            lines = "".join(
                json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                for r in self.rows(task, split)
            )
            write_text(path, lines)
        return str(path)

    # ------------------------------------------------------------------------ runs
    def key(self, spec: dict) -> str:
        label = "-".join(
            str(spec[k]).replace("/", "_")
            for k in ("task", "method", "lr", "seed")
            if spec.get(k) is not None
        )
        return f"{label}-{_digest([spec, self.scale, self.base_fp])}"

    def folder(self, spec: dict) -> Path:
        return self.cache / "runs" / self.key(spec)

    def done(self, spec: dict) -> bool:
        folder = self.folder(spec)
        return (folder / "result.json").exists() or "info" in self._entry(folder.name)

    def run(self, spec: dict) -> Run:
        """The run of ``spec``: read from the cache or the ledger, or trained now. A run read from
        the ledger may have no weights here; ``materialize`` trains them when something needs
        them."""
        folder = self.folder(spec)
        if not (folder / "result.json").exists():
            entry = self._entry(folder.name)
            if "info" in entry:
                return Run(folder.name, folder, spec, entry["info"])
            self._train(spec, folder)
        result = json.loads((folder / "result.json").read_text())
        if self.ledger is not None and "info" not in self._entry(folder.name):
            self.ledger.record(folder.name, spec=spec, info=result["info"])
        return Run(folder.name, folder, spec, result["info"])

    def materialize(self, spec: dict) -> Run:
        """The run of ``spec`` with its weights in the cache (trained again if only the ledger
        had it: runs are deterministic, so it is the same run)."""
        folder = self.folder(spec)
        if not (folder / "result.json").exists():
            self._train(spec, folder)
        return self.run(spec)

    def start_model(self, spec: dict) -> str:
        start = spec.get("start")
        return self.base if start is None else self.materialize(start).model

    def _train(self, spec: dict, folder: Path) -> None:
        if not self.trains:
            raise Pending(folder.name)
        # what the run starts from and protects is trained first: each takes (and gives back)
        # its own lock
        model = self.start_model(spec)
        protect = [self.materialize(p).delta for p in spec.get("protect", [])]
        protect += [self.file(p) for p in spec.get("protect_files", [])]
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FolderLock(folder):
            self._train_locked(spec, folder, model, protect)

    def _train_locked(self, spec: dict, folder: Path, model: str, protect: list[str]) -> None:
        from ..adapt import AdaptConfig, adapt
        from ..train import current_rss_mb, release_freed_memory

        s = self.scale
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished run: start it over
        cfg = AdaptConfig(
            model=model,
            data=self.data_file(spec["task"]),
            out=str(folder),
            method=spec["method"],
            sparsity=str(spec.get("sparsity", "0.9")),
            calibration_steps=spec.get("calibration", s["calibration"]),
            calibration_lr=s["calibration_lr"] * spec.get("calibration_lr_scale", 1),
            steps=spec.get("steps", s["steps"]),
            lr=spec["lr"],
            batch_size=s["batch"],
            seed=spec["seed"],
            protect=protect,
            protect_mode=spec.get("protect_mode", "constrained"),
            ticket=spec.get("tokens"),
            max_length=_max_length(model, s.get("max_length", 256)),
            dtype=s.get("dtype", "auto"),
            save_model=True,
            # the float32 master values, as every run of the ledger holds (the lab's scales
            # train in float32, where adapt's default writes the same file)
            values_dtype="float32",
            checkpoint_every=10**9,
            progress=False,
            device=self.device,
            **_calibrator(spec),
        )
        release_freed_memory()
        before = current_rss_mb()
        info = adapt(cfg)
        info["memory"] = phase_memory(folder / "metrics.jsonl", before)
        write_json(folder / "result.json", {"spec": spec, "info": info})

    # ------------------------------------------------------------------------ scores
    def score(self, model: str, task: str, split: str = "test", template: str = "default") -> dict:
        """Scores of the model folder on a task split (cached beside the model)."""

        def evaluate():
            if not Path(model).exists():
                self._rebuild(model)
            return self._evaluate(model, task, split, template)

        return self.measured(model, f"{task}/{split}/{template}", evaluate)

    def measured(self, model: str, key: str, compute):
        """``compute()``, a measurement of the model folder (a score, or its ticket's overlap with
        another run's), cached beside the model under ``key`` and recorded in the ledger with its
        scores, so a report from the ledger alone needs neither the weights nor the deltas."""
        cached = self._cached_scores(model)
        if key not in cached:
            cached[key] = compute()
            write_json(self._scores_path(model), cached)
            name = self._ledger_name(model)
            if name is not None:
                self.ledger.record(name, scores=cached)
        return cached[key]

    def _cached_scores(self, model: str) -> dict:
        path = self._scores_path(model)
        local = json.loads(path.read_text()) if path.exists() else {}
        name = self._ledger_name(model)
        return {**self._entry(name).get("scores", {}), **local} if name else local

    # ------------------------------------------------------------------------ the ledger
    def _entry(self, name: str) -> dict:
        return {} if self.ledger is None else self.ledger.entry(name)

    def _ledger_name(self, model: str) -> str | None:
        if self.ledger is None:
            return None
        resolved = Path(model).resolve()
        if resolved == Path(self.base).resolve():
            return f"base-{self.scale_name}-{_digest([self.base_fp])}"
        folder = resolved.parent
        return folder.name if self.cache.resolve() in folder.parents else None

    def _rebuild(self, model: str) -> None:
        """Make the weights of a model the ledger knows but this cache lacks."""
        folder = Path(model).parent
        if not self.trains:
            raise Pending(folder.name)
        if folder.name in self._builders:
            self._builders[folder.name]()
            return
        spec = self._entry(folder.name).get("spec")
        if spec is None:
            raise RuntimeError(f"{model} is neither in the cache nor in the ledger")
        self.materialize(spec)

    def file(self, name: str) -> str:
        """A file a claim registered with ``derived_file``, made now if the cache lacks it."""
        path = self.cache / "files" / name
        if not path.exists():
            self._builders[name]()
        return str(path)

    def derived_file(self, label: str, recipe: dict, build) -> str:
        """Register a file (a ticket) made by ``build(path)`` from runs; returns its name for
        ``file``. It is made only when a run that reads it is trained."""
        name = f"{label}-{_digest([recipe, self.scale, self.base_fp])}.safetensors"
        path = self.cache / "files" / name

        def make():
            path.parent.mkdir(parents=True, exist_ok=True)
            build(str(path))

        self._builders[name] = make
        return name

    def __getstate__(self):  # worker processes get the lab without the build functions
        return {**self.__dict__, "_builders": {}}

    def _scores_path(self, model: str) -> Path:
        folder = Path(model).resolve().parent
        if self.cache.resolve() in folder.parents:
            return folder / "scores.json"
        # a model outside the cache (the base): its scores are kept in the cache, not beside it
        return self.cache / "external" / _digest([str(Path(model).resolve())]) / "scores.json"

    def forgetting(self, model: str) -> float:
        """General-ability forgetting: the model's mean per-token cross-entropy on held-out
        pretraining-style text minus the base's (positive: the model forgot)."""
        return self.score(model, GENERAL)["score"] - self.score(self.base, GENERAL)["score"]

    def _evaluate(self, model_path: str, task: str, split: str, template: str) -> dict:
        from ..data import Example
        from ..evaluate import generate
        from ..models import load_model, load_tokenizer

        if task == GENERAL:
            return self._general(model_path)

        kind = "sql" if task == "sql-real" else task  # real questions are scored as the sql task
        rows = self.rows(task, split, template)
        if not rows:
            return {"score": None, "n": 0}
        tokenizer = load_tokenizer(model_path)
        model = load_model(model_path, self.scale.get("dtype", "auto"), self.resolved_device())
        examples = [Example(prompt=r["prompt"], completion=r["completion"]) for r in rows]
        ended: list[bool] = []
        preds = generate(
            model,
            tokenizer,
            examples,
            min(
                MAX_NEW_TOKENS[task if task in MAX_NEW_TOKENS else kind],
                self.scale.get("max_new_tokens", 10**6),
            ),
            self.scale["eval_batch"],
            show_progress=False,
            ended=ended,
        )
        scorer = T.TASKS[kind].score
        result = {k: v for k, v in scorer(preds, rows).items() if k != "correct"}
        result["eos_rate"] = sum(ended) / len(ended)
        result["n"] = len(rows)
        result["sample"] = [{"prompt": r["prompt"], "prediction": p} for r, p in zip(rows, preds)][
            :3
        ]
        return result

    def _general(self, model_path: str) -> dict:
        from ..models import load_model, load_tokenizer
        from .base import general_loss, held_out

        if self.recipe is not None:
            docs = held_out(self.recipe, self.scale.get("general_docs", 256))
            seq = self.recipe["seq"]
        else:  # the real base: real text none of its tasks holds
            docs, seq = T.python_docs(self.scale["general_docs"]), self.scale["general_seq"]
        model = load_model(model_path, self.scale.get("dtype", "auto"), self.resolved_device())
        return general_loss(model, load_tokenizer(model_path), docs, seq)

    def resolved_device(self):
        """The torch device the lab runs on (its ``device`` setting, checked)."""
        from ..dist import resolve_device

        return resolve_device(self.device, "--device")

    # ------------------------------------------------------------------------ derived models
    def derived(self, label: str, recipe: dict, build) -> str:
        """A model folder made by ``build(folder)`` (a merge, a transfer), cached by its recipe."""
        folder = self.cache / "models" / f"{label}-{_digest([recipe, self.scale, self.base_fp])}"

        def make():
            folder.parent.mkdir(parents=True, exist_ok=True)
            with FolderLock(folder):
                if folder.exists():
                    shutil.rmtree(folder)
                folder.mkdir()
                build(str(folder / "model"))
                write_json(folder / "done.json", recipe)

        self._builders[folder.name] = make
        if not (folder / "done.json").exists() and "recipe" not in self._entry(folder.name):
            if not self.trains:
                raise Pending(folder.name)
            make()
            if self.ledger is not None:
                self.ledger.record(folder.name, recipe=recipe)
        return str(folder / "model")

    # ------------------------------------------------------------------------ parallel prefetch
    def prefetch(self, items: list[tuple[dict, list[tuple[str, str, str]]]]) -> None:
        """Train the specs not yet cached and compute the listed scores of each, in parallel.

        ``items``: (spec, [(task, split, template), ...]). Specs whose start or protected runs are
        not finished yet are left for the serial pass (they depend on another item). A lab that
        does not train fetches nothing."""
        if not self.trains:
            return
        todo, seen = [], set()
        for spec, scores in items:
            key = self.key(spec)
            if key in seen:
                continue
            seen.add(key)
            deps = ([spec["start"]] if spec.get("start") else []) + spec.get("protect", [])
            if not all(self.done(d) for d in deps):
                continue
            have = self._cached_scores(str(self.folder(spec) / "model"))
            missing = [s for s in scores if "/".join(s) not in have]
            if not self.done(spec) or missing:
                todo.append((spec, missing))
        if not todo:
            return
        if self.jobs == 1 or len(todo) == 1:
            for spec, scores in todo:
                self._fetch(spec, scores)
                self._tick(spec)
            return
        import multiprocessing as mp

        with ProcessPoolExecutor(
            max_workers=self.jobs,
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
        ) as pool:
            futures = [pool.submit(_fetch_in_worker, self, spec, scores) for spec, scores in todo]
            for (spec, _), f in zip(todo, futures):
                f.result()
                self._tick(spec)

    def _fetch(self, spec: dict, scores: list[tuple[str, str, str]]) -> None:
        run = self.run(spec)
        for task, split, template in scores:
            self.score(run.model, task, split, template)

    def _tick(self, spec: dict) -> None:
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(f"  done: {self.key(spec)}")


def _worker_init() -> None:
    import warnings

    warnings.filterwarnings("ignore")  # as in the main process: library deprecation chatter
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..model_folder import quiet_transformers

    quiet_transformers()


def _fetch_in_worker(lab: Lab, spec: dict, scores) -> None:
    lab._fetch(spec, scores)


# spec key -> AdaptConfig field of the calibration method. The spec's ``calibration`` is the
# number of calibration steps, so the method goes by another key.
CALIBRATOR_KEYS = {
    "calibration_method": "calibration",
    "fisher_dtype": "fisher_dtype",
    "lora_calibration_score": "lora_calibration_score",
}


def _calibrator(spec: dict) -> dict:
    """The calibration settings a spec names, as AdaptConfig keywords. Specs without them (every
    spec that does not ask for another calibration) leave the config's defaults, so their
    configs and cache keys are what they were."""
    return {field: spec[key] for key, field in CALIBRATOR_KEYS.items() if key in spec}


def phase_memory(metrics: Path, before_mb: float | None) -> dict:
    """Each phase's measured peak resident memory (the training log's ``phase_peak_rss_mb``, whose
    counter restarts at every phase) and what the run added to the process: the peak minus the
    memory before the run loaded anything. The lab's workers run many specs in one process, so
    the added part is the figure that compares runs."""
    peaks: dict[str, float] = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "phase_peak_rss_mb" in rec:
            phase = rec["phase"]
            peaks[phase] = max(peaks.get(phase, 0.0), rec["phase_peak_rss_mb"])
    added = {
        p: round(v - before_mb, 1) if before_mb is not None else None for p, v in peaks.items()
    }
    return {
        "before_mb": None if before_mb is None else round(before_mb, 1),
        "phase_peak_mb": peaks,
        "phase_added_mb": added,
        "peak_added_mb": max((v for v in added.values() if v is not None), default=None),
    }


def _max_length(model: str, wanted: int = 256) -> int:
    """The scale's tokens per example (256), or the model's positions where it has fewer (the
    tiny bases of the tests): lota refuses a ``--max-length`` beyond a model's positions."""
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    positions = config.get("max_position_embeddings")
    return min(wanted, positions) if isinstance(positions, int) and positions > 0 else wanted
