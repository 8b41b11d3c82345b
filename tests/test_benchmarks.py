"""The benchmark scripts run end to end (in their quick mode) and write what they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script, out_dir, *arguments):
    env = dict(os.environ, ELBOJAX_QUICK="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out_dir), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (Path(out_dir) / script.replace(".py", ".md")).read_text()
    assert "(quick mode" in report.splitlines()[0] and "jax " in report.splitlines()[0]
    assert result.stdout.strip().splitlines()[-1] in report  # what it printed, copied
    return result.stdout


@pytest.mark.slow
def test_estimator_variance_runs(tmp_path):
    stdout = _run("estimator_variance.py", tmp_path)
    assert "naive" in stdout.lower()
    header = (tmp_path / "estimator_variance.md").read_text().splitlines()[0]
    assert f"estimator_variance.py --quick --out {tmp_path}" in header  # the flags it ran with (only --quick before)
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 10_000 for p in pngs)


@pytest.mark.slow
def test_estimator_speed_runs(tmp_path):
    stdout = _run("estimator_speed.py", tmp_path)
    assert "hand-written JAX" in stdout and "unchunked" in stdout
    assert (tmp_path / "estimator_speed.png").stat().st_size > 10_000
    assert (tmp_path / "estimator_speed.json").exists()


@pytest.mark.slow
def test_gradient_snr_runs(tmp_path):
    stdout = _run("gradient_snr.py", tmp_path)
    assert "dreg" in stdout and "VIMCO" in stdout
    assert (tmp_path / "gradient_snr.png").stat().st_size > 10_000


@pytest.mark.slow
def test_gradient_speed_runs(tmp_path):
    stdout = _run("gradient_speed.py", tmp_path)
    assert "hand-written" in stdout and "dreg" in stdout
    assert (tmp_path / "gradient_speed.json").exists()


@pytest.mark.slow
def test_training_speed_runs(tmp_path):
    stdout = _run("training_speed.py", tmp_path)
    assert "hand-written JAX" in stdout and "lax.scan" in stdout and "goal:" in stdout
    assert "same draws" in stdout  # elbojax's bound and gradient equal the hand-written ones on its own draws
    record = json.loads((tmp_path / "training_speed.json").read_text())
    assert set(record["results"]) == {"W1", "W2", "W3"} and set(record["results"]["W2"]) == {"call", "scan"}
    assert record["one_process_per_workload"] and stdout.count("correctness (") == 3  # one report per process
    unchecked = "elbojax, unchecked (no finite check)"  # the check's cost, for information: one step per call only
    assert record["results"]["W3"]["call"][unchecked]["informational"] and unchecked not in record["results"]["W3"]["scan"]
    assert (tmp_path / "training_speed.png").stat().st_size > 10_000


@pytest.mark.slow
def test_training_speed_times_one_workload_in_its_own_process(tmp_path):
    stdout = _run("training_speed.py", tmp_path, "--workload", "W3")
    record = json.loads((tmp_path / "training_speed.json").read_text())
    assert set(record["results"]) == {"W3"} and not record["one_process_per_workload"]
    assert "fresh process" not in stdout and "W3 (call)" in stdout and "W1 (call)" not in stdout


@pytest.mark.slow
def test_peer_speed_runs(tmp_path):
    stdout = _run("peer_speed.py", tmp_path)
    assert "hand-written JAX" in stdout and "goal:" in stdout
    record = json.loads((tmp_path / "peer_speed.json").read_text())
    for workload in ("W1", "W2", "W3"):
        rows = record["results"][workload]["call"]
        assert rows["hand-written JAX"]["ratio"] == 1.0 and "elbojax" in rows
    assert (tmp_path / "peer_speed.png").stat().st_size > 10_000


@pytest.mark.slow
def test_allocator_speed_runs(tmp_path):
    stdout = _run("allocator_speed.py", tmp_path)
    assert "keep_freed_memory()" in stdout and "faults / call" in stdout
    record = json.loads((tmp_path / "allocator_speed.json").read_text())
    assert set(record["results"]) == {"W1 (call)", "W2 (call)", "W3 (call)", "W2 (scan)"}
    for rows in record["results"].values():
        for row in rows.values():
            # with freed memory kept, the timed calls reuse the heap: next to no page faults
            assert row["keep_freed_memory()"]["page_faults_per_call"] <= 20
    assert (tmp_path / "allocator_speed.png").stat().st_size > 10_000


@pytest.mark.slow
def test_iwae_mnist_runs_and_resumes(tmp_path):
    stdout = _run("iwae_mnist.py", tmp_path)
    assert "IWAE" in stdout and "paper" in stdout and "above VAE" in stdout
    record = json.loads((tmp_path / "iwae_mnist.json").read_text())
    assert {r["row"] for r in record["results"]} == {"VAE", "IWAE", "IWAE-DReG"}
    assert (tmp_path / "iwae_mnist.png").stat().st_size > 10_000
    again = _run("iwae_mnist.py", tmp_path)  # every row is cached in its run folder: nothing retrains
    assert again.count("cached:") == 3 and record["results"][0]["log_likelihood"] == json.loads(
        (tmp_path / "iwae_mnist.json").read_text())["results"][0]["log_likelihood"]
    # A row whose folder holds a longer run (a checkpoint past its steps) retrains from scratch: resuming
    # it trained nothing and reported the longer run's model under the shorter length.
    folder = sorted((tmp_path / "iwae_mnist_runs").iterdir())[0]
    (folder / "result.json").unlink()
    (folder / "checkpoints" / "999999").mkdir()
    third = _run("iwae_mnist.py", tmp_path)
    assert third.count("cached:") == 2 and "training this row from scratch" in third
    assert json.loads((folder / "result.json").read_text())["resumed_from_step"] == 0


def test_report_copies_full_size_reports_only(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "peer_speed.md").write_text("`python benchmarks/peer_speed.py`, 2026-11-22\n\n```text\nW2 1.00\n```\n")
    (results / "gradient_snr.md").write_text("`python benchmarks/gradient_snr.py --quick` (quick mode: tiny sizes, not a measurement), x\n")
    readme = tmp_path / "README.md"
    readme.write_text("# B\n\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--results", str(results), "--readme", str(readme)], check=True, capture_output=True)
    text = readme.read_text()
    assert "### Against the peers" in text and "W2 1.00" in text and "old" not in text and text.endswith("tail\n")
    assert "gradient_snr" not in text


@pytest.mark.parametrize("how", ["returns", "raise SystemExit('FAILED: a check')", "raise AssertionError", "raise SystemExit(0)"])
def test_a_failed_benchmark_writes_its_report_as_failed(tmp_path, how):
    """A failed run's report (partial tables, the error on stderr) was written as the report,
    which report.py then put into the README as the latest results."""
    script = tmp_path / "bench.py"
    body = "pass" if how == "returns" else how
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import _report\n"
        "def main():\n"
        f"    _report.capture({str(tmp_path)!r}, 'bench', 'python bench.py', quick=False)\n"
        "    print('a table')\n"
        f"    {body}\n"
        "_report.run(main)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    ok = how in ("returns", "raise SystemExit(0)")
    assert (result.returncode == 0) == ok, result.stderr
    written = tmp_path / ("bench.md" if ok else "bench.failed.md")
    assert written.exists() and "a table" in written.read_text()
    assert not (tmp_path / ("bench.failed.md" if ok else "bench.md")).exists()


def test_estimator_variance_fails_where_a_check_that_must_be_0_is_not():
    """Its checks were printed only: 5 nats off, the script still said 'zero up to float rounding' and exited 0."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import estimator_variance as ev
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    class Setup:
        title = "linear Gaussian"

    class Study:
        gaps = {"naive MC vs table": 0.0, "ELBO vs table": 5e-6}

    ev.check_results([Setup], {"linear Gaussian": Study}, 1e-5, tolerance=ev.ROUNDING["float32"])  # passes
    Study.gaps = {"naive MC vs table": 5.0}
    with pytest.raises(SystemExit, match=r"FAILED: above float rounding \(0.001 nats\): linear Gaussian: naive MC vs table 5"):
        ev.check_results([Setup], {"linear Gaussian": Study}, 1e-5, tolerance=ev.ROUNDING["float32"])
    Study.gaps = {}
    with pytest.raises(SystemExit, match=r"exact posterior: largest RMSE 0.5"):
        ev.check_results([Setup], {"linear Gaussian": Study}, 0.5, tolerance=ev.ROUNDING["float32"])
