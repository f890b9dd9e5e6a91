"""Weights in anonymous memory backed by transparent huge pages.

Decode streams every weight once per token; with 4 KiB pages a GEMV spends part of its bandwidth on TLB
misses, and file-backed (mmap) pages never become huge pages. Copying each weight into a 2 MiB-aligned
anonymous buffer marked MADV_HUGEPAGE measured +15-25% decode tokens/s for a bf16 1B model on 2 cores.
Where the kernel refuses (THP disabled, not Linux) the copy is still an ordinary tensor.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch

HUGE_PAGE = 2 * 1024 * 1024
MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty_huge(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose pages may be 2 MiB huge pages (tensors under 2 MiB: plain)."""
    nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
    madvise = _madvise()
    if nbytes < HUGE_PAGE or madvise is None:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # untouched: no page is resident yet
    addr = raw.data_ptr()
    page_start = addr // mmap.PAGESIZE * mmap.PAGESIZE
    madvise(page_start, addr + raw.numel() - page_start, MADV_HUGEPAGE)  # failure: ordinary pages
    offset = -addr % HUGE_PAGE
    return raw[offset:offset + nbytes].view(dtype).view(shape)


def to_huge(t: torch.Tensor) -> torch.Tensor:
    """A copy of CPU tensor `t` in huge-page-backed memory (or `t` itself when it is small)."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < HUGE_PAGE:
        return t
    out = empty_huge(t.shape, t.dtype)
    out.copy_(t)
    return out
