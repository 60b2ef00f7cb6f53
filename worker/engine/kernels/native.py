"""Build and load the C kernels once per machine; fall back to torch when that fails.

Plain C through ctypes rather than a torch C++ extension: it compiles in about a second
with the system compiler, needs no torch headers or ninja, and ctypes releases the GIL
during the call so the server's event loop keeps running.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("paged_decode.c")
# Reassociation lets the dot products vectorise; no finite-math assumptions are made.
_FLAGS = [
    "-O3",
    "-march=native",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-fno-math-errno",
    "-fopenmp",
    "-shared",
    "-fPIC",
]


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("BREAKWATER_CACHE") or Path.home() / ".cache" / "breakwater"
    return Path(root) / "kernels"


@cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None (no compiler, BREAKWATER_NATIVE=0, or a failed build)."""
    if os.environ.get("BREAKWATER_NATIVE", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler found: using the slower pure-torch decode attention")
        return None
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()
    lib_path = _cache_dir() / f"paged_decode-{key[:16]}.so"
    if not lib_path.is_file():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            tmp_lib = Path(tmp) / lib_path.name
            proc = subprocess.run(
                [cc, *_FLAGS, str(_SRC), "-o", str(tmp_lib), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if proc.returncode != 0:
                log.warning("could not build native kernels, using torch:\n%s", proc.stderr)
                return None
            os.replace(tmp_lib, lib_path)  # atomic: concurrent workers may race to build
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.paged_decode_attention
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]
    return lib


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """q [B, H, D] -> out [B, H, D]; None when the native path does not apply."""
    lib = load()
    if lib is None or q.dtype != torch.float32 or q.device.type != "cpu":
        return None
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    if h // kvh > 64 or d > 512 or bs > 256:
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    lib.paged_decode_attention(
        out.data_ptr(),
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        b,
        h,
        kvh,
        d,
        bs,
        block_tables.shape[1],
        scale,
        torch.get_num_threads(),
    )
    return out
