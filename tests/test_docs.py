"""The Python examples in README.md and docs/*.md run as written (in a scratch directory), and
every `rtenv` command they show parses with the CLI's parser (option names, choices, required
options)."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_PAGES = [*PAGES, ROOT / "benchmarks" / "results" / "README.md"]
# examples that need what a fresh checkout does not have
NEEDS_DATA = {("data_sources.md", 1): "the CORT and PortPy data sets"}
NEEDS_EXTRA = {("data_sources.md", 0): "pyRadPlan", ("explain.md", 0): "captum",  # optional extras
               ("llm_policy.md", 0): "llama_cpp"}


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
    assert {"cases.md-0", "data_sources.md-0", "data_sources.md-2", "tps_and_envs.md-0", "tps_and_envs.md-1",
            "explain.md-0", "llm_policy.md-0"} <= ids
    assert {f"{page}-{i}" for page, i in NEEDS_DATA} <= ids  # a skipped example that still exists


@pytest.mark.slow
@pytest.mark.parametrize("code", _examples())
def test_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})


def _rtenv_commands() -> list:
    """``rtenv`` commands in code blocks and inline code (a bare ``rtenv SUBCOMMAND`` mention in
    prose is not a command), with optional ``[...]`` groups left out."""
    out = []
    for page in COMMAND_PAGES:
        text = page.read_text()
        lines = []
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                lines += [part.strip() for part in line.split(" #")[0].split("&&")]
        lines += re.findall(r"`(rtenv [^`]+)`", text)
        for cmd in lines:
            words = shlex.split(re.sub(r"\[[^\]]*\]", "", cmd)) if cmd.startswith("rtenv ") else []
            if len(words) > 2:
                out.append(pytest.param(words[1:], id=f"{page.name}: {cmd[:60]}"))
    return out


def test_documented_commands_are_collected():
    assert len(_rtenv_commands()) >= 30


@pytest.mark.parametrize("argv", _rtenv_commands())
def test_documented_command_parses(argv):
    from rtenv.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's usage error: an unknown option, a bad choice, a missing --out
        pytest.fail(f"`rtenv {' '.join(argv)}` does not parse (exit {exc.code})")


def test_the_readme_figure_is_the_plan_its_caption_names(tmp_path, capsys):
    import json

    from rtenv.cli import main

    readme = (ROOT / "README.md").read_text()
    assert "(score 9/9)" in readme and "--tpp docs/figures/s1_case0_tuned_tpp.json" in readme
    assert main(["plan", "S1", "--case", "0", "--tpp", str(ROOT / "docs/figures/s1_case0_tuned_tpp.json"),
                 "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "plan.json").read_text())["score"]["total"] == 9.0
    assert (tmp_path / "dose_slice.png").is_file()
