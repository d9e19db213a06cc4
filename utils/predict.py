"""--predict: top-3 classes of image files (or folders of them) from a checkpoint alone."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from data import IMAGE_EXTENSIONS, load_rgb
from data.decode import UNREADABLE

from .checkpoint import check_script, load_checkpoint
from .errors import UsageError
from .runtime import resolve_device
from .evaluation import predict_logits


def expand(paths: list[str]) -> list[Path]:
    """Files as given; folders as their image files (recursively, sorted)."""
    files = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            # Hidden files and folders (.ipynb_checkpoints/, .thumbnails/, ._photo.jpg) hold copies
            # and thumbnails, not the user's photos.
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UsageError(f"--predict folder '{path}' holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():  # a pipe, socket or device: opening it could block forever
            raise UsageError(f"--predict path '{path}' is not a regular file or folder; give image files or folders")
        else:
            raise UsageError(f"--predict path '{path}' does not exist; give image files or folders")
    return files


@torch.no_grad()
def predict(paths: list[str], checkpoint_path: str, spec, device: str = "auto", top: int = 3, prog: str = "") -> int:
    """The top classes of each image with the checkpoint's model; spec: the script's ScriptSpec."""
    if not checkpoint_path:
        raise UsageError("--predict needs --checkpoint PATH (a best.pt or last.pt)")
    checkpoint = load_checkpoint(checkpoint_path)  # refuse a bad checkpoint before anything else
    files = expand(paths)
    check_script(checkpoint, spec.name, checkpoint_path)
    cfg, model, transform = spec.rebuild_from_checkpoint(checkpoint)
    decode_size = spec.sizes(cfg).decode
    classes = list(checkpoint["class_names"])
    target = resolve_device(device)
    model = model.to(target).eval()
    failed = 0
    for path in files:
        try:
            image = load_rgb(str(path), decode_size)
        except UNREADABLE as error:
            print(f"{prog}: error: cannot read image '{path}' ({str(error)[:100]}); skipped", file=sys.stderr)
            failed += 1
            continue
        logits = predict_logits(model, transform(image).unsqueeze(0).to(target), getattr(cfg, "tta", "none"))
        probabilities = logits.float().softmax(1)[0].cpu()
        values, indices = probabilities.topk(min(top, len(classes)))
        ranked = ", ".join(f"{classes[i]} {v:.3f}" for v, i in zip(values.tolist(), indices.tolist()))
        print(f"{path}: {ranked}")
    return 2 if failed else 0
