r"""Process settings that make jitted calls on CPU faster: `keep_freed_memory`.

**Why.** On the CPU, XLA takes the memory of a computation's temporaries and outputs from the C
library's `malloc` at every call and gives it back at the end. glibc serves every block larger
than its *mmap threshold* (128 KiB at start, rising with the blocks freed, to at most 32 MiB)
with a fresh `mmap` and returns it to the kernel at `free`. A call whose temporaries exceed that
then touches its memory for the first time on every call: one page fault per page, and the
kernel zeroes every page before handing it over. One IWAE step of the IWAE paper's MNIST model
(K = 50, batch 100, its decoder's temporaries are (5000, 784) matrices) took 17,000-18,000 page
faults (about 70 MiB) per call, and 40-42 ms per call against 24-26 ms per step inside a
`lax.scan`, where the temporaries are allocated once for all the scanned steps
(`benchmarks/allocator_speed.py`).

`keep_freed_memory()` tells glibc to serve every block from its heap and to keep freed memory
for reuse; the same call then reuses the same pages. Caching allocators (PyTorch's, XLA's own on
GPU) do this for the same reason.
"""

from __future__ import annotations

import ctypes
import functools
import numbers
import sys

import numpy as np

# glibc's <malloc.h> parameter numbers for mallopt(3).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc's default (mallopt(3)): at most 65536 mmap'ed blocks. Its dynamic thresholds rise to at
# most a 32 MiB mmap threshold and twice that for trimming (64-bit); `enable=False` sets those.
_DEFAULT_MMAP_MAX = 65536
_SETTLED_MMAP_THRESHOLD = 32 * 1024 * 1024
_SETTLED_TRIM_THRESHOLD = 2 * _SETTLED_MMAP_THRESHOLD
_C_INT_MAX = 2**31 - 1


@functools.cache
def _glibc():
    """The process's glibc (with `mallopt`), or None on any other C library or system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl has no such function)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory(enable: bool = True, *, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed memory for reuse, so that each jitted call does not page-fault anew.

    Sets glibc's `M_MMAP_MAX` to 0 (every block from the heap, none from a fresh `mmap`) and its
    `M_TRIM_THRESHOLD` to `trim_threshold` (the free memory at the top of the heap that is kept
    rather than given back to the kernel). The setting is the whole process's and lasts until
    changed; call it once, before the training loop.

    `enable=False` gives large blocks back to `mmap`, but cannot restore glibc's start exactly:
    any of these settings switches glibc's *dynamic* thresholds off for the rest of the process
    (writing back the start values, a 128 KiB fixed threshold, would make every block above it a
    fresh `mmap`, far more page faults than a process that never called this). It sets the
    values the dynamic thresholds rise to: blocks above 32 MiB from `mmap`, the heap trimmed
    above 64 MiB free.

    It matters where a jitted call's temporaries are larger than a few MiB and the calls are
    many: a step per call on a large batch or many samples. Measured on 2 CPU cores, JAX 0.10.2
    (`benchmarks/allocator_speed.py`): an IWAE K = 50 training step, batch 100, on the IWAE
    paper's MNIST model, 40-42 ms per call before, 24-25 ms after (hand-written JAX and elbojax
    alike); a small step (ELBO, K = 1) in a process where larger computations had run before,
    1.1-1.5x faster. Inside `lax.scan` (`make_multi_step`, `fit`, the command line) a call's
    temporaries serve all its steps, and the change there was within run-to-run noise.

    The price: the process's resident memory does not shrink after a peak (up to
    `trim_threshold` bytes at the top of the heap, and whatever is freed below it). Memory on a
    GPU or TPU is XLA's own and is not affected.

    Args:
      enable: keep freed memory (True), or glibc's settled thresholds (False; see above).
      trim_threshold: bytes of free memory at the heap's top kept for reuse, in [0, 2**31 - 1]
        (a C `int`); the default 1 GiB.

    Returns:
      True if glibc took the settings; False where the C library is not glibc (macOS, Windows,
      musl), which is left unchanged.
    """
    if not isinstance(enable, (bool, np.bool_)):
        raise TypeError(f"`enable` must be True or False, got {enable!r} of type {type(enable).__name__}.")
    if isinstance(trim_threshold, (bool, np.bool_)) or not isinstance(trim_threshold, numbers.Integral):
        raise TypeError(
            f"`trim_threshold` must be an int of bytes in [0, {_C_INT_MAX}], got {trim_threshold!r} of "
            f"type {type(trim_threshold).__name__}."
        )
    if not 0 <= trim_threshold <= _C_INT_MAX:
        raise ValueError(f"`trim_threshold` must be an int of bytes in [0, {_C_INT_MAX}], got {trim_threshold!r}.")
    trim_threshold = int(trim_threshold)
    libc = _glibc()
    if libc is None:
        return False
    if enable:
        settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim_threshold))
    else:
        settings = ((_M_MMAP_MAX, _DEFAULT_MMAP_MAX), (_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD))
    # mallopt returns 1 on success, 0 on error.
    return all([bool(libc.mallopt(parameter, value)) for parameter, value in settings])
