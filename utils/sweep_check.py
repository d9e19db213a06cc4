"""Check a wandb sweep file before starting agents: every value parses, and every combination
of the values that decide the model's shape builds, using the exact argv `wandb agent` passes.

    python -m utils.sweep_check sweep.yaml

The program (trainA.py / trainB.py) provides its `SPEC` (a utils.actions.ScriptSpec): the parser,
config, checks, model builder and the shape fields (the flags whose combinations can fail to
build together).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path
from typing import Any

import torch

from .cli import USER_ERRORS, load_program
from .errors import UsageError


def agent_argv(values: dict[str, Any]) -> list[str]:
    """What the agent's default command passes: --key=str(value), one token per key."""
    return [f"--{key}={value}" for key, value in values.items()]


def candidate_values(spec: dict) -> list[Any]:
    """Every listed value, or a distribution's bounds and middle (geometric for log scales)."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if "min" in spec and "max" in spec:
        low, high = spec["min"], spec["max"]
        distribution = spec.get("distribution", "")
        middle = math.sqrt(low * high) if "log" in distribution and low > 0 else (low + high) / 2
        if distribution.startswith(("int", "q_log_uniform", "q_uniform")) or (
                not distribution and isinstance(low, int) and isinstance(high, int)):
            middle = round(middle)
        return [low, middle, high]
    raise ValueError(f"parameter spec {spec} has no value, values or min/max")


def load_sweep(path: Path) -> dict:
    import yaml  # a wandb dependency

    try:
        sweep = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"sweep_check: cannot read '{path}': {error}")
    if not isinstance(sweep, dict) or "parameters" not in sweep or "program" not in sweep:
        raise SystemExit(f"sweep_check: '{path}' needs 'program' and 'parameters' keys")
    return sweep


def check_argv(script, argv: list[str]) -> str:
    """'' if argv parses, passes the script's checks and builds the model; else the reason."""
    stderr = StringIO()
    try:
        with redirect_stderr(stderr):
            args = script.parse_args(argv)
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines()
        return lines[-1] if lines else "argument error"
    try:
        cfg = script.config_from_args(args)
        script.check_config(cfg)
        with torch.device("meta"):  # shapes only: no memory, no arithmetic
            script.model_structure(cfg)
    except USER_ERRORS as error:
        return str(error)
    return ""


def check_sweep(path: Path) -> tuple[int, list[tuple[list[str], str]]]:
    """(argvs checked, failures): each value alone on the defaults, then the full product of
    the shape-deciding parameters with every other parameter at its first value."""
    sweep = load_sweep(path)
    # the program sits beside the sweep file, or where `wandb agent` runs it (docs/sweep_partB.yaml
    # names trainB.py at the repository root)
    places = [path.resolve().parent, Path.cwd(), Path(__file__).resolve().parents[1]]
    program = next((p / sweep["program"] for p in places if (p / sweep["program"]).is_file()), Path(sweep["program"]))
    try:
        script = load_program(program).SPEC
    except UsageError as error:
        raise SystemExit(f"sweep_check: {error}") from None
    choices = {name: candidate_values(spec) for name, spec in sweep["parameters"].items()}
    argvs = [agent_argv({name: value}) for name, values in choices.items() for value in values]
    shape = [name for name in choices if name in script.shape_fields]
    base = {name: values[0] for name, values in choices.items()}
    for combo in itertools.product(*(choices[name] for name in shape)):
        argvs.append(agent_argv({**base, **dict(zip(shape, combo))}))
    failures = [(argv, reason) for argv in argvs if (reason := check_argv(script, argv))]
    return len(argvs), failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.sweep_check", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep yaml file")
    args = parser.parse_args(argv)
    checked, failures = check_sweep(args.sweep)
    for failed_argv, reason in failures[:50]:
        print(f"FAIL {' '.join(failed_argv)}\n     {reason}")
    if len(failures) > 50:
        print(f"... and {len(failures) - 50} more")
    print(f"{args.sweep}: {checked} agent command lines checked, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
