"""The Python examples in README.md and docs/*.md run as written (in a scratch directory)."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# examples that need what a fresh checkout does not have
NEEDS_DATA = {("data_sources.md", 0): "the CORT and matRad data sets"}
NEEDS_EXTRA = {("explain.md", 0): "captum", ("llm_policy.md", 0): "llama_cpp"}  # optional extras


def _examples() -> list:
    out = []
    for page in PAGES:
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            why = NEEDS_DATA.get((page.name, i))
            extra = NEEDS_EXTRA.get((page.name, i))
            if extra and importlib.util.find_spec(extra) is None:
                why = f"the optional package {extra}"
            marks = [pytest.mark.skip(reason=f"needs {why}")] if why else []
            out.append(pytest.param(code, id=f"{page.name}-{i}", marks=marks))
    return out


def test_every_page_with_examples_is_collected():
    ids = {p.id for p in _examples()}
    assert {"cases.md-0", "tps_and_envs.md-0", "tps_and_envs.md-1", "explain.md-0", "llm_policy.md-0"} <= ids
    assert {f"{page}-{i}" for page, i in NEEDS_DATA} <= ids  # a skipped example that still exists


@pytest.mark.slow
@pytest.mark.parametrize("code", _examples())
def test_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})
