"""Docs stay true to the code: every recipe key of [run] and [optim] is documented, and
the code examples of the plugin guides (plugins.md, contracts.md, compatibility.md) run.

Every ```python block of those guides runs, in order, one namespace per page; a block
that shows a file of a package (relative imports) or a fragment is fenced
```python no-run instead, and is shown, not run. The other docs code blocks (README's
commands, the other pages' python and sh blocks, the toml blocks) are checked by
tests/test_docs_blocks.py, which skips the python blocks this module runs
(:func:`python_blocks_run_here`)."""

import re
from pathlib import Path

import attrs
import pytest
import torch

from lsm_registry.recipe import FIXED_TABLES

ROOT = Path(__file__).resolve().parents[1]

# The pages whose every ```python block runs here (test_every_python_block_of_the_plugin_guides_runs).
PLUGIN_GUIDES = ("plugins.md", "contracts.md", "compatibility.md")
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# README's usage example: the first python block after the first `##` heading that names Python.
README_EXAMPLE = re.compile(r"^## [^\n]*Python[^\n]*\n.*?^```python\n(.*?)^```", re.S | re.M)


def python_blocks_run_here() -> set[tuple[str, str]]:
    """(page, code) of every python block this module runs, the page relative to the repository."""
    found = {("README.md", README_EXAMPLE.search((ROOT / "README.md").read_text()).group(1))}
    for doc in PLUGIN_GUIDES:
        found |= {(f"docs/{doc}", code) for code in PYTHON_BLOCK.findall((ROOT / "docs" / doc).read_text())}
    return found


def test_every_fixed_table_key_is_in_docs_recipes_md():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for table, cls in FIXED_TABLES.items():
        assert f"## [{table}]" in text
        for field in attrs.fields(cls):
            assert f"`{field.name}`" in text, f"[{table}].{field.name} is not documented in docs/recipes.md"


def test_readme_commands_exist():
    from click.testing import CliRunner

    from lsm_registry.cli import cli

    readme = (ROOT / "README.md").read_text()
    for command in ("run", "show", "list-components"):
        assert f"lsm {command}" in readme
        assert CliRunner().invoke(cli, [command, "--help"]).exit_code == 0


def python_block(doc: str, heading: str, containing: str = "") -> str:
    """The first ```python block of the section of ``doc`` whose ``##`` heading contains ``heading``
    (and, when given, whose code contains ``containing``)."""
    text = (ROOT / "docs" / doc).read_text()
    found = re.search(rf"^## [^\n]*{re.escape(heading)}[^\n]*$", text, re.M)
    assert found, f"docs/{doc}: no section '{heading}'"
    end = re.compile(r"^## ", re.M).search(text, found.end())
    section = text[found.end() : end.start() if end else len(text)]
    for block in re.findall(r"^```python\n(.*?)^```", section, re.S | re.M):
        if containing in block:
            return block
    raise AssertionError(
        f"docs/{doc}, section '{heading}': no python block" + (f" with {containing!r}" if containing else "")
    )


def run_block(code: str, where: str) -> dict:
    namespace = {"__name__": "docs_example"}
    exec(compile(code, where, "exec"), namespace)
    return namespace


def test_plugins_md_mixing_example_runs(capsys):
    from lsm_registry.mixing import MixedBatch

    code = python_block("plugins.md", "Mixing a batch outside the engine")
    ns = run_block(code, "docs/plugins.md: Mixing a batch outside the engine")
    batch = ns["batch"]
    assert isinstance(batch, MixedBatch)
    assert tuple(batch.images.shape) == (8, 3, 16, 16)
    assert tuple(batch.target.shape) == (8, 4)
    assert tuple(batch.mask.shape) == (8, 1, 16, 16)
    assert tuple(batch.unit_mask.shape) == (8, 4, 4)
    assert tuple(batch.saliency_f.shape) == (8, 4, 4)
    assert batch.saliency_b is None
    torch.testing.assert_close(batch.target.sum(dim=1), torch.ones(8))
    # The shapes the doc prints in its comments are the ones printed.
    printed = capsys.readouterr().out
    assert "torch.Size([8, 3, 16, 16]) torch.Size([8, 4])" in printed


def test_plugins_md_example_mixer_conforms():
    from lsm_registry.testing import check_component

    code = python_block("plugins.md", "A mixer", containing="class MyMixer(Mixer)")
    cls = run_block(code, "docs/plugins.md: A mixer")["MyMixer"]
    check_component(cls)
    check_component(cls, params=cls.Params(alpha=0.2))  # the call section 7 shows


def test_plugins_md_example_saliency_provider_conforms():
    from lsm_registry.testing import ReferencePatch, check_component, tiny_context

    code = python_block("plugins.md", "A saliency provider", containing="class LocalContrast(SaliencyProvider)")
    cls = run_block(code, "docs/plugins.md: A saliency provider")["LocalContrast"]
    check_component(cls)
    flat = cls(cls.Params(), tiny_context())(
        None, torch.full((2, 3, 16, 16), 0.3), torch.zeros(2, dtype=torch.long), ReferencePatch(4)
    )
    torch.testing.assert_close(flat, torch.full((2, 4, 4), 1 / 16))  # a flat image scores uniformly, as promised


def test_plugins_md_listing_shows_every_saliency_provider():
    """The `lsm list-components --kind saliency` output the tutorial shows lists what is registered."""
    from conftest import table_rows

    from lsm_registry.plugins import build_registry

    text = (ROOT / "docs" / "plugins.md").read_text()
    shown = re.search(
        r"`COLUMNS=120 lsm list-components --kind saliency`.*?^```(?:text)?\n(.*?)^```", text, re.S | re.M
    ).group(1)
    names = {row[1] for row in table_rows(shown)}
    assert names == set(build_registry(entry_points=False).names("saliency")) | {"spectral-residual"}


def test_every_python_block_of_the_plugin_guides_runs(capsys):
    for doc in PLUGIN_GUIDES:
        text = (ROOT / "docs" / doc).read_text()
        blocks = PYTHON_BLOCK.findall(text)
        assert blocks, f"docs/{doc}: no python block"
        namespace = {"__name__": "docs_example"}
        for number, code in enumerate(blocks, 1):
            exec(compile(code, f"docs/{doc}: python block {number}", "exec"), namespace)
    capsys.readouterr()


def test_compatibility_md_rename_example_resolves_old_names(tmp_path):
    import warnings

    from lsm_registry import RenamedWarning
    from lsm_registry.plugins import build_registry
    from lsm_registry.recipe import load_recipe
    from lsm_registry.registry import Owner
    from lsm_registry.testing import check_component

    code = python_block("compatibility.md", "Renaming a component or a parameter", containing="renamed_from")
    cls = run_block(code, "docs/compatibility.md: Renaming")["BoxPaste"]
    check_component(cls)
    registry = build_registry(entry_points=False)
    registry.register(cls, Owner("myplugin", "lsm-myplugin", "0.2.0"))
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\nname = "synthetic-lt"\n\n[mixer]\nname = "box-mix"\nsize = 0.3\n')
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        parsed = load_recipe(recipe, registry=registry)
    assert (parsed.mixer.name, parsed.mixer.params.area) == ("box-paste", 0.3)
    messages = [str(w.message) for w in record if issubclass(w.category, RenamedWarning)]
    shown = re.search(
        r"`(r\.toml \[mixer\]\.name: .*?)`", (ROOT / "docs" / "compatibility.md").read_text(), re.S
    ).group(1)
    assert messages[0] == f"{tmp_path}/{' '.join(shown.split())}" and len(messages) == 2


def test_plugins_md_example_callback_runs_and_conforms():
    from lsm_registry.testing import check_component

    code = python_block("contracts.md", "`callback`", containing="class StopOnPlateau(Callback)")
    cls = run_block(code, "docs/contracts.md: callback")["StopOnPlateau"]
    check_component(cls)
    from lsm_registry import LSMError

    callback = cls(cls.Params(patience=2), None)
    for epoch, loss in enumerate([1.0, 0.9, 0.95]):
        callback.on_epoch_end(None, epoch, {"train_loss": loss})
    with pytest.raises(LSMError, match="for 2 epochs"):
        callback.on_epoch_end(None, 3, {"train_loss": 0.92})


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = README_EXAMPLE.search(text).group(1)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    ns = run_block(code, "README.md: Python")
    run, folder = ns["run"], ns["folder"]
    assert (tmp_path / "runs" / "notebook-demo" / "summary.json").is_file()
    assert {k: v for k, v in folder.summary.items() if k != "format"} == run.summary and folder.metrics[-1][
        "epoch"
    ] == 2
    assert folder.trained.epoch == run.summary["best_epoch"]
    assert isinstance(folder.model, torch.nn.Module) and not folder.model.training


def _anchors(path: Path) -> set[str]:
    """The section anchors GitHub makes for a markdown file's headings (code blocks skipped)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"^#+ (.*)$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def test_links_to_doc_sections_resolve():
    """A section that moves (plugins.md's reference went to contracts.md) leaves no link behind."""
    broken = []
    for page in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", page.read_text(encoding="utf-8")):
            path = (page.parent / target) if target else page
            if path.suffix == ".md" and (not path.is_file() or anchor not in _anchors(path)):
                broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, "links to sections that do not exist: " + ", ".join(broken)
