"""The README's two commands are the ones that work: CI runs exactly its test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_exactly_the_readmes_test_command():
    readme = bash_blocks((ROOT / "README.md").read_text())
    quickstart, tests = readme[0], readme[1]
    assert quickstart == "pip install torch==2.13.0 -e . && orpo quickstart"
    assert "python -m pytest -q" in tests and "torch==2.13.0" in tests
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == tests
