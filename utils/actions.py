"""What a script does besides a plain training run: --predict and --test_only (a checkpoint
alone), --resume (the run's saved config plus the few flags a resume may change), and the
end-of-run pictures hook."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Sequence

from data import NatureData, ensure_dataset
from data.loaders import make_loader

from .checkpoint import check_script, load_checkpoint
from .errors import EXIT_OK, UsageError
from .runtime import default_num_workers, make_precision, prepare_model, resolve_device
from .evaluation import evaluate


@dataclass(frozen=True, kw_only=True)
class ScriptSpec:
    """What each script provides, in one place: main() and utils.sweep_check use only this."""
    name: str  # "trainA" / "trainB": checkpoints record it
    get_args_parser: Callable
    config_from_args: Callable  # parsed flags -> config
    config_from_checkpoint: Callable  # checkpoint dict -> config
    check_config: Callable  # raises UsageError/ModelConfigError for what can fail without data
    model_structure: Callable  # config -> the model's structure, no weights loaded (sweep checks)
    rebuild_from_checkpoint: Callable  # checkpoint -> (config, model with weights, eval transform)
    sizes: Callable  # config -> data.Sizes (decode, eval resize, crop)
    shape_fields: tuple[str, ...] = ()  # flags whose combinations decide whether the model builds

    def parse_args(self, argv: Sequence[str] | None = None):
        return self.get_args_parser().parse_args(argv)


def checkpoint_action(spec: ScriptSpec, args) -> int | None:
    """--predict or --test_only, which need only a checkpoint: their exit code; None when neither
    was asked for (the command trains)."""
    return run_checkpoint_action(args, spec.get_args_parser(), spec)


def config_for_run(spec: ScriptSpec, args):
    """The run's config from parsed flags: as given, or with --resume the saved one plus the few
    flags a resume may change; checked before any data is touched."""
    parser = spec.get_args_parser()
    cfg = merged_config(args, parser, spec.config_from_args, spec.config_from_checkpoint, spec.name)
    check_wandb_names(cfg)
    spec.check_config(cfg)
    resolve_device(cfg.device)  # an unknown or missing device fails here, before any data
    if args.lr_find and args.resume:
        raise UsageError("--lr_find starts from fresh weights; drop --resume")
    return cfg


WANDB_FORBIDDEN = "/\\#?%:"  # characters wandb refuses in a project name


def check_wandb_names(cfg) -> None:
    """What wandb would refuse after the data was decoded, refused before anything is done."""
    project = cfg.wandb_project
    bad = sorted({c for c in project if c in WANDB_FORBIDDEN})
    if bad:
        hint = "; put the team in --wandb_entity" if "/" in bad else ""
        raise UsageError(f"--wandb_project '{project}': wandb project names cannot hold {' '.join(bad)}{hint}")
    if not project.strip() or len(project) > 128:
        raise UsageError(f"--wandb_project '{project[:40]}...' must be 1 to 128 characters (it has {len(project)})")


def report_test(stats, class_names: list[str], header: str, per_class_table: bool = True) -> dict:
    """Print test metrics (and the per-class accuracy table); return them as a flat dict."""
    from .drawing import MAX_CLASSES_SHOWN

    per_class = dict(zip(class_names, stats.per_class_accuracy()))
    print(f"{header}: test_loss {stats.loss:.4f}  test_accuracy {stats.accuracy:.4f}  top5 {stats.top5_accuracy:.4f}  "
          f"balanced {stats.balanced_accuracy:.4f}  ({stats.images} images)")
    results = {"test_loss": stats.loss, "test_accuracy": stats.accuracy, "test_top5_accuracy": stats.top5_accuracy,
               "test_balanced_accuracy": stats.balanced_accuracy, "test_images": stats.images,
               "test_per_class_accuracy": per_class}
    if not per_class_table:
        return results
    shown = per_class
    if len(per_class) > MAX_CLASSES_SHOWN:  # the weakest classes; every one is in test_metrics.json
        shown = dict(sorted(per_class.items(), key=lambda item: item[1])[:MAX_CLASSES_SHOWN])
        print(f"  the {MAX_CLASSES_SHOWN} of {len(per_class)} classes of lowest accuracy (all in test_metrics.json):")
    width = max(len(n) for n in shown)
    for name, accuracy in shown.items():
        print(f"  {name:<{width}}  {accuracy:.4f}")
    return results


# What --resume lets a user change; everything else comes from the run's own checkpoint.
RESUME_OVERRIDES = frozenset({"data_dir", "device", "num_workers", "wandb_mode", "epochs", "cache_dir", "pictures",
                              "patience", "refit"})
# What --test_only uses besides --checkpoint; any other setting comes from the checkpoint.
TEST_ONLY_FLAGS = frozenset({"data_dir", "device", "batch_size", "num_workers", "tta"})
# Settings that change nothing a test measures: tolerated with --test_only, as with any run.
NO_EFFECT_ON_RESULTS = frozenset({"wandb_mode", "wandb_project", "wandb_entity", "output_dir", "run_name", "pictures",
                                  "cache", "cache_dir", "data_on_device", "download", "data_url", "keep_zip"})


def explicit_flags(args, parser) -> set[str]:
    """Flags the user gave a value other than the default."""
    return {name for name, value in vars(args).items() if value != parser.get_default(name)}


def run_checkpoint_action(args, parser, spec: ScriptSpec) -> int | None:
    """--predict / --test_only, which need only a checkpoint; None when neither was asked for."""
    from .export import export
    from .predict import predict

    if args.export:
        return export(args.checkpoint, spec)
    if args.predict:
        return predict(args.predict, args.checkpoint, spec, args.device, prog=f"{spec.name}.py")
    if args.test_only:
        given = explicit_flags(args, parser)
        ignored = sorted(given - TEST_ONLY_FLAGS - NO_EFFECT_ON_RESULTS - {"test_only", "checkpoint"})
        if ignored:
            allowed = ", ".join(f"--{name}" for name in sorted(TEST_ONLY_FLAGS))
            raise UsageError(f"--test_only evaluates the checkpoint with its own saved settings, so "
                             f"{', '.join('--' + n for n in ignored)} would be ignored (with --test_only only "
                             f"--checkpoint, {allowed} apply); drop it, or train a new run with it")
        return test_only(args.checkpoint, spec, data_dir=args.data_dir if "data_dir" in given else None,
                         device=args.device, batch_size=args.batch_size if "batch_size" in given else None,
                         num_workers=args.num_workers, tta=args.tta if "tta" in given else None)
    return None


def merged_config(args, parser, from_args: Callable, from_checkpoint: Callable, script: str = ""):
    """The run's config: from the flags, or with --resume from the checkpoint plus the few
    flags RESUME_OVERRIDES allows to change. Any other flag that would change a saved setting
    is refused (silently dropping it would run something else than the user asked for)."""
    if not args.resume:
        return from_args(args)
    args.resume = str(Path(args.resume).expanduser())
    checkpoint = load_checkpoint(args.resume)
    if script:  # another script's checkpoint is refused before its config is read as this one's
        check_script(checkpoint, script, args.resume)
    check_resumable(checkpoint, args.resume)
    saved = from_checkpoint(checkpoint)
    given = explicit_flags(args, parser) & {f.name for f in dataclasses.fields(saved)}
    wanted = from_args(args)
    changed = sorted(name for name in given - RESUME_OVERRIDES if getattr(wanted, name) != getattr(saved, name))
    if changed:
        allowed = ", ".join(f"--{name}" for name in sorted(RESUME_OVERRIDES))
        raise UsageError(f"--resume continues a run with its saved settings, so {', '.join('--' + n for n in changed)} "
                         f"cannot change (with --resume only {allowed} may); start a new run instead")
    cfg = dataclasses.replace(saved, **{name: getattr(wanted, name) for name in given & RESUME_OVERRIDES})
    check_work_left(checkpoint, cfg, args.resume)
    return cfg


def check_work_left(checkpoint: dict, cfg, path: str) -> None:
    """A resume that would train nothing, or train one epoch past an early stop, is refused
    before it rewrites anything of the run (unless a --refit is still to run)."""
    done = int(checkpoint.get("epoch", 0))
    best = Path(path).with_name("best.pt")
    if cfg.refit and not Path(path).with_name("refit.pt").is_file():
        return  # the epochs are done, the refit is not: the resume runs it
    if not finished(Path(path).parent):
        return  # stopped after its epochs (Ctrl-C in the test, say): the resume finishes it
    if done >= cfg.epochs:
        raise UsageError(f"'{path}' has trained {done} epochs and --epochs is {cfg.epochs}, so there is nothing to "
                         f"train; pass --epochs above {done} to train on, or test it: --test_only --checkpoint {best}")
    waited = int(checkpoint.get("epochs_without_improvement", 0))
    if cfg.patience and waited >= cfg.patience:
        raise UsageError(f"the run of '{path}' stopped early after epoch {done} (no better val_accuracy for {waited} "
                         f"epochs, --patience {cfg.patience}); pass a larger --patience (or 0) to train on, or test "
                         f"it: --test_only --checkpoint {best}")


def finished(run_dir: Path) -> bool:
    """The run's state.json says it ended as it should (tested); a run without one (written by an
    older version) counts as finished when it has its test_metrics.json."""
    try:
        return json.loads((run_dir / "state.json").read_text()).get("state") == "finished"
    except (OSError, ValueError, AttributeError):
        return (run_dir / "test_metrics.json").is_file()


def check_resumable(checkpoint: dict, path: str) -> None:
    if "optimizer" not in checkpoint:
        raise UsageError(f"'{path}' holds weights only (a best.pt); resume from the last.pt in the same folder")


def pictures_maker(cfg, guided: bool) -> Callable:
    """The after_test hook that draws every picture of a finished run."""
    def make(model, precision, test_set, test_stats, run_dir, tracker, class_names):
        from .pictures import make_all

        paths = make_all(model, precision, test_set, test_stats, run_dir, tracker, class_names, cfg.seed, guided=guided)
        print("pictures: " + ", ".join(p.name for p in paths.values()))
    return make


def test_only(checkpoint_path: str, spec: ScriptSpec, data_dir: str | None, device: str, batch_size: int | None,
              num_workers: int, tta: str | None = None) -> int:
    """Evaluate a checkpoint on the test folder using only what the checkpoint carries (and
    tta, when given, instead of the run's own test-time augmentation: it changes no weight)."""
    if not checkpoint_path:
        raise UsageError("--test_only needs --checkpoint PATH (a best.pt or last.pt)")
    checkpoint = load_checkpoint(checkpoint_path)
    check_script(checkpoint, spec.name, checkpoint_path)
    cfg, model, eval_transform = spec.rebuild_from_checkpoint(checkpoint)
    precision = make_precision(cfg, device)
    test_set = NatureData(ensure_dataset(data_dir or cfg.data_dir, download=False), "test", eval_transform,
                          image_size=cfg.image_size, decode_size=spec.sizes(cfg).decode)
    if test_set.classes != list(checkpoint["class_names"]):
        raise UsageError(f"the test folder's classes {test_set.classes} differ from the checkpoint's "
                         f"{checkpoint['class_names']}; point --data_dir at the data set it was trained on")
    loader = make_loader(test_set, batch_size or cfg.batch_size, False, precision.device,
                         default_num_workers(num_workers), 0)
    model = prepare_model(model, precision)
    started = time.perf_counter()
    stats = evaluate(model, loader, precision, len(test_set.classes), desc="test",
                     tta=tta or getattr(cfg, "tta", "none"))
    report_test(stats, test_set.classes, f"{checkpoint_path} (epoch {checkpoint.get('epoch')})")
    print(f"evaluated in {time.perf_counter() - started:.1f}s")
    return EXIT_OK
