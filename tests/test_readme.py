"""The README's commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    assert len(blocks) >= 2, "README must give the set-up command and the test command"
    test_command = blocks[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, (test_command, ci_lines)


def test_readme_setup_installs_with_the_constraints_ci_uses():
    readme = (ROOT / "README.md").read_text()
    setup = _bash_blocks(readme)[0]
    assert "-c constraints.txt" in setup
    assert "-c constraints.txt" in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / "constraints.txt").exists()
