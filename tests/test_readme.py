"""The README and docs/ cannot rot: their Python examples run (README) or compile with importable
names (docs/), their shell commands name existing make targets, files, modules and options, and
their links have targets.

Shell commands are checked, not run: ``make`` targets with ``make -n`` (a dry run), scripts and
``-m`` modules by running their argparse parser on the documented arguments (the script stops right
after parsing), ``pytest`` paths by existence, ``pip`` extras against pyproject.toml.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
VENV_PREFIX = ".venv/bin/"
# Commands a page may show that this test does not check (they touch nothing of the project).
UNCHECKED = {"cd", "git", "export", "source", "ls", "cat", "nvidia-smi"}


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _fenced(text: str, *langs: str) -> list[str]:
    pattern = r"^```(?:" + "|".join(langs) + r")\n(.*?)^```"
    return re.findall(pattern, text, re.S | re.M)


# ----------------------------------------------------------------------------------------------
# Python examples
# ----------------------------------------------------------------------------------------------


def _readme_python_blocks() -> list[str]:
    return _fenced(README.read_text(), "python")


def test_readme_training_loop_example_runs(capsys):
    text = README.read_text()
    section = text.split("## Use it in a training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 25  # a ~20-line example
    exec(compile(code, str(README), "exec"), {})
    assert "loss" in capsys.readouterr().out


@pytest.mark.parametrize("index", range(len(_readme_python_blocks())))
def test_readme_python_example_runs(index):
    """Every Python block of the README runs as printed, each in a fresh namespace."""
    code = _readme_python_blocks()[index]
    exec(compile(code, f"{README}:python block {index}", "exec"), {"__name__": "readme_example"})


def _docs_python_blocks() -> list[tuple[str, int, str]]:
    return [(_rel(p), i, code) for p in DOCS for i, code in enumerate(_fenced(p.read_text(), "python"))]


@pytest.mark.parametrize(
    "page,index,code", _docs_python_blocks(), ids=[f"{p}:{i}" for p, i, _ in _docs_python_blocks()]
)
def test_docs_python_example_compiles_and_imports(page, index, code):
    """docs/ fragments need a model, data or several processes to run; they must at least parse,
    and every name they import from the package must exist."""
    tree = ast.parse(code, filename=f"{page}:python block {index}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("napo_kernels"):
            if node.module.startswith("napo_kernels.recommender"):
                pytest.importorskip("transformers")
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{page}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("napo_kernels"):
                    importlib.import_module(alias.name)


# ----------------------------------------------------------------------------------------------
# Shell commands
# ----------------------------------------------------------------------------------------------


def _shell_lines(block: str) -> list[list[str]]:
    """The commands of a fenced shell block as token lists: continuation lines joined, comments
    dropped, ``NAME="..."`` assignments and ``for x in a b; do`` loop variables expanded."""
    variables: dict[str, str] = {}
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        if not tokens or tokens == ["done"]:
            continue
        if tokens[0] == "for" and len(tokens) > 3 and tokens[2] == "in":
            variables[tokens[1]] = tokens[3].rstrip(";")  # the loop's first value stands for all
            continue
        if len(tokens) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):
            name, value = tokens[0].split("=", 1)
            variables[name] = value
            continue
        expanded = re.sub(
            r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), m.group(0)), line.strip()
        )
        commands.append(shlex.split(expanded, comments=True))
    return commands


def _inline_commands(text: str) -> list[list[str]]:
    """Inline code spans that are commands of the project (``make ...``, ``.venv/bin/...``);
    ``[--flag]`` (an optional flag) is checked as ``--flag``."""
    out = []
    for span in re.findall(r"`([^`\n]+)`", text):
        if span.startswith(("make ", VENV_PREFIX)):
            out.append(shlex.split(span.replace("[", " ").replace("]", " ")))
    return out


def _page_commands() -> list[tuple[str, list[str]]]:
    cmds = []
    for page in PAGES:
        text = page.read_text()
        for block in _fenced(text, "bash", "sh", "shell", "console"):
            cmds += [(_rel(page), c) for c in _shell_lines(block)]
        cmds += [(_rel(page), c) for c in _inline_commands(text)]
    return cmds


COMMANDS = _page_commands()


def _strip_env(tokens: list[str]) -> list[str]:
    """Drop leading ``NAME=value`` assignments and an ``env [-u NAME]`` prefix."""
    i = 0
    while i < len(tokens):
        if re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[i]):
            i += 1
        elif tokens[i] == "env":
            i += 1
            while i < len(tokens) and tokens[i].startswith("-"):
                i += 2 if tokens[i] == "-u" else 1
        else:
            break
    return tokens[i:]


class _Parsed(Exception):
    pass


def _check_argparse(run, argv: list[str], what: str, monkeypatch) -> None:
    """Run a script or module up to its ``parse_args`` call on ``argv``; an option it does not
    accept fails the test with argparse's message."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [what, *argv])
    try:
        run()
    except _Parsed:
        return
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            return
        pytest.fail(f"{what} rejects the documented arguments {argv} (exit {exc.code})")
    pytest.fail(f"{what} {argv}: never reached an argparse parser")


def _check_script(path: str, argv: list[str], monkeypatch) -> None:
    file = ROOT / path
    assert file.is_file(), f"{path} does not exist"
    source = file.read_text()
    if "argparse" not in source:  # nothing to parse: the script would simply run
        assert not argv, f"{path} takes no arguments, but the docs give it {argv}"
        return
    if path.startswith("examples/"):
        for dep in ("transformers", "peft"):
            if re.search(rf"^(from|import) {dep}\b", source, re.M):
                pytest.importorskip(dep)
        _check_argparse(lambda: runpy.run_path(str(file), run_name="__main__"), argv, path, monkeypatch)


def _check_module(module: str, argv: list[str], monkeypatch) -> None:
    if module == "pytest":
        for arg in argv:
            if not arg.startswith("-") and ("/" in arg or arg.endswith(".py")):
                target = arg.split("::")[0]
                assert (ROOT / target).exists(), f"pytest target {target} does not exist"
        return
    if module.startswith("napo_kernels.kernels.triton"):
        pytest.importorskip("triton")
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    _check_argparse(lambda: runpy.run_module(module, run_name="__main__"), argv, f"-m {module}", monkeypatch)


def _check_pip(argv: list[str]) -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for arg in argv:
        m = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
        if m:
            for extra in m.group(1).split(","):
                assert extra in extras, f'pip install ".[{extra}]": pyproject.toml has no extra {extra!r}'


def test_pages_have_commands():
    """The checks below are not vacuous: the README shows make targets and example scripts."""
    heads = {tuple(_strip_env(c)[:1]) for _, c in COMMANDS}
    assert ("make",) in heads and (f"{VENV_PREFIX}python",) in heads


@pytest.mark.parametrize("page,tokens", COMMANDS, ids=[f"{p}:{' '.join(c)[:60]}" for p, c in COMMANDS])
def test_documented_command_refers_to_real_things(page, tokens, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    cmd = _strip_env(tokens)
    head = cmd[0]
    if len(cmd) == 1 and head.startswith(VENV_PREFIX):  # the interpreter named on its own
        return
    if head in ("python", "python3", "pytest", "torchrun"):
        pytest.fail(
            f"{page}: `{' '.join(tokens)}`: use {VENV_PREFIX}{head} (make setup installs into .venv/)"
        )
    if head in UNCHECKED:
        return
    if head == "make":
        targets = [t for t in cmd[1:] if not t.startswith("-") and "=" not in t]
        assignments = [t for t in cmd[1:] if "=" in t]
        for target in targets:
            done = subprocess.run(
                ["make", "-n", "-C", str(ROOT), target, *assignments],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, f"{page}: `make {target}`: {done.stderr.strip()}"
        return
    if head == "pip":
        _check_pip(cmd[1:])
        return
    if head == f"{VENV_PREFIX}python":
        if cmd[1] == "-m":
            _check_module(cmd[2], cmd[3:], monkeypatch)
        else:
            _check_script(cmd[1], cmd[2:], monkeypatch)
        return
    if head in (f"{VENV_PREFIX}torchrun", f"{VENV_PREFIX}accelerate"):
        if "--config_file" in cmd:  # accelerate launch --config_file FILE script.py ...
            config = cmd[cmd.index("--config_file") + 1]
            assert (ROOT / config).is_file(), f"{page}: `{' '.join(tokens)}`: {config} does not exist"
        script = next(i for i, t in enumerate(cmd) if t.endswith(".py"))
        _check_script(cmd[script], cmd[script + 1 :], monkeypatch)
        return
    pytest.fail(f"{page}: `{' '.join(tokens)}`: tests/test_readme.py does not know how to check {head!r}")


def test_inline_commands_use_the_venv():
    """Inline code that runs a tool names the venv's copy (``.venv/bin/python -m ...``)."""
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", page.read_text()):
            assert not re.match(r"(python3?|pytest|torchrun)\s+\S", span), (
                f"{_rel(page)}: `{span}`: use {VENV_PREFIX}{span}"
            )


# ----------------------------------------------------------------------------------------------
# Links and references
# ----------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_have_targets(page):
    text = page.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or page != README, "the README links its docs"
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{_rel(page)}: link {link} has no target"
        if anchor and target.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, (
                f"{_rel(page)}: no heading #{anchor} in {path or 'itself'}"
            )


def test_no_reference_outside_the_repository():
    """The spec used to live in ../shared/docs, which a clone does not have."""
    files = [*PAGES]
    for folder in ("napo_kernels", "benchmarks", "examples", "tests", "csrc"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".h", ".cpp", ".cu", ".cuh")]
    offenders = [str(p.relative_to(ROOT)) for p in files if "shared/docs" in p.read_text(errors="ignore")]
    offenders = [p for p in offenders if p != "tests/test_readme.py"]
    assert not offenders, f"references to ../shared/docs in {offenders}"


def test_docs_references_exist():
    """Every ``docs/<name>`` and ``tests/<name>.py`` path named in code or prose exists."""
    files = [*PAGES, *(ROOT / "napo_kernels").rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    for file in files:
        for ref in re.findall(r"\b((?:docs|tests|examples)/[\w./-]+\.(?:md|py|png))", file.read_text()):
            if "<" in ref:
                continue
            assert (ROOT / ref).exists() or (file.parent / ref).exists(), (
                f"{file.relative_to(ROOT)}: {ref} does not exist"
            )
