r"""What glibc's handling of freed memory costs a jitted call on CPU, with and without
`elbojax.runtime.keep_freed_memory()` (issue #4, section 5).

On the CPU, XLA takes a call's temporaries and outputs from `malloc` at every call. glibc serves
blocks above its mmap threshold (at most 32 MiB) with fresh `mmap`s and returns them at `free`,
so a call with large temporaries page-faults its memory in anew every time, and the kernel zeroes
each page. `keep_freed_memory()` makes glibc keep freed memory for reuse (see
`elbojax/runtime.py`).

The workloads and the two contestants are those of `training_speed.py` (the IWAE paper's MNIST
VAE; W1 the K = 5000 log-likelihood of 100 digits, W2 an IWAE K = 50 step, W3 an ELBO K = 1
step, batch 100; elbojax's own step and the hand-written JAX + optax floor), one step per call,
and W2 also inside a `lax.scan` (where a call's temporaries serve all its steps).

**Timing.** Both settings are measured in one run, one after the other, as a user would meet
them: first every workload under glibc's default, then `keep_freed_memory()` is called once and
every workload runs again. Under each setting each contestant first makes twice its number of
calls per round untimed (the heap grows to what the calls need), then the contestants take turns
in a rotating order, round by round, results blocked. The table gives the median over rounds of
each round's median time per step, and the minor page faults per call (`getrusage`) over the
timed calls. (Switching the setting back and forth between rounds does not work: the heap that
glibc trims at each switch back has to grow again, many calls long.)

Usage::

    python benchmarks/allocator_speed.py           # about two minutes on 2 CPU cores
    python benchmarks/allocator_speed.py --quick   # tiny sizes, the same code path

Writes `allocator_speed.png` and `allocator_speed.json` to `--out` (default `benchmarks/results/`).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report
import _workloads as w  # noqa: E402

import jax  # noqa: E402

from elbojax import runtime  # noqa: E402

ELBOJAX, FLOOR = "elbojax", "hand-written JAX"
SETTINGS = ("glibc default", "keep_freed_memory()")
CASES = (("W1", "call"), ("W2", "call"), ("W3", "call"), ("W2", "scan"))


def apply(setting: str) -> None:
    """Nothing for glibc's default (`keep_freed_memory(False)` cannot restore glibc's start: it
    fixes the thresholds it would have moved); `keep_freed_memory()` for the other."""
    if setting == SETTINGS[0]:
        return
    if not runtime.keep_freed_memory():
        raise SystemExit("this C library is not glibc: keep_freed_memory() has nothing to set here")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_rounds(entries: dict, *, rounds: int, calls: int, settle: int) -> dict:
    """`{name: (round medians in seconds, page faults per call)}` under the current setting.

    Each contestant first makes `settle` untimed calls (the heap grows to what the calls need),
    then the rounds: contestants take turns in a rotating order, `calls` timed calls each.
    """
    for entry in entries.values():
        for _ in range(settle):
            jax.block_until_ready(entry.fn(*entry.args))
    out = {name: ([], []) for name in entries}
    names = list(entries)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn, args = entries[name].fn, entries[name].args
            times, faults = [], minor_faults()
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times.append(time.perf_counter() - start)
            out[name][0].append(statistics.median(times))
            out[name][1].append((minor_faults() - faults) / calls)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.2), squeeze=False)
    for ax, (case, rows) in zip(axes.flat, results.items()):
        labels, values, colors, notes = [], [], [], []
        for name, row in rows.items():
            for setting in SETTINGS:
                labels.append(f"{name}\n{setting}")
                values.append(row[setting]["ms_per_step"])
                colors.append(("grey" if name == FLOOR else "tab:blue") if setting == SETTINGS[0] else
                              ("darkgrey" if name == FLOOR else "tab:cyan"))
                notes.append(f" {row[setting]['page_faults_per_call']:,.0f} faults"
                             + (f", {row['speedup']:.2f}x" if setting == SETTINGS[1] else ""))
        bars = ax.barh(labels, values, color=colors)
        for bar, note in zip(bars, notes):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=7)
        ax.set_xlim(0, max(values) * 1.7)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("ms per step (median)")
        ax.set_title(case, fontsize=10)
    fig.suptitle("a jitted call on CPU, glibc's default against keep_freed_memory() — lower is better", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that the script runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rounds", type=int, default=6, help="alternated rounds under each setting (at least 2)")
    args = parser.parse_args()
    quick = w.is_quick(args.quick)
    _report.capture(args.out, "allocator_speed", "python benchmarks/allocator_speed.py " + " ".join(sys.argv[1:]),
                    quick=quick)
    sizes = w.QUICK if quick else w.FULL
    rounds = max(2, args.rounds)
    calls = w.calls_per_round(quick)

    print(w.machine())
    print(f"IWAE-paper VAE {sizes.data_dim}-{sizes.hidden}-{sizes.hidden}-{sizes.latent_dim}, float32"
          + (" (QUICK: tiny sizes)" if quick else ""))
    s = w.setup(sizes)
    builders = {FLOOR: w.floor_builder(s), ELBOJAX: w.elbojax_builder(s)}
    entries = {case: {name: build(*case) for name, build in builders.items()} for case in CASES}
    for case in CASES:  # compile outside the timing
        for entry in entries[case].values():
            jax.block_until_ready(entry.fn(*entry.args))
    timed = {}
    for setting in SETTINGS:  # the default first: keep_freed_memory() is meant to be called once
        apply(setting)
        for case in CASES:
            n = calls[case]
            timed[setting, case] = time_rounds(entries[case], rounds=rounds, calls=n, settle=2 * n)

    results = {}
    for workload, mode in CASES:
        steps = sizes.steps_per_call if mode == "scan" else 1
        rows = {}
        for name in builders:
            row = {}
            for setting in SETTINGS:
                medians, faults = timed[setting, (workload, mode)][name]
                row[setting] = {
                    "ms_per_step": statistics.median(medians) / steps * 1e3,
                    "page_faults_per_call": statistics.median(faults),
                    "round_medians_seconds_per_call": medians,
                }
            row["speedup"] = row[SETTINGS[0]]["ms_per_step"] / row[SETTINGS[1]]["ms_per_step"]
            rows[name] = row
        for setting in SETTINGS:
            rows[ELBOJAX][setting]["ratio_to_floor"] = rows[ELBOJAX][setting]["ms_per_step"] / rows[FLOOR][setting]["ms_per_step"]
        results[f"{workload} ({mode})"] = rows

        label = w.describe(workload, sizes) + "; " + w.MODES[mode].format(**sizes._asdict())
        print(f"\n{workload}: {label}")
        print(f"{'contestant':<20}{'setting':<22}{'ms / step':>11}{'faults / call':>15}{'speedup':>9}")
        for name, row in rows.items():
            for setting in SETTINGS:
                speedup = f"{row['speedup']:>9.2f}" if setting == SETTINGS[1] else ""
                print(f"{name:<20}{setting:<22}{row[setting]['ms_per_step']:>11.2f}"
                      f"{row[setting]['page_faults_per_call']:>15,.0f}{speedup}")
        print("elbojax / hand-written: " + ", ".join(
            f"{rows[ELBOJAX][setting]['ratio_to_floor']:.3f} ({setting})" for setting in SETTINGS))
    apply(SETTINGS[0])

    args.out.mkdir(parents=True, exist_ok=True)
    figure = args.out / "allocator_speed.png"
    plot(results, figure)
    record = {"machine": w.machine(), "quick": quick, "sizes": sizes._asdict(), "rounds": rounds, "results": results}
    w.write_json(args.out / "allocator_speed.json", record)
    print(f"\nwrote {figure} and {args.out / 'allocator_speed.json'}")


if __name__ == "__main__":
    _report.run(main)
