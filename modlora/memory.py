"""Where the weights live: on a Linux CPU, in transparent huge pages (docs/design.md, "Weight memory").

A decode step streams every weight once. In 4 KiB pages that walk crosses a page, and needs a TLB
entry, every 64 cache lines; in 2 MiB pages, 512 times less often. torch's allocator (``malloc``)
gets huge pages only where the system's THP mode is ``always`` or the process started with
``THP_MEM_ALLOC_ENABLE=1``; under ``madvise``, a common default, only memory that asks gets them:
:func:`weight_buffer` asks, for the weights alone. Measured on a 2-vCPU Zen 4 VM
(``benchmarks/weight_memory.py``: bf16 Qwen2.5-0.5B, beam 5, two adapters): a decode step 5-10%
faster on 1 and 2 threads.
"""

from __future__ import annotations

import mmap
import sys

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
"""Bytes of an x86-64 (and arm64 4K-granule) transparent huge page."""


def ordinary_buffer(numel: int, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """An uninitialised 1-D tensor from torch's allocator (the biases' buffers; the baseline of
    ``benchmarks/weight_memory.py``)."""
    return torch.empty(numel, dtype=dtype, device=device)


def weight_buffer(numel: int, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """An uninitialised 1-D tensor of ``numel`` elements to hold weights.

    On a Linux CPU: private anonymous memory whose first element sits on a 2 MiB boundary, advised
    ``MADV_HUGEPAGE``, so that the kernel backs it with huge pages as it is first written (where
    ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``; with ``never``
    it is ordinary memory). The mapping is released when the last tensor viewing it is freed.
    Untouched padding (up to 2 MiB of address space, to align the start) costs no memory.
    Any other device or OS: :func:`ordinary_buffer`.
    """
    device = torch.device(device or "cpu")
    if device.type != "cpu" or not sys.platform.startswith("linux") or numel == 0:
        return ordinary_buffer(numel, dtype, device)
    nbytes = numel * dtype.itemsize
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` until the last view is freed
    start = -raw.data_ptr() % HUGE_PAGE  # mmap returns page-aligned memory: start is whole pages
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, len(region) - start)
    except OSError:  # a kernel without transparent huge pages: ordinary memory still serves
        pass
    return raw[start:start + nbytes].view(dtype)
