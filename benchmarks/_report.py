"""What a benchmark prints is also its report: `capture` copies stdout into `<out>/<name>.md`.

`benchmarks/report.py` gathers these files into the results section of `benchmarks/README.md`,
so every number there comes from a run, with the date, the machine and the versions it ran on.
A script started with `run(main)` that fails (an exception, a non-zero exit) writes
`<name>.failed.md` instead, and the last good report stays as it was.
"""

from __future__ import annotations

import atexit
import io
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("jax", "jaxlib", "flax", "optax", "distrax", "numpyro", "tfp-nightly")


def environment() -> str:
    """One line: date, machine and package versions."""
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    cores = os.cpu_count()
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {platform.processor() or platform.machine()}, {cores} CPU cores; "
            f"Python {platform.python_version()}; " + ", ".join(versions))


class _Tee(io.TextIOBase):
    def __init__(self, stream, copy):
        self.stream, self.copy = stream, copy

    def write(self, text):
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def capture(out_dir: Path, name: str, command: str, *, quick: bool) -> None:
    """From now on, copy stdout into `out_dir/name.md` (written when the script exits)."""
    copy = io.StringIO()
    sys.stdout = _Tee(sys.stdout, copy)
    header = f"`{command}`{' (quick mode: tiny sizes, not a measurement)' if quick else ''}, {environment()}"

    def write():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        suffix = ".failed.md" if _outcome["failed"] else ".md"
        Path(out_dir, f"{name}{suffix}").write_text(f"{header}\n\n```text\n{copy.getvalue().rstrip()}\n```\n")

    atexit.register(write)


_outcome = {"failed": False}


def run(main) -> None:
    """Run a benchmark's `main()`; if it fails, its report is written as `<name>.failed.md`.

    A failed run's report held partial tables (the error went to stderr), and `report.py` put it
    into the README as the latest results.
    """
    try:
        main()
    except SystemExit as stop:
        _outcome["failed"] = stop.code not in (None, 0)
        raise
    except BaseException:
        _outcome["failed"] = True
        raise
