"""--export: a checkpoint as a torch.export program (<name>.pt2) that plain PyTorch loads without
this repository (torch.export.load), with its class names and preprocessing in a JSON file beside
it (torch.jit, the older way, is deprecated in current PyTorch). The exported
module includes the run's test-time augmentation (the mirror's logits averaged with --tta flip),
so it ranks classes as --predict does.

    import json, torch
    from PIL import Image
    from torchvision.transforms import v2
    model = torch.export.load("best.pt2").module()
    meta = json.load(open("best.json"))
    prep = v2.Compose([v2.ToImage(), v2.Resize(meta["resize"], antialias=True), v2.CenterCrop(meta["image_size"]),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(meta["mean"], meta["std"])])
    logits = model(prep(Image.open("photo.jpg").convert("RGB"))[None])
    print(meta["class_names"][int(logits.argmax())])
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import check_script, load_checkpoint
from .errors import EXIT_OK, UsageError
from .outputs import write_json


class WithTTA(nn.Module):
    """model's logits, averaged with the mirror image's with flip."""

    def __init__(self, model: nn.Module, flip: bool):
        super().__init__()
        self.model, self.flip = model, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.flip:
            logits = (logits + self.model(x.flip(-1))) / 2
        return logits


def export(checkpoint_path: str, spec) -> int:
    """Write <checkpoint>.pt2 and <checkpoint>.json beside the checkpoint (any batch size)."""
    if not checkpoint_path:
        raise UsageError("--export needs --checkpoint PATH (a best.pt, refit.pt or last.pt)")
    checkpoint = load_checkpoint(checkpoint_path)
    check_script(checkpoint, spec.name, checkpoint_path)
    cfg, model, transform = spec.rebuild_from_checkpoint(checkpoint)
    sizes = spec.sizes(cfg)
    normalize = next(t for t in transform.transforms if type(t).__name__ == "Normalize")
    tta = getattr(cfg, "tta", "none")
    module = WithTTA(model.eval().float(), tta == "flip").eval()
    example = torch.zeros(2, 3, sizes.image, sizes.image)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
    path = Path(checkpoint_path).expanduser()
    target = path.with_suffix(".pt2")
    torch.export.save(program, str(target))
    meta = {"class_names": list(checkpoint["class_names"]), "image_size": sizes.image, "resize": sizes.eval_resize,
            "mean": list(normalize.mean), "std": list(normalize.std), "tta": tta, "script": spec.name,
            "input": "RGB image: shorter side resized to `resize`, center crop `image_size`, scaled to [0, 1], "
                     "normalised with mean and std; the output is one logit per class"}
    write_json(path.with_suffix(".json"), meta)
    print(f"saved {target} (torch.export.load(path).module()) and {path.with_suffix('.json')} (class names, "
          "preprocessing)")
    return EXIT_OK
