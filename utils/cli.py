"""Flag parsing shared by trainA.py and trainB.py.

Everything here accepts what a person types and what `wandb agent` passes (`--key=value` with
Python's str() of the value): booleans as true/True/1/yes, lists as `5,5,3` or `[5, 5, 3]`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import fields
from typing import Callable, Sequence

from data import DatasetError
from models import ModelConfigError

from .errors import UsageError

# Errors whose message is already the one line a user needs; anything else is a bug and
# keeps its traceback.
USER_ERRORS = (UsageError, DatasetError, ModelConfigError)


def load_program(path: str | os.PathLike):
    """The module of a training script named by its file (trainA.py), as `wandb agent` names its
    program: the tools that read a script's parser (flagdoc, sweep_check) take it from the command
    line instead of importing the scripts, which sit above utils/. A missing file, or one that is
    not a training script, is a UsageError."""
    import importlib.util
    from pathlib import Path

    path = Path(path).resolve()
    module = sys.modules.get(path.stem)
    if module is None or Path(getattr(module, "__file__", "")).resolve() != path:
        if not path.is_file():
            raise UsageError(f"program '{path}' does not exist; name the training script, e.g. trainA.py")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        if str(path.parent) not in sys.path:  # the script's own imports (data, models, utils) resolve beside it
            sys.path.insert(0, str(path.parent))
        spec.loader.exec_module(module)
    if not hasattr(module, "SPEC"):
        raise UsageError(f"program '{path}' is not a training script of this project (it has no SPEC); "
                         "name trainA.py or trainB.py")
    return module


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (no usage block) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)} (see --help)\n")

    def _suggestion(self, message: str) -> str:
        """For a misspelt flag (--epcohs), the flag it most likely meant."""
        import difflib

        match = re.match(r"unrecognized arguments: (\S+)", message)
        if not match or not match.group(1).startswith("-"):
            return ""
        flags = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        close = difflib.get_close_matches(match.group(1).split("=")[0], flags, n=1, cutoff=0.6)
        return f"; did you mean {close[0]}?" if close else ""


_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}


def str2bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not a boolean; use true or false")


def int_list(text: str) -> list[int]:
    """'5', '5,5,3', '[5, 5, 3]', '(5 5 3)' -> list of ints."""
    body = str(text).strip().strip("[]()").strip()
    parts = [p for p in re.split(r"[,\s]+", body) if p]
    if not parts:
        raise argparse.ArgumentTypeError(f"'{text}' is empty; give one integer or a list like 5,5,3,3,3")
    try:
        values = [int(float(p)) if float(p).is_integer() else _not_int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not an integer list; use one integer or a list like 5,5,3,3,3"
        ) from None
    return values


def _not_int(part: str) -> int:
    raise ValueError(part)


def int_or_list(text: str) -> int | list[int]:
    values = int_list(text)
    return values[0] if len(values) == 1 else values


def filter_org(text: str) -> str | float:
    value = str(text).strip().lower()
    if value in ("same", "const", "double", "half"):
        return "same" if value == "const" else value
    try:
        float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a filter organisation; use same, double, half or a factor like 1.5"
        ) from None
    # A factor beyond 16 overflows any block's filter count within five blocks.
    return number(float, 0, 16, low_open=True)(value)


def choice(*choices: str) -> Callable[[str], str]:
    """Case-insensitive choice that returns the canonical spelling and lists the valid ones. A
    choice named "off" also takes "false": YAML 1.1 reads an unquoted off as a boolean, so a
    sweep file's `values: [off, ...]` reaches the script as --flag=False."""
    lookup = {c.lower(): c for c in choices}
    if "off" in lookup:
        lookup.setdefault("false", lookup["off"])

    def parse(text: str) -> str:
        key = str(text).strip().lower()
        if key not in lookup:
            raise argparse.ArgumentTypeError(f"'{text}' is not one of {', '.join(choices)}")
        return lookup[key]

    parse.__name__ = "choice"
    return parse


INT_MAX = 2**31 - 1  # an integer flag's ceiling where none is given: counts, sizes, epochs


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], int | float]:
    """int/float parser with a range check; 1e-05, 0.0001 and '64.0' (for ints) all parse.
    NaN and infinities never pass, and an integer has a ceiling (INT_MAX unless given), so no
    value reaches the run that overflows where it is used."""
    if kind is int and high is None:
        high = INT_MAX

    def parse(text: str):
        try:
            value = float(text)
            if kind is int:
                if not value.is_integer():
                    raise ValueError
                value = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a{'n integer' if kind is int else ' number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"{text} must be {'<' if high_open else '<='} {high}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_bool(group, *names: str, default: bool, help: str) -> None:
    """--flag, --flag true|false|1|0|yes|no (any case), as a person or wandb agent writes it."""
    group.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL",
                       help=f"{help} (default: {str(default).lower()})")


def config_from_args(config_cls, args: argparse.Namespace):
    """The dataclass config from parsed flags: one spelling for flag, field and wandb key."""
    return config_cls(**{f.name: getattr(args, f.name) for f in fields(config_cls) if hasattr(args, f.name)})


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, prog: str = "") -> int:
    """Call main(argv); a user error becomes one line on stderr and exit code 2."""
    for stream in (sys.stdout, sys.stderr):  # a class named in bytes that are not UTF-8 still prints
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        code = main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback when Python exits
        return code
    except USER_ERRORS as error:
        # One line, whatever the message carries (an HTTP reason or OS error with newlines in it).
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`--predict ... | head -1`): stop quietly, as a shell tool does.
        # Later writes to the closed stdout (at exit, when Python flushes it) go to devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:  # outside training (scanning, decoding the cache): nothing trained yet
        print(f"\n{prog}: interrupted before training started; nothing to keep", file=sys.stderr)
        return 130
