"""Every fenced code block of README.md and docs/*.md is run by the docs tests, or marked as not run
with a reason the reader sees.

A block is marked by its info string, ```sh no-run (any language may take ``no-run``), and by its
first line, the comment ``# not run by the docs test: <reason>``: GitHub shows that line, not the
info string. The language is the info string's first word, and every block needs one:

- ``text`` and ``bibtex`` are not code, and are exempt: command output, error messages, usage
  synopses (``lsm run RECIPE... [--set ...]``), folder layouts, diagrams, a transcript (``$ command``
  and what it printed), a citation.
- ``toml`` blocks must parse with tomllib. A block that holds a whole recipe ([data], [model] and
  [run], or ``extends``) is parsed, not loaded: its ``extends`` names files relative to a recipe
  file, which a block on its own does not have.
- ``python`` blocks run: README's usage example and every block of plugins.md, contracts.md and
  compatibility.md in tests/test_docs.py (``test_docs.python_blocks_run_here``, so none runs
  twice), every other one here, exec'd in the page's folder (below) with the repository importable,
  one namespace per page.
- ``sh`` blocks run here, unless marked. Which can run is decided from the text, before anything
  runs: every command must be ``lsm ...``, one of a few harmless shell commands (``SAFE_COMMANDS``)
  or ``python -m`` a bench script that only prints tables of the stored runs (``SAFE_MODULES``:
  bench/curves.py, bench/paired_table.py), with no placeholder (an upper-case word such as RECIPE,
  DIR or LR), no ``[optional part]`` and nothing in the background. ``make``, ``pip``,
  ``torchrun``, servers and the other bench scripts (benchmarks that train for minutes to days;
  bench/accuracy.py also rewrites docs/results.md) are never run here, and a block with one must
  be marked.
- Any other language fails, and so does an unmarked block the test cannot run, a marked block
  without the reason line, and an unmarked block that starts with it.

The runnable blocks of a page run in page order in one temporary folder, as a reader following the
page would (a later block may use what an earlier one made); the folder holds links to the
repository's ``recipes`` and ``results`` (the stored benchmark runs, read by ``lsm compare``) and
to the environment of ``sys.executable`` as ``.venv`` (README calls ``.venv/bin/lsm``), and
``PREPARED`` lists what a page assumes was done before it. A page runs only when all its blocks
follow the rule. An sh block runs command by command (backslash continuations joined, comment
lines skipped, a ``$ `` prompt stripped) with ``bash -o pipefail -c``, PATH starting with the
folder of ``sys.executable``, the repository on PYTHONPATH (for ``python -m bench....``),
``OMP_NUM_THREADS=1``; ``lsm run``, ``lsm sweep`` and ``lsm resume`` get ``--set run.epochs=1
--no-progress`` appended (and a recipe with a [mixer] ``--set mixer.start_epoch=0 --unset
mixer.end_epoch``, since a mixing window closed at one epoch is refused), so every training command
is one epoch on the recipe's own data (the embedded synthetic-lt set for the quick start). The
whole module takes about a minute on one core.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_docs import python_blocks_run_here

from lsm_registry.recipe_files import read_recipe

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

EXEMPT = {"text", "bibtex"}
LANGUAGES = EXEMPT | {"toml", "python", "sh"}
REASON = re.compile(r"# not run by the docs test: \S")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")

# Commands an sh block may hold and still run here (besides lsm itself), and the python -m modules:
# the bench scripts that only print tables of the stored runs in results/runs (a second or two).
SAFE_COMMANDS = {"cat", "echo", "ls", "mkdir"}
SAFE_MODULES = {"bench.curves", "bench.paired_table"}
# lsm commands that train: run at one epoch, without progress bars.
TRAINING = {"run", "sweep", "resume"}
BUDGET = "--set run.epochs=1 --no-progress"
# ... and a recipe with a [mixer] mixes in that epoch: a window closed at one epoch is refused.
OPEN_WINDOW = "--set mixer.start_epoch=0 --unset mixer.end_epoch"
# lsm options that take a value (so a .toml after one is not a recipe).
VALUED = {"--set", "--unset", "--out", "--grid", "--seeds", "--keep", "--format", "--rank-by", "--plot", "--checkpoint"}
# An upper-case word that stands for something of the reader's (RECIPE, RUN_DIR, LR); not a
# variable ($PWD), an assignment (OMP_NUM_THREADS=1) or a file name (README.md).
PLACEHOLDER = re.compile(r"(?<![\w$.{/-])[A-Z][A-Z0-9_]+(?![\w=.])")
COMMAND_TIMEOUT = 180  # seconds: a command that takes longer is not one this test should run

# What a page assumes the reader did before its first block, run first in its folder (at one
# epoch, like every training command here). runs.md works on runs/quickstart, the quick start's
# run folder (README).
PREPARED = {"docs/runs.md": ("lsm run recipes/quickstart.toml",)}


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    language: str
    flags: tuple[str, ...]
    lines: tuple[str, ...]
    closed: bool = True

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def code(self) -> str:
        return "".join(f"{line}\n" for line in self.lines)

    @property
    def no_run(self) -> bool:
        return "no-run" in self.flags


def read_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, in order."""
    page = str(path.relative_to(ROOT))
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks, number = [], 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        number += 1
        if not opening:
            continue
        fence, info = opening.group(1), opening.group(2).split()
        start, body = number, []
        while number < len(lines) and not re.fullmatch(rf" {{0,3}}{fence[0]}{{{len(fence)},}}\s*", lines[number]):
            body.append(lines[number])
            number += 1
        closed = number < len(lines)
        number += 1
        blocks.append(Block(page, start, info[0] if info else "", tuple(info[1:]), tuple(body), closed))
    return blocks


BLOCKS = [block for page in PAGES for block in read_blocks(page)]
RUN_BY_TEST_DOCS = python_blocks_run_here()


def split_comment(line: str) -> str:
    """The line without its trailing shell comment (a # that starts a word, outside quotes)."""
    quote, escaped = None, False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def commands(block: Block) -> list[tuple[int, str]]:
    """(line number, command) of an sh block: continuations joined, comments and a `$ ` prompt dropped."""
    found: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, line in enumerate(block.lines, block.line + 1):
        if not pending:
            start = number
            line = line.strip()
            line = line[2:] if line.startswith("$ ") else line
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].strip() + " "
            continue
        text = split_comment(pending + line.strip()).strip()
        pending = ""
        if text:
            found.append((start, text))
    if pending.strip():
        found.append((start, split_comment(pending).strip()))
    return found


def cannot_run(command: str) -> str | None:
    """Why this test cannot run an sh command, or None when it can."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError as exc:
        return f"does not parse: {exc}"
    if "&" in tokens:
        return "starts a process in the background"
    if re.search(r"\[-", command):
        return "shows optional parts in [brackets]"
    placeholder = PLACEHOLDER.search(command)
    if placeholder:
        return f"{placeholder.group()} is a placeholder"
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token in {"|", "||", "&&", ";"}:
            segments.append([])
        else:
            segments[-1].append(token)
    for segment in segments:
        words = [word for word in segment if not re.match(r"[A-Za-z_]\w*=", word)]
        if not words:
            continue
        program = Path(words[0]).name
        if program == "lsm":
            if len(words) > 1 and words[1] in TRAINING and len(segments) > 1:
                return f"lsm {words[1]} in a pipeline or list (the one-epoch budget is appended to the line)"
            if len(words) > 1 and words[1] in TRAINING and budget(words) is None:
                return f"lsm {words[1]} of recipes with and without a [mixer] (no one-epoch budget fits both)"
        elif program.startswith("python") and words[1:2] == ["-m"] and words[2:3] and words[2] in SAFE_MODULES:
            continue
        elif program not in SAFE_COMMANDS:
            shown = " ".join(words[:3]) if program.startswith("python") else program
            return f"runs {shown}"
    return None


def budget(words: list[str]) -> str | None:
    """The flags that make an lsm run / sweep / resume one epoch long, or None where no flags fit all
    its recipes (a [mixer] in some of them only)."""
    if words[1] == "resume":
        return BUDGET
    recipes = [
        ROOT / word for before, word in zip(words[1:], words[2:]) if word.endswith(".toml") and before not in VALUED
    ]
    mixing = {"mixer" in read_recipe(path) for path in recipes if path.is_file()}
    if len(mixing) > 1:
        return None
    return f"{BUDGET} {OPEN_WINDOW}" if mixing == {True} else BUDGET


def with_budget(command: str) -> str:
    """An lsm training command at one epoch, without progress bars; any other command as it is."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = [word for word in lexer if not re.match(r"[A-Za-z_]\w*=", word)]
    if len(words) > 1 and Path(words[0]).name == "lsm" and words[1] in TRAINING:
        return f"{command} {budget(words)}"
    return command


def plan(block: Block) -> str:
    """What happens to a well-formed block: exempt, parse, test_docs, run or no-run."""
    if block.no_run:
        return "no-run"
    if block.language in EXEMPT:
        return "exempt"
    if block.language == "toml":
        return "parse"
    if block.language == "python" and (block.page, block.code) in RUN_BY_TEST_DOCS:
        return "test_docs"
    return "run"


def problems(block: Block) -> list[str]:
    """What keeps a block from following the rule, one line each, naming file:line."""
    where, first = block.where, block.lines[0] if block.lines else ""
    if not block.closed:
        return [f"{where}: the block is never closed"]
    if not block.language:
        return [f"{where}: no language: fence it ```sh, ```python, ```toml, or ```text for output and listings"]
    if block.language not in LANGUAGES:
        return [f"{where}: ```{block.language}: not one of {', '.join(sorted(LANGUAGES))}"]
    unknown = [flag for flag in block.flags if flag != "no-run"]
    if unknown:
        return [f"{where}: unknown word(s) in the info string: {' '.join(unknown)} (only no-run is known)"]
    if block.no_run:
        if not REASON.match(first):
            return [
                f"{where}: fenced ```{block.language} no-run, but its first line is not "
                f"'# not run by the docs test: <reason>': {first!r}"
            ]
        return []
    if REASON.match(first):
        return [f"{where}: starts with the not-run reason but is not fenced ```{block.language} no-run"]
    if block.language == "sh":
        for number, command in commands(block):
            why = cannot_run(command)
            if why:
                return [
                    f"{where}: the docs test cannot run it (line {number}: {why}), and it is not marked: fence it "
                    f"```sh no-run, first line '# not run by the docs test: <reason>' (now {first[:60]!r})"
                ]
    return []


def test_every_block_is_run_or_marked_with_a_visible_reason():
    found = [line for block in BLOCKS for line in problems(block)]
    assert not found, f"{len(found)} docs code block(s) break the rule (see tests/test_docs_blocks.py):\n" + "\n".join(
        found
    )


def test_blocks_are_found_in_every_language_and_the_runner_splits_commands():
    """The collector and the command splitter see what the pages hold (a guard against a parser that finds nothing)."""
    languages = {block.language for block in BLOCKS}
    assert {"sh", "python", "toml", "text"} <= languages
    assert sum(plan(block) == "run" for block in BLOCKS) >= 3
    block = Block("x.md", 1, "sh", (), ("$ lsm run a.toml \\", "    --set x.y=1   # why", "# only a comment", "ls"))
    assert commands(block) == [(2, "lsm run a.toml --set x.y=1"), (5, "ls")]
    assert (
        with_budget("OMP_NUM_THREADS=1 .venv/bin/lsm run a.toml")
        == f"OMP_NUM_THREADS=1 .venv/bin/lsm run a.toml {BUDGET}"
    )
    assert cannot_run("lsm compare runs/ --format markdown") is None
    assert (
        with_budget("lsm run recipes/quickstart_lsm.toml --out x")
        == f"lsm run recipes/quickstart_lsm.toml --out x {BUDGET} {OPEN_WINDOW}"
    )
    assert cannot_run("lsm run recipes/quickstart.toml recipes/quickstart_lsm.toml").endswith(
        "(no one-epoch budget fits both)"
    )
    assert cannot_run("lsm run recipes/quickstart.toml --set optim.lr=LR") == "LR is a placeholder"
    assert cannot_run("python -m bench.accuracy --epochs 3") == "runs python -m bench.accuracy"
    assert cannot_run("python -m bench.curves --recipes ce --epochs 60 --metric top1") is None
    assert cannot_run("tensorboard --logdir runs &") == "starts a process in the background"
    reason = "# not run by the docs test: needs a GPU"
    assert problems(Block("x.md", 3, "sh", ("no-run",), (reason, "make run"))) == []
    assert problems(Block("x.md", 3, "sh", (), ("lsm show recipes/ce.toml",))) == []
    assert "first line is not" in problems(Block("x.md", 3, "python", ("no-run",), ("# needs a GPU",)))[0]
    assert "not fenced ```sh no-run" in problems(Block("x.md", 3, "sh", (), (reason, "ls")))[0]
    assert problems(Block("x.md", 3, "sh", (), ("make run",)))[0].startswith("x.md:3: the docs test cannot run it")
    assert problems(Block("x.md", 3, "", (), ("ls",)))[0].startswith("x.md:3: no language")


def test_toml_blocks_parse():
    failed = []
    for block in BLOCKS:
        if block.language == "toml" and not block.no_run:
            try:
                tomllib.loads(block.code)
            except tomllib.TOMLDecodeError as exc:
                failed.append(f"{block.where}: {exc}")
    assert not failed, "toml blocks that do not parse:\n" + "\n".join(failed)


def run_command(command: str, where: str, folder: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    command = with_budget(command)
    try:
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where}: `{command}` ran for more than {COMMAND_TIMEOUT} s; mark the block no-run")
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()[-30:]
        pytest.fail(f"{where}: `{command}` exited with {done.returncode}:\n" + "\n".join(output))


PAGES_WITH_RUNS = sorted({block.page for block in BLOCKS if plan(block) == "run"})


@pytest.mark.parametrize("page", PAGES_WITH_RUNS)
def test_runnable_blocks_run(page, tmp_path, monkeypatch, capsys):
    blocks = [block for block in BLOCKS if block.page == page]
    found = [line for block in blocks for line in problems(block)]
    assert not found, f"{page}: not run until every block follows the rule:\n" + "\n".join(found)
    for shared in ("recipes", "results"):
        (tmp_path / shared).symlink_to(ROOT / shared)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    for command in PREPARED.get(page, ()):
        run_command(command, f"{page} (prepared)", tmp_path)
    namespace = {"__name__": "docs_example"}
    for block in blocks:
        if plan(block) != "run":
            continue
        if block.language == "python":
            exec(compile(block.code, block.where, "exec"), namespace)
        else:
            for number, command in commands(block):
                run_command(command, f"{page}:{number}", tmp_path)
    capsys.readouterr()
