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

    expected = flagdoc.render(ROOT / "trainA.py", ROOT / "trainB.py")
    assert (ROOT / "docs" / "flags.md").read_text() == expected, "run: python -m utils.flagdoc trainA.py trainB.py > docs/flags.md"


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


def _project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (TYPE_CHECKING imports too: a cycle there is
    still one for a reader). Modules are named like 'utils.train', 'trainA'."""
    import ast

    files = [ROOT / "trainA.py", ROOT / "trainB.py"] + [p for d in ("data", "models", "utils")
                                                          for p in sorted((ROOT / d).glob("*.py"))]
    names = {p: (p.stem if p.parent == ROOT else f"{p.parent.name}.{p.stem}") for p in files}
    known = set(names.values()) | {"data", "models", "utils"}
    graph = {}
    for path, name in names.items():
        package = name.rsplit(".", 1)[0] if "." in name else ""
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package if node.level else ""
                module = ".".join(x for x in (base, node.module or "") if x)
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in known and t != name}
        graph[name] = found
    return graph


def test_imports_point_one_way_and_never_in_a_circle():
    graph = _project_imports()
    for name, imported in graph.items():
        layer = name.split(".")[0]
        if layer in ("data", "models"):
            assert not {i for i in imported if i.split(".")[0] in ("utils", "trainA", "trainB")}, name
        if layer == "utils":
            assert not imported & {"trainA", "trainB"}, f"{name} imports a script"
    # no cycle: a depth-first walk never meets a module still on its path
    state: dict[str, str] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join(path + [node, nxt])
            if nxt not in state:
                walk(nxt, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [])


def test_no_module_over_300_lines_and_no_function_over_60():
    import ast

    for path in [ROOT / "trainA.py", ROOT / "trainB.py"] + [p for d in ("data", "models", "utils")
                                                             for p in (ROOT / d).glob("*.py")]:
        text = path.read_text()
        assert len(text.splitlines()) <= 300, f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() is {length} lines"
