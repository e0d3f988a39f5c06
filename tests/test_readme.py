"""The README stays true: its first lines give the two commands, CI runs the second one, and
the code blocks marked ``<!-- tested: ... -->`` run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _tested_blocks() -> dict[str, str]:
    pattern = re.compile(r"<!-- tested: ([\w-]+) -->\s*```python\n(.*?)```", re.DOTALL)
    return {name: code for name, code in pattern.findall(README)}


def test_first_lines_give_the_two_commands_and_ci_runs_the_test_one():
    head = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in head.splitlines() if line.strip()]
    assert commands == ["./dev demo", "./dev test"], commands
    assert README.index("./dev demo") < 200, "the commands come first"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\./dev test\b", ci, re.MULTILINE), (
        ".ci/run must call the README's test command"
    )


def test_placeholders_are_filled():
    assert "{{" not in README, "the README has an unfilled placeholder"


@pytest.mark.parametrize("name", sorted(_tested_blocks()))
def test_code_block_runs(name):
    code = _tested_blocks()[name]
    exec(compile(code, f"README.md<{name}>", "exec"), {"__name__": f"readme_{name}"})


def test_there_is_a_tested_block():
    assert "drop-in" in _tested_blocks()
