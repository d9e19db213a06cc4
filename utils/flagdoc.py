"""docs/flags.md, generated from the two scripts' parsers (so every flag and default in it is
the parser's own; tests/test_repo.py checks the file is current).

    python -m utils.flagdoc trainA.py trainB.py > docs/flags.md

The scripts are named on the command line (utils/ never imports them: they sit above it).
"""

from __future__ import annotations

import argparse
import sys

from .cli import load_program
from .errors import UsageError

HEADER = """# Every flag, with its default

Generated from the parsers by `python -m utils.flagdoc trainA.py trainB.py > docs/flags.md` (a test checks it is
current); `python trainA.py --help` and `python trainB.py --help` say the same. Canonical names
use underscores because they are also the sweep and wandb config keys; dashed spellings
(`--batch-size`) work too. Booleans take `true/false/1/0/yes/no` in any case, and a bare flag
(`--batch_norm`) means true. Lists take `5,5,3,3,3` or `[5, 5, 3, 3, 3]`.
"""


def _default(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreFalseAction):  # --no_pictures: a switch, not a value
        return "-"
    value = action.default
    if isinstance(value, bool):
        return str(value).lower()
    if value is None or value == "":
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%%", "%")
    for suffix in (f" (default: {action.default})", " (default: auto)", f" (default: {_default(action)})"):
        text = text.replace(suffix, "")
    return text.replace("|", "\\|")


def parser_tables(parser: argparse.ArgumentParser, skip_groups: tuple[str, ...] = ()) -> str:
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.dest != "help" and a.option_strings]
        if not actions or group.title in skip_groups:
            continue
        out.append(f"\n**{group.title}**\n\n| flag | default | what it does |\n|---|---|---|")
        for action in actions:
            names = ", ".join(f"`{o}`" for o in action.option_strings
                              if not (o.startswith("--") and "-" in o[2:]))  # dashed spellings are aliases
            out.append(f"| {names} | `{_default(action)}` | {_help(action)} |")
    return "\n".join(out) + "\n"


def render(first_path, second_path) -> str:
    """The first script's flags in full; the second's own flags, and its changed defaults of the
    flags both share."""
    first, second = load_program(first_path), load_program(second_path)
    b_defaults = {a.dest: a.default for a in second.get_args_parser()._actions}
    a_defaults = {a.dest: a.default for a in first.get_args_parser()._actions}
    changed = ", ".join(f"`--{k} {str(b_defaults[k]).lower() if isinstance(b_defaults[k], bool) else b_defaults[k]}`"
                        for k in sorted(b_defaults)
                        if k in a_defaults and b_defaults[k] != a_defaults[k] and k != "help")
    a_name, b_name = f"{first.__name__}.py", f"{second.__name__}.py"
    return (HEADER + f"\n## {a_name}\n" + parser_tables(first.get_args_parser())
            + f"\n## {b_name}\n\nThe same data, optimisation, speed, hardware, output and action flags as {a_name}, "
            f"with these defaults changed: {changed}. Its own flags:\n"
            + parser_tables(second.get_args_parser(), skip_groups=("data", "optimisation", "speed", "hardware",
                                                                    "output and tracking", "actions")))


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m utils.flagdoc trainA.py trainB.py > docs/flags.md")
    try:
        print(render(*argv), end="")
    except UsageError as error:
        sys.exit(f"flagdoc: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
