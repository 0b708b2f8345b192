"""Where and how capcli computes: the device, the CPU allocator, the arithmetic of caption searches.

One place for the three runtime choices every command that runs a model makes:

- :func:`resolve_device`: ``auto | cpu | cuda | cuda:N`` to a torch device name (Apple's ``mps`` is not
  supported: the search twins and the encoder are only tested on CPUs and CUDA);
- :func:`tune_cpu_allocator`: a process-wide opt-in (the ``capcli`` command makes it; a Python program that
  runs the encoder on the CPU for many images may call it once);
- :func:`resolve_precision`: the arithmetic of a caption search's matrix products.

torch is imported only inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import ctypes
import sys
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "float32", "bfloat16", "int8")


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an unavailable CUDA device is a UsageError."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
        return device
    if device == "cpu":
        return device
    if device == "mps":
        raise UsageError("--device mps: Apple GPUs are not supported; use --device cpu (or auto)")
    raise UsageError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of unmapping it after every forward pass.

    A CNN forward pass on the CPU allocates and frees tens of MB per layer. glibc serves blocks above
    its mmap threshold (at most 32 MB by default) with fresh ``mmap`` calls, so every batch page-faults
    its activations in again: millions of page faults and seconds of kernel time per hundred images,
    worse in a VM. Raising the thresholds removes that (the encoder runs up to ~2x faster here); the
    price is that the process keeps its peak heap (~1.5 GB for Lite0 at batch 32). Process-wide and
    idempotent; returns False (and does nothing) where the C library is not glibc.

    An explicit opt-in, since it changes the whole process: the ``capcli`` command makes it once at start
    (a command runs and exits, so keeping its peak heap costs nothing); the library never does.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3
    _ALLOCATOR_TUNED = mallopt(m_mmap_threshold, 1 << 30) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1
    return _ALLOCATOR_TUNED


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _native_bfloat16() -> bool:
    import torch

    try:  # a private probe: a torch without it gets float32
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The arithmetic of a caption search's matrix products: ``float32``, ``bfloat16``, ``int8``, or ``auto``.

    ``auto`` on a CPU is int8 where it has VNNI (AVX512-VNNI or AVX-VNNI: int8 products ~2x bfloat16's),
    else bfloat16 where it computes that natively (AVX512-BF16 or AMX, through oneDNN), else float32; on a GPU,
    float32. Below float32 the search runs the model's twin (``CaptionModel.for_search``): only the products
    round differently, everything else stays float32. On Flickr8k val the shipped model scores the same
    either way (README, `capcli caption`).
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("precision 'int8' is for CPUs: on a GPU use float32 or bfloat16")
    if precision != "auto":
        return precision
    if device.type != "cpu":
        return "float32"
    if {"avx512_vnni", "avx_vnni"} & _cpu_flags() and hasattr(torch, "_int_mm"):
        return "int8"
    return "bfloat16" if _native_bfloat16() else "float32"
