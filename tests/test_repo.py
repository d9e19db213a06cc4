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


@pytest.mark.parametrize("script", ["trainA", "trainB"])
def test_readme_documents_every_flag_with_its_default(script):
    module = __import__(script)
    parser = module.get_args_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        canonical = next(o for o in action.option_strings if o.startswith("--"))
        assert f"`{canonical}`" in README, f"{canonical} missing from README"
