"""`runtime.keep_freed_memory`: glibc keeps freed memory, so a repeated large allocation stops page-faulting."""

import subprocess
import sys
import textwrap

import pytest

from elbojax import runtime

# Page faults of allocating, touching and freeing 64 MiB, before and after the call (in a child
# process: the setting is the whole process's). Counted, not timed.
_CHILD = textwrap.dedent(
    """
    import resource, numpy as np
    from elbojax import runtime

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = np.ones(1 << 24, np.float32)  # 64 MiB, every page written
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults()
    default = faults()
    applied = runtime.keep_freed_memory()
    faults()  # the first block after the change still comes from fresh memory
    kept = faults()
    restored = runtime.keep_freed_memory(False)
    faults()
    again = faults()
    print(applied, default, kept, restored, again)
    """
)


@pytest.mark.skipif(runtime._glibc() is None, reason="glibc only")
def test_freed_memory_is_reused_and_the_default_comes_back():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, check=True)
    applied, default, kept, restored, again = out.stdout.split()
    assert applied == "True" and restored == "True"
    default, kept, again = int(default), int(kept), int(again)
    # By default glibc gives a 64 MiB block back to the kernel at free and faults it in anew
    # (16,384 faults with 4 KiB pages, a few hundred with transparent huge pages).
    assert default >= 100, default
    assert kept <= default // 10, (default, kept)
    assert again >= default // 2, (default, again)


_TOGGLED = textwrap.dedent(
    """
    import resource, numpy as np
    from elbojax import runtime

    runtime.keep_freed_memory()
    runtime.keep_freed_memory(False)
    np.ones(1 << 20, np.float32)  # the first 4 MiB block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        block = np.ones(1 << 20, np.float32)  # 4 MiB, every page written
        del block
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
    """
)


@pytest.mark.skipif(runtime._glibc() is None, reason="glibc only")
def test_switching_it_off_leaves_blocks_below_32_mib_on_the_heap():
    """Off again, a 4 MiB block is reused as in a process that never called it (writing back
    glibc's start values fixed a 128 KiB threshold: 1025 page faults per block)."""
    out = subprocess.run([sys.executable, "-c", _TOGGLED], capture_output=True, text=True, timeout=120, check=True)
    assert float(out.stdout) < 50, out.stdout


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    assert runtime.keep_freed_memory() is False


def test_it_sets_the_documented_glibc_parameters(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(runtime, "_glibc", lambda: FakeLibc())
    assert runtime.keep_freed_memory(trim_threshold=12345) is True
    assert calls == [(-4, 0), (-1, 12345)]  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD
    calls.clear()
    assert runtime.keep_freed_memory(False) is True
    assert calls == [(-4, 65536), (-3, 32 << 20), (-1, 64 << 20)]  # the dynamic thresholds' settled values


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (2**31, ValueError), (1.5, TypeError), ("1GiB", TypeError), (True, TypeError)])
def test_a_bad_trim_threshold_is_refused(bad, error):
    with pytest.raises(error, match="`trim_threshold` must be an int of bytes in"):
        runtime.keep_freed_memory(trim_threshold=bad)


@pytest.mark.parametrize("bad", ["no", 0, None])
def test_enable_must_be_a_bool(bad):
    """A string such as "no" is truthy: it would have switched the setting on."""
    with pytest.raises(TypeError, match="`enable` must be True or False"):
        runtime.keep_freed_memory(bad)
