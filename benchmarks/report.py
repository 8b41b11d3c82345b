"""Copy the latest benchmark reports into `benchmarks/README.md` (between its results markers).

Each benchmark script writes what it printed to `<out>/<name>.md` (`_report.capture`), headed by
the command, the date, the machine and the package versions. This script puts the full-size
reports (quick-mode ones are skipped) into the README, so the numbers there are never typed by
hand.

Usage::

    python benchmarks/report.py                      # from benchmarks/results/
    python benchmarks/report.py --results DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
ORDER = {
    "estimator_variance": "Estimator variance",
    "estimator_speed": "Estimator speed and memory",
    "gradient_speed": "Gradient estimators' step time",
    "gradient_snr": "Gradient signal-to-noise ratio",
    "training_speed": "Training speed against the hand-written floor",
    "peer_speed": "Against the peers",
    "allocator_speed": "A jitted call's memory: glibc's default against keep_freed_memory()",
    "iwae_mnist": "IWAE Table 1 on a short schedule",
}


def sections(results: Path) -> list[str]:
    found = []
    for name, title in ORDER.items():
        path = results / f"{name}.md"
        if not path.exists():
            continue
        text = path.read_text()
        if "(quick mode" in text.splitlines()[0]:
            continue
        found.append(f"### {title}\n\n{text.strip()}\n")
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args(argv)
    readme = args.readme.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"{args.readme} has no {START} ... {END} markers")
    found = sections(args.results)
    if not found:
        raise SystemExit(f"no full-size reports in {args.results}; run the benchmarks first")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(head + START + "\n\n" + "\n".join(found) + "\n" + END + tail)
    print(f"{args.readme}: {len(found)} reports")


if __name__ == "__main__":
    main()
