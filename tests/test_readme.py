"""README keeps exactly two commands; CI runs the same test command; the scripts they name exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    text = (ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_exactly_two_commands():
    cmds = _commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("bash launch/run_local.sh") and cmds[1].endswith("bash launch/test.sh")
    for c in cmds:
        for script in re.findall(r"launch/\S+\.sh", c):
            assert (ROOT / script).is_file(), script


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci
