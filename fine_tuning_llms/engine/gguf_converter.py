"""llama.cpp's own HF → GGUF converter, taken from the llama-cpp-python sdist on PyPI.

The ecosystem maintains ``convert_hf_to_gguf.py`` (with its ``conversion/`` package and the
matching ``gguf-py``) for every architecture llama.cpp runs; re-implementing its tensor names
and q/k permutations is how exports break. The sdist of llama-cpp-python vendors one version of
it under ``vendor/llama.cpp/``; ``make install`` extracts those three paths once into the cache:

    python -m fine_tuning_llms.engine.gguf_converter      # what `make install` runs (needs PyPI)

The converter runs in its own process with its own ``gguf-py`` first on ``PYTHONPATH``, so the
``gguf`` package transformers uses to *read* GGUF files is never replaced.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
MEMBERS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
INSTALL = "`make install` (or `python -m fine_tuning_llms.engine.gguf_converter`)"


def converter_dir(cache: Path) -> Path:
    return cache / f"llama.cpp-convert-{LLAMA_CPP_PYTHON}"


def converter_script(cache: Path) -> Path:
    """The installed ``convert_hf_to_gguf.py``, or a UserError naming the install command."""
    folder = converter_dir(cache)
    if not all((folder / m).exists() for m in MEMBERS):
        raise UserError(f"llama.cpp's GGUF converter is not installed in {folder}; run {INSTALL}")
    return folder / "convert_hf_to_gguf.py"


def converter_env(cache: Path) -> dict:
    folder = converter_dir(cache)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder / "gguf-py"), str(folder), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("NO_LOCAL_GGUF", None)  # the script's switch: when unset it also puts its own gguf-py first
    return env


def _extract(sdist: Path, target: Path) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].split("/")[0] in MEMBERS
                   and (m.isfile() or m.isdir())]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(target, members=members, filter="data")


def install_converter(cache: Path, sdist: Path | None = None) -> Path:
    """Download the sdist (unless given) and extract the converter into the cache, atomically."""
    folder = converter_dir(cache)
    if all((folder / m).exists() for m in MEMBERS):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".convert-") as work:
        work_path = Path(work)
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(work_path), "-q"]
            if subprocess.run(cmd).returncode != 0:
                raise UserError(f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON} from PyPI; run this "
                                "where PyPI is reachable, or pass the sdist file")
            sdist = work_path / SDIST
        staged = work_path / "staged"
        _extract(sdist, staged)
        if not all((staged / m).exists() for m in MEMBERS):
            raise UserError(f"{sdist} does not contain vendor/llama.cpp/{{{','.join(MEMBERS)}}}")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    log.info("Installed llama.cpp's GGUF converter (llama-cpp-python %s) into %s", LLAMA_CPP_PYTHON, folder)
    return folder


if __name__ == "__main__":
    from .models import cache_root

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    given = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    try:
        print(install_converter(cache_root(), given))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
