"""The README, CI script and requirements stay true to the code."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    readme_command = re.search(r"requirements-dev\.txt && (python -m pytest[^\n`]*)", README).group(1).strip()
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip().startswith("python -m pytest")]
    assert ci_commands == [readme_command]


def test_requirements_have_lower_bounds_only():
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "-r")):
                assert ">=" in line and "==" not in line and "<" not in line, line
    wanted = {"torch", "torchvision", "wandb", "numpy", "pillow", "tqdm"}
    listed = {re.split(r"[<>=]", l)[0].strip().lower() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip()}
    assert wanted <= listed


def test_flag_reference_is_generated_from_the_parsers():
    from utils import flagdoc

    assert (ROOT / "docs" / "flags.md").read_text() == flagdoc.render(), "run: python -m utils.flagdoc > docs/flags.md"


@pytest.mark.parametrize("script", ["trainA", "trainB"])
def test_flag_reference_lists_every_flag_with_its_parser_default(script):
    from utils.flagdoc import _default

    flags = (ROOT / "docs" / "flags.md").read_text()
    for action in __import__(script).get_args_parser()._actions:
        if action.dest == "help":
            continue
        canonical = next(o for o in action.option_strings if o.startswith("--"))
        row = next((line for line in flags.splitlines() if line.startswith("|") and f"`{canonical}`" in line), None)
        assert row is not None, f"{canonical} missing from docs/flags.md"
        if script == "trainA" or action.container.title == "model":
            assert f"| `{_default(action)}` |" in row, (canonical, row)


def test_readme_flag_tour_shows_trainA_defaults():
    """The README's short table of flags writes values next to them; they are trainA's defaults
    (a change of defaults once left that table behind)."""
    from utils.flagdoc import _default

    table = README.split("| what | flags (trainA defaults) |", 1)[1].split("\n\n", 1)[0]
    actions = {o: a for a in __import__("trainA").get_args_parser()._actions for o in a.option_strings}
    shown = re.findall(r"`(?:-[\w]+/)?(--\w+) ([^`(]+)`", table)
    assert len(shown) > 30
    for flag, value in shown:
        default = _default(actions[flag])
        try:
            assert float(value) == float(default), (flag, value, default)
        except ValueError:
            assert value.strip() == default, (flag, value, default)


def test_readme_is_short_and_links_every_doc_page():
    assert len(README.splitlines()) <= 200
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in README, page.name


def test_docs_map_names_every_module():
    map_text = (ROOT / "docs" / "README.md").read_text()
    for folder in ("data", "models", "utils"):
        for module in sorted((ROOT / folder).glob("*.py")):
            if module.name != "__init__.py":
                assert f"`{folder}/{module.name}`" in map_text, module
