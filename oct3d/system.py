"""Process-wide settings for fast CPU runs: glibc malloc thresholds.

3D activations (clips, volumes) are tens to hundreds of MiB each. glibc's malloc serves blocks
above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh ``mmap`` pages and
returns them to the OS when freed, so every step page-faults its large tensors in again: on
the development VM a U-Net inference at 96x96x64 (base width 16) took 282 ms with default
malloc and 173 ms with :func:`steady_malloc` (vanilla; octave 190 -> 150 ms). oct3d's own
command-line entry points (``lightning``/``oct3d fit``, ``oct3d infer``, ``oct3d segment``) apply
it at start-up; ``OCT3D_STEADY_MALLOC=0`` turns that off. In your own scripts call
:func:`steady_malloc` once, set ``MALLOC_MMAP_THRESHOLD_=536870912
MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment, or preload jemalloc or tcmalloc. glibc
before 2.35 caps the mmap threshold at 32 MiB, so larger tensors are still page-faulted in
there; jemalloc or tcmalloc avoid that.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["foreach_kwargs", "run_tool", "steady_malloc", "steady_malloc_unless_disabled"]

#: Blocks below this are served from the heap and kept for reuse (glibc's ``M_MMAP_THRESHOLD``).
MMAP_THRESHOLD = 512 << 20
#: Freed memory at the top of the heap is returned to the OS only beyond this (``M_TRIM_THRESHOLD``).
TRIM_THRESHOLD = 1 << 30
#: The largest mmap threshold glibc before 2.35 accepts on 64-bit systems.
OLD_GLIBC_MAX_MMAP = 32 << 20


def steady_malloc() -> bool:
    """Keep glibc's malloc from returning large blocks to the OS between steps (Linux, glibc only).

    Raises glibc's mmap and trim thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`), the
    steady state jemalloc or tcmalloc give (glibc before 2.35 accepts an mmap threshold of at most
    32 MiB, which is then used): a process keeps the memory of its largest step for
    reuse instead of page-faulting it in again every step. The cost is that freed memory stays
    with the process (its resident size does not shrink after a peak). The benchmark tools use it
    so that ratios measure computation: otherwise the model with the larger tensors (vanilla) pays
    up to a quarter of a U-Net training step in page faults, by an amount that depends on the
    allocator's history. Returns whether it applied.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    trimmed = bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))
    # glibc before 2.35 rejects an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2 on 64-bit); take its
    # maximum there. Blocks above it are still page-faulted in every step: jemalloc or tcmalloc avoid that.
    mapped = bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) or bool(mallopt(m_mmap_threshold, OLD_GLIBC_MAX_MMAP))
    return trimmed and mapped


def steady_malloc_unless_disabled() -> bool:
    """:func:`steady_malloc`, unless ``OCT3D_STEADY_MALLOC`` is ``0``/``false``/``no``/``off``; what
    oct3d's command-line entry points call at start-up. Returns whether it applied."""
    if os.environ.get("OCT3D_STEADY_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return steady_malloc()


def run_tool(main: Callable[[], int | None]) -> int:
    """Run a command-line ``main`` and return its exit status; a reader that closes the output pipe
    early (``oct3d segment ... | head -2``) ends the tool quietly with status 1 instead of a
    ``BrokenPipeError`` traceback (the recipe of Python's ``signal`` documentation)."""
    import sys

    try:
        status = main()
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe (a worker's): a real error
        # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return int(status or 0)


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (``poll`` reports an error on the
    writing end). True without ``poll`` (Windows: there a closed stdout is the likelier case); False
    for a standard output without a file descriptor, which no reader can close."""
    import io
    import select
    import sys

    if not hasattr(select, "poll"):
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # no file descriptor (a replaced stdout)
        return False


def foreach_kwargs(params: Sequence[torch.Tensor]) -> dict[str, bool]:
    """``{"foreach": True}`` when every parameter is on the CPU, else ``{}`` (PyTorch's own choice).

    PyTorch picks its multi-tensor (``foreach``) optimizer implementations only on CUDA. An
    octave network has about 2.5x as many weight tensors as its vanilla twin (four path
    convolutions and two norms per layer), and on CPU the per-tensor loop is then a visible
    part of a step: an AdamW step over Oct-ResNet-50's 369 tensors took 43 ms with the loop
    and 32 ms with ``foreach`` on the development VM (2 threads). The arithmetic is the same.
    """
    return {"foreach": True} if params and all(p.device.type == "cpu" for p in params) else {}
