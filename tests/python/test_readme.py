"""The README's first screen, as a newcomer runs it (issue 15, items 6 and 8): a virtual
environment first, the two commands (install + demo, install + all tests) and a quick test
path, each with the time it takes, and installs that show their progress."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
FIRST_SCREEN = 30  # lines


@pytest.fixture(scope="module")
def first_block():
    if not README.is_file():
        pytest.skip("no source tree (tests run from a copy, against a wheel)")
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("```bash")
    end = lines.index("```", start + 1)
    assert end < FIRST_SCREEN, "the commands must fit on the first screen"
    return lines[start + 1 : end]


def test_first_screen_commands(first_block):
    commands = [line for line in first_block if line and not line.startswith("#")]
    assert commands == [
        "python3 -m venv .venv && . .venv/bin/activate",
        'pip install -v ".[demo]" && python -m bnorm.demo',
        "bash scripts/test_all.sh",
        'pip install -v ".[test]" && python -m pytest tests/python -q',
    ]


def test_every_command_but_the_venv_says_how_long_it_takes(first_block):
    for i, line in enumerate(first_block):
        if line and not line.startswith("#") and "venv" not in line:
            comment = first_block[i - 1]
            assert comment.startswith("#") and re.search(r"~\d+ (min|s)\b", comment), line


def test_installs_show_progress(first_block):
    for line in first_block:
        if line.startswith("pip install"):
            assert line.startswith("pip install -v "), line
