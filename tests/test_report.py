"""`lsm report`: one self-contained HTML page of run folders, checked as text and in a real browser."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_RECIPE

from lsm_registry.cli import cli
from lsm_registry.errors import LSMError
from lsm_registry.recipe import dumps_toml
from lsm_registry.runfolder import page as report
from lsm_registry.runfolder import reader as runs
from lsm_registry.viz.plots import PlotUnavailable

pytest.importorskip("matplotlib")

IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
NETWORK = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def images(page: str) -> list[bytes]:
    """The embedded pictures, decoded; each must be a PNG."""
    out = [base64.b64decode(data, validate=True) for data in IMG.findall(page)]
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in out)
    assert page.count("<img") == len(out)  # no picture is embedded any other way
    return out


def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fake_run(
    folder: Path,
    name: str,
    top1: float,
    finished: bool = True,
    mixer: bool = False,
    epochs: int = 3,
    alpha: float = 1.0,
) -> Path:
    """A run folder with the files the loaders read, written by hand (no training)."""
    folder.mkdir(parents=True)
    recipe = {
        "run": {"name": name, "seed": 0, "epochs": epochs},
        "data": {"name": "synthetic-lt", "n_max": 24},
        "optim": {"lr": 0.1 * alpha},
    }
    if mixer:
        recipe["mixer"] = {"name": "lsm"}
    (folder / "recipe.toml").write_text(dumps_toml(recipe))
    evaluated = epochs if finished else epochs - 1
    lines = [
        {
            "epoch": e,
            "lr": 0.1,
            "train_loss": 2.0 / e,
            "mixed_fraction": 0.0,
            "wall_s": 10.0 * e,
            "top1": top1 * e / epochs,
            "many": 0.9,
            "medium": 0.5 * e / epochs,
            "few": 0.1,
            "rare3": 0.05,
        }
        for e in range(1, evaluated + 1)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if finished:
        summary = {
            "format": 2,
            "top1": top1,
            "many": 0.9,
            "medium": 0.5,
            "few": 0.1,
            "rare3": 0.05,
            "per_class": [0.95, 0.85, 0.5, 0.1],
            "epochs": epochs,
            "best_top1": top1,
            "best_epoch": epochs,
            "best_on": "test",
            "final_loss": 0.667,
            "wall_time_s": 30.0,
            "class_counts": [300, 150, 40, 5],
            "class_names": ["disk", "square", "ring", "cross"],
            "recipe": "r.toml",
            "run_name": name,
            "seed": 0,
        }
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """One tiny real run that mixes, so the folder has every picture a run draws."""
    root = tmp_path_factory.mktemp("real")
    recipe = root / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    out = root / "tiny-run"
    result = invoke(
        "run",
        str(recipe),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "sampler.name=dual-branch",
        "--set",
        "mixer.name=lsm",
        "--set",
        "mixer.start_epoch=0",
        "--set",
        "mixer.end_epoch=1",
        "--set",
        "mixer.prob=1.0",
    )
    assert result.exit_code == 0, result.output
    for name in ("summary.json", "per_class.png", "confusion.png", "mixed_samples.png"):
        assert (out / name).is_file(), name
    return out


def test_one_real_run_page(real_run, tmp_path):
    copy = tmp_path / "tiny-run"
    shutil.copytree(real_run, copy)
    before = folder_hashes(copy)
    result = invoke("report", str(copy))
    assert result.exit_code == 0, result.output
    page_path = copy / "report.html"  # the default for one run
    assert result.output.strip() == f"wrote {page_path} (1 run(s))"
    after = folder_hashes(copy)
    assert after.pop("report.html") and after == before  # nothing else in the run folder changed
    page = page_path.read_text(encoding="utf-8")
    summary = json.loads((copy / "summary.json").read_text())
    assert "<h2>tiny" in page and "finished" in page
    for key in ("top1", "many", "medium", "rare3"):
        if summary[key] is not None:
            assert f'<td class="num">{100 * summary[key]:.1f}</td>' in page
    # learning curves, per-class accuracy (drawn), confusion matrix and mixed samples (embedded as the run drew them)
    pngs = images(page)
    assert len(pngs) == 4
    assert (copy / "confusion.png").read_bytes() in pngs and (copy / "mixed_samples.png").read_bytes() in pngs
    assert "<pre>format = 2" in page and "[mixer]" in page
    assert not NETWORK.search(page) and "<script" not in page.lower() and "<link" not in page.lower()


def test_unfinished_run_shows_its_curves_so_far(tmp_path):
    run = fake_run(tmp_path / "crashed", "half", 0.4, finished=False, mixer=True)
    page = report.render_report(report.load_report_runs([run]))
    assert "unfinished" in page and "no summary.json" in page and "last evaluated epoch: 2 of 3 planned" in page
    assert len(images(page)) == 1  # the curves; nothing else exists yet
    assert page.count("not drawn: the run did not finish") == 3  # per-class, confusion, mixed samples
    assert '<td class="num">26.7</td>' in page  # the newest metrics line: 0.4 * 2/3


def test_text_from_run_folders_is_escaped(tmp_path):
    name = '<script>alert("x")</script>&'
    run = fake_run(tmp_path / "evil", name, 0.5)
    page = report.render_report(report.load_report_runs([run]))
    assert "<script" not in page
    assert html_escaped(name) in page
    recipe_line = 'name = "<script>'
    assert recipe_line not in page and html_escaped(recipe_line) in page


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def test_a_path_that_is_not_a_run_folder_fails_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    result = invoke("report", str(empty))
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {empty}: not a run folder (it holds neither recipe.toml nor summary.json), and no run folder is in it"
    ]
    assert len(result.output.strip().splitlines()) == 1 and not (empty / "report.html").exists()
    result = invoke("report", str(tmp_path / "missing"))
    assert result.exit_code == 2 and error_lines(result) == [f"error: {tmp_path / 'missing'}: no such run folder"]
    result = invoke("report", str(empty / "notes.txt"))
    assert result.exit_code == 2 and len(error_lines(result)) == 1 and str(empty / "notes.txt") in result.output
    with pytest.raises(LSMError, match="not a run folder"):
        report.load_report_run(empty)
    broken = fake_run(tmp_path / "broken", "b", 0.5)
    (broken / "metrics.jsonl").write_text('{"epoch": 1, "top1": 0.1}\n{"epoch": 2,\n')
    result = invoke("report", str(broken))
    assert result.exit_code == 2 and error_lines(result) == [
        f"error: {broken / 'metrics.jsonl'}:2: not a JSON line (Expecting property name enclosed in double quotes)"
    ]


def test_several_runs_get_the_comparison_table(tmp_path, monkeypatch):
    a = fake_run(tmp_path / "sw" / "a", "ce", 0.40)
    b = fake_run(tmp_path / "sw" / "b", "ce", 0.55, alpha=2.0)
    c = fake_run(tmp_path / "c", "lsm", 0.30, finished=False, mixer=True)
    monkeypatch.chdir(tmp_path)
    result = invoke("report", str(tmp_path / "sw"), str(c))  # a folder of runs counts as its runs
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "wrote report.html (3 run(s), 1 unfinished)"
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    groups = runs.group_runs(runs.load_runs([a, b]))
    head = "".join(f"<th>{column}</th>" for column in runs.columns_of(groups))
    assert '<section id="comparison">' in page and head in page
    for row in runs.text_rows(groups):  # the cells of `lsm compare`
        assert (
            "<tr>"
            + "".join(f"<td>{c}</td>" if i < 2 else f'<td class="num">{c}</td>' for i, c in enumerate(row))
            + "</tr>"
            in page
        )
    assert "optim.lr=0.1" in page and "optim.lr=0.2" in page
    assert "not in the table (unfinished): lsm" in page
    # overlaid curves and overlaid per-class accuracy, then per run: curves (+ per-class when finished)
    assert len(images(page)) == 2 + 2 + 2 + 1
    assert all(f'href="#run-{i}"' in page for i in (1, 2, 3)) and not NETWORK.search(page)


def test_without_matplotlib_the_hint_is_one_line(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "r", "r", 0.5)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(PlotUnavailable, match=r"pip install 'lsm-registry\[plot\]'"):
        report.render_report(report.load_report_runs([run]))
    result = invoke("report", str(run))
    assert result.exit_code == 2 and len(error_lines(result)) == 1 and "lsm-registry[plot]" in result.output
    assert not (run / "report.html").exists()


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); .ci/run installs it"
)
def test_two_run_page_renders_in_headless_chromium(real_run, tmp_path):
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    other = fake_run(tmp_path / "other", "other", 0.5)
    out = tmp_path / "two.html"
    result = invoke("report", str(real_run), str(other), "--out", str(out))
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    expected = len(images(page))
    assert expected == 2 + 4 + 2
    url = out.resolve().as_uri()

    dom = chromium(["--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(IMG.findall(dom.stdout)) == expected  # the browser parsed every picture as an img of a data: URI
    assert "comparison" in dom.stdout and "tiny" in dom.stdout

    shot = tmp_path / "shot.png"
    rendered = chromium(
        [f"--screenshot={shot}", "--window-size=1200,3000", "--hide-scrollbars", url], tmp_path / "profile-shot"
    )
    assert rendered.returncode == 0 and shot.is_file(), rendered.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (3000, 1200) and pixels.std() > 20  # not one colour
    # The page's own style uses none of matplotlib's line colours, so seeing them means the
    # pictures were decoded and drawn (a broken image shows only an icon and its alt text).
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # tab10 blue (Many, first run), orange (Medium, second run)
        near = (np.abs(pixels - np.array(colour)).max(axis=2) <= 12).sum()
        assert near > 200, (colour, near)
    rows_with_ink = ((pixels < 200).any(axis=2).sum(axis=1) > 0).sum()
    assert rows_with_ink > 1500  # the first 3000 pixels of the page are mostly pictures and tables


def test_metrics_lines_with_wrongly_typed_values_are_one_line(tmp_path):
    run = fake_run(tmp_path / "r", "r", 0.4)
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": [1, 2]}) + "\n")
    with pytest.raises(LSMError, match=r"metrics.jsonl:1: train_loss must be a number \(got list\)"):
        report.load_report_runs([run])
