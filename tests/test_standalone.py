"""The repository stands alone: no pointer to files that only exist elsewhere.

Every document, docstring and recipe header must be readable from a clone: no
mention of a method file that is not in the repository, no path of the machine the
project was developed on, and every docs/<name>.md that something cites must exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built by concatenation so that this file does not trip its own check.
FORBIDDEN = ("METHOD" + ".md", "/" + "work/", ".." + "/shared")

PAPER_TITLE = "Saliency-Guided Local Semantic Mixing for Long-Tailed Image Classification"

# A docs path that starts a path (not the tail of plugins/x/docs/...).
DOCS_REF = re.compile(r"(?<![\w./-])docs/(?:[\w.-]+/)*[\w-][\w.-]*\.md\b")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    paths = [ROOT / p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]
    return [p for p in paths if ".git" not in p.relative_to(ROOT).parts and p.is_file()]


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_tracked_file_points_outside_the_repository():
    bad = []
    for path in tracked_files():
        text = read_text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for needle in FORBIDDEN:
                if needle in line:
                    bad.append(f"{path.relative_to(ROOT)}:{number}: {needle!r}: {line.strip()}")
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


def test_every_cited_docs_page_exists():
    missing = []
    for path in tracked_files():
        if path.suffix not in (".py", ".md", ".toml"):
            continue
        text = read_text(path)
        if text is None:
            continue
        for ref in sorted(set(DOCS_REF.findall(text))):
            if not (ROOT / ref).is_file():
                missing.append(f"{path.relative_to(ROOT)} cites {ref}")
    assert not missing, "cited documentation pages that do not exist:\n" + "\n".join(missing)


def test_method_page_exists_with_numbered_sections():
    text = (ROOT / "docs" / "method.md").read_text()
    numbers = [int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.M)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 10, numbers


def test_paper_table_cites_the_paper():
    text = " ".join((ROOT / "docs" / "paper-table.md").read_text().split())
    assert PAPER_TITLE in text
    assert "Machine Learning and Knowledge Extraction" in text
