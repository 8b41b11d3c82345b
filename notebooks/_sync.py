"""Execute the notebooks in place and record a hash of their code, so the committed outputs stay in sync.

Usage (from the repository root)::

    .venv/bin/python notebooks/_sync.py                    # every notebook, full sizes
    .venv/bin/python notebooks/_sync.py 03_tighter_bounds  # one (a name, a prefix or a path)
    .venv/bin/python notebooks/_sync.py --check            # only say which are out of date

Each notebook runs top to bottom on a fresh kernel of this Python interpreter, in the notebooks
folder, with `ELBOJAX_QUICK` unset (the full sizes); its outputs are written back and the SHA-256
of its code cells is stored in its metadata under `elbojax.code_sha256`. `tests/test_notebooks.py`
recomputes that hash, so a code cell edited without re-running this script fails the tests; the
tests themselves execute a temporary copy with `ELBOJAX_QUICK=1` (the same code at small sizes).

Every kernel shares the persistent JAX compilation cache in `.jax_cache/notebooks` (gitignored),
unless JAX_COMPILATION_CACHE_DIR names another (the tests' `conftest.py` gives one for their run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent
ROOT = NOTEBOOK_DIR.parent
CACHE_DIR = ROOT / ".jax_cache" / "notebooks"
METADATA_KEY = "elbojax"
CELL_TIMEOUT_S = 600


def notebook_paths() -> list[Path]:
    """The numbered notebooks, in order."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def code_sha256(notebook) -> str:
    """SHA-256 of the sources of the code cells, in order (markdown and outputs do not count)."""
    sources = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def kernel_env(*, quick: bool) -> dict[str, str]:
    """The kernel's environment: this one, with the quick flag set or removed and the shared JAX cache."""
    env = {k: v for k, v in os.environ.items() if k != "ELBOJAX_QUICK"}
    if quick:
        env["ELBOJAX_QUICK"] = "1"
        # At the quick sizes compiling dominates. Skipping XLA's own optimisation passes on CPU
        # compiles several times faster; the program is the same.
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE_DIR))
    # The notebooks' compilations take well under JAX's default 1 s threshold; cache them all.
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def execute(notebook, *, quick: bool, cwd: Path, timeout: int = CELL_TIMEOUT_S):
    """Run `notebook` (modified in place) top to bottom on a fresh kernel; raises if a cell raises.

    The kernel is ipykernel's own spec, which runs `sys.executable` (this virtual environment),
    whatever "python3" kernelspecs are installed elsewhere. It talks over Unix sockets in a
    temporary folder rather than TCP ports.
    """
    with tempfile.TemporaryDirectory() as sockets:
        manager = KernelManager(
            kernel_name="python3",
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[]),
            transport="ipc",
            ip=os.path.join(sockets, "kernel"),
        )
        client = NotebookClient(
            notebook,
            km=manager,
            timeout=timeout,
            record_timing=False,
            resources={"metadata": {"path": str(cwd)}},
        )
        client.execute(env=kernel_env(quick=quick), cleanup_kc=True)
    return notebook


def stored_hash(path: Path) -> str | None:
    """The code hash stored in the notebook at `path`, or None."""
    return nbformat.read(path, as_version=4).metadata.get(METADATA_KEY, {}).get("code_sha256")


def sync(path: Path) -> float:
    """Execute the notebook at `path` with the full sizes, store its code hash, write it back."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    execute(notebook, quick=False, cwd=path.parent)
    seconds = time.perf_counter() - start
    notebook.metadata[METADATA_KEY] = {"code_sha256": code_sha256(notebook)}
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return seconds


def _resolve(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".ipynb" and path.exists():
        return path.resolve()
    matches = [p for p in notebook_paths() if p.stem == name or p.name.startswith(name)]
    if len(matches) != 1:
        raise SystemExit(f"{name!r} names {len(matches)} notebooks in {NOTEBOOK_DIR}; expected one.")
    return matches[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="names, prefixes or paths (default: all)")
    parser.add_argument("--check", action="store_true", help="only report notebooks whose code changed")
    args = parser.parse_args(argv)
    paths = [_resolve(name) for name in args.notebooks] or notebook_paths()
    if args.check:
        stale = [p for p in paths if stored_hash(p) != code_sha256(nbformat.read(p, as_version=4))]
        for path in stale:
            print(f"out of date: {path.name}  (run: .venv/bin/python notebooks/_sync.py {path.stem})")
        return 1 if stale else 0
    for path in paths:
        print(f"{path.name}: executing ...", flush=True)
        seconds = sync(path)
        print(f"{path.name}: {seconds:.0f} s, {path.stat().st_size / 1e3:.0f} kB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
