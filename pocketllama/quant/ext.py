"""The optional C++ CPU kernels (csrc/*.cpp, AVX-512: GEMVs, dequantization, RMSNorm, rotary, decode
attention, a whole decoder layer for decode steps), built with the machine's compiler at first use and
cached under ~/.cache/pocketllama; None (the pure-torch paths run instead) when they cannot be built.

POCKETLLAMA_NO_EXT=1 disables them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))


def _cache_dir(tag: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pocketllama" / "ext" / tag


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


@functools.cache
def kernels() -> Any | None:
    """`torch.ops.pocketllama_quant` (int8/int4/bf16 GEMVs, the int8-activation int4 GEMV (VNNI CPUs), int8/int4
    dequant, rms_norm, rotary_, decode_attention, decode_layer), or None where unavailable."""
    if os.environ.get("POCKETLLAMA_NO_EXT") == "1":
        return None
    flags = _cpu_flags().split()
    if not {"avx512f", "avx512bw"} <= set(flags) or not sys.platform.startswith("linux"):
        return None
    if not SOURCES or shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        return None
    source = b"".join(p.read_bytes() for p in sorted(SOURCES[0].parent.glob("*.[ch]*")))  # sources and headers
    tag = hashlib.sha256(source + torch.__version__.encode() + " ".join(sorted(flags)).encode()).hexdigest()[:16]
    build = _cache_dir(tag)
    build.mkdir(parents=True, exist_ok=True)
    built = any(build.glob("*.so"))
    if not built:
        print("pocketllama: building the quantized CPU kernels (once; about a minute)...", file=sys.stderr)
    try:
        from torch.utils.cpp_extension import load

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load(name=f"pocketllama_quant_{tag[:8]}", sources=[str(p) for p in SOURCES], build_directory=str(build),
                 extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"],
                 is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, headers or ninja: the pure-torch kernels still work
        print(f"pocketllama: quantized CPU kernels unavailable ({type(e).__name__}: {str(e)[:200]}); "
              "using PyTorch's kernels", file=sys.stderr)
        return None
    return torch.ops.pocketllama_quant
