"""torchvision's TrivialAugmentWide and RandAugment on a whole uint8 batch at once, on its device.

torchvision draws one operation and magnitude per call, so applying its policy to a batch costs
one small call per image (64 per batch; on a GPU, some of them wait for it). Here every image's
operations, magnitudes and signs are drawn up front from one generator, then each operation runs
once over the images that drew it, with per-image parameters as tensors. The spaces (operations,
magnitude bins, signs) are torchvision's; so is each operation's arithmetic, and the tests hold
every operation's output to torchvision's on the same image and magnitude, within uint8 rounding.

    >>> policy = BatchPolicy("trivialwide")
    >>> out = policy(images_uint8, torch.Generator().manual_seed(0))   # (N, 3, H, W) uint8
"""

from __future__ import annotations


import torch

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
GRAY = (0.2989, 0.587, 0.114)  # torchvision's luma weights for Color and Contrast
# Images per pixel-wise call on the CPU: a few images' float intermediates stay in the cache,
# where one pass over a whole batch's floats runs from memory at about half the speed
# (benchmarks/bench_autoaugment.py; on a GPU the whole group goes in one call).
CPU_CHUNK = 4


def _chunks(part: slice, device: torch.device) -> list[slice]:
    step = part.stop - part.start if device.type == "cuda" else CPU_CHUNK
    return [slice(first, min(first + step, part.stop)) for first in range(part.start, part.stop, step)]


def magnitude_table(policy: str, bins: int, height: int, width: int) -> torch.Tensor:
    """(len(OPS), bins) float64: torchvision's magnitude of each operation at each bin (0 where
    an operation takes none), computed as torchvision computes it (float32 linspace)."""
    wide = policy == "trivialwide"
    shear, strength, rotate = (0.99, 0.99, 135.0) if wide else (0.3, 0.9, 30.0)
    translate_x, translate_y = (32.0, 32.0) if wide else (150.0 / 331.0 * width, 150.0 / 331.0 * height)
    posterize_step = 6 if wide else 4
    values = {"ShearX": torch.linspace(0.0, shear, bins), "ShearY": torch.linspace(0.0, shear, bins),
              "TranslateX": torch.linspace(0.0, translate_x, bins), "TranslateY": torch.linspace(0.0, translate_y, bins),
              "Rotate": torch.linspace(0.0, rotate, bins),
              "Posterize": (8 - (torch.arange(bins) / ((bins - 1) / posterize_step))).round().int(),
              "Solarize": torch.linspace(1.0, 0.0, bins)}
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        values[name] = torch.linspace(0.0, strength, bins)
    table = torch.zeros(len(OPS), bins, dtype=torch.float64)
    for index, name in enumerate(OPS):
        if name in values:
            table[index] = values[name].double()
    return table


class BatchPolicy:
    """trivialwide: one operation per image, its magnitude bin uniform over 31; randaugment: two
    operations per image in turn, at bin 9 of 31 (torchvision's defaults). Signed magnitudes are
    negated with probability 1/2."""

    def __init__(self, policy: str, num_magnitude_bins: int = 31, num_ops: int = 2, magnitude: int = 9):
        if policy not in ("trivialwide", "randaugment"):
            raise ValueError(f"policy={policy!r}; choose trivialwide or randaugment")
        self.policy, self.bins = policy, num_magnitude_bins
        self.rounds = 1 if policy == "trivialwide" else num_ops
        self.magnitude = magnitude
        self._signed = torch.tensor([name in SIGNED for name in OPS])

    def draw(self, count: int, height: int, width: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(rounds, count) operation indices and float64 magnitudes, drawn on the CPU."""
        table = magnitude_table(self.policy, self.bins, height, width)
        ops = torch.randint(len(OPS), (self.rounds, count), generator=generator)
        if self.policy == "trivialwide":
            bins = torch.randint(self.bins, (self.rounds, count), generator=generator)
        else:
            bins = torch.full((self.rounds, count), self.magnitude)
        negative = (torch.rand(self.rounds, count, generator=generator) <= 0.5) & self._signed[ops]
        magnitudes = table[ops, bins]
        return ops, torch.where(negative, -magnitudes, magnitudes)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        ops, magnitudes = self.draw(images.shape[0], images.shape[-2], images.shape[-1], generator)
        # Images sorted by operation: each operation then works on a contiguous slice. The batch
        # is gathered once per round and put back in batch order once at the end; holds[i] is
        # the batch index of the image in row i.
        sorted_images, holds = images, torch.arange(images.shape[0])
        for round_ops, round_magnitudes in zip(ops, magnitudes):
            order = torch.argsort(round_ops[holds], stable=True)
            holds = holds[order]
            round_ops, round_magnitudes = round_ops[holds], round_magnitudes[holds]
            sorted_images = sorted_images.index_select(0, order.to(images.device))
            values, counts = torch.unique_consecutive(round_ops, return_counts=True)
            start = 0
            for value, count in zip(values.tolist(), counts.tolist()):
                part = slice(start, start + count)
                start += count
                if OPS[value] == "Rotate":  # computes its sources a few images at a time itself
                    sorted_images[part] = apply_op("Rotate", sorted_images[part], round_magnitudes[part])
                elif OPS[value] != "Identity":
                    for piece in _chunks(part, images.device):
                        sorted_images[piece] = apply_op(OPS[value], sorted_images[piece], round_magnitudes[piece])
        return sorted_images.index_select(0, torch.argsort(holds).to(images.device))  # back in batch order


def apply_op(name: str, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """One operation on uint8 images (N, C, H, W), image i at magnitudes[i] (float64, on the CPU)."""
    device = images.device
    if name in ("TranslateX", "TranslateY"):  # whole pixels: torchvision truncates the magnitude
        return _shift(images, -magnitudes.trunc().long().view(-1, 1, 1, 1), -1 if name == "TranslateX" else -2)
    if name in ("ShearX", "ShearY"):
        return _shear(images, magnitudes, name)
    if name == "Rotate":
        return _rotate(images, magnitudes)
    if name == "AutoContrast":
        return _autocontrast(images)
    if name == "Equalize":
        return _equalize(images)
    if name == "Posterize":
        bits = magnitudes.long()
        masks = torch.where(bits >= 8, 255, ((1 << bits) - 1) << (8 - bits.clamp(max=8))).to(torch.uint8)
        return images & masks.to(device).view(-1, 1, 1, 1)
    if name == "Solarize":
        # uint8 x >= float t exactly when x >= ceil(t), so the comparison stays in uint8
        # and 255 - x is x ^ 255: the mask as uint8 (1 or 0) negated is 255 or 0 (uint8's
        # torch.where is not vectorised on the CPU, and 6x slower than this)
        threshold = torch.ceil((255.0 * magnitudes).float()).clamp(0, 255).to(torch.uint8)
        flip = torch.ge(images, threshold.to(device).view(-1, 1, 1, 1)).view(torch.uint8).neg_()
        return flip.bitwise_xor_(images)
    factor = (1.0 + magnitudes)
    if name == "Sharpness":
        return _sharpen(images, factor)
    ratio = factor.float().to(device).view(-1, 1, 1, 1)
    rest = (1.0 - factor).float().to(device).view(-1, 1, 1, 1)
    pixels = images.float()  # one conversion, then in place (uint8 times a float tensor is slower)
    if name == "Brightness":
        return pixels.mul_(ratio).clamp_(0, 255).to(torch.uint8)
    r, g, b = pixels.unbind(-3)
    gray = r.mul(GRAY[0]).add_(g, alpha=GRAY[1]).add_(b, alpha=GRAY[2]).unsqueeze(-3).floor_()
    if name == "Contrast":
        gray = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return pixels.mul_(ratio).add_(gray.mul_(rest)).clamp_(0, 255).to(torch.uint8)  # Color blends with gray


def _autocontrast(images: torch.Tensor) -> torch.Tensor:
    """torchvision's autocontrast (each channel stretched to 0..255, flat channels as they are),
    its extremes found on the uint8 image and its flat channels handled with torch.where on the
    (N, C, 1, 1) extremes instead of boolean-mask assignments (a host sync each on a GPU)."""
    low = images.amin(dim=(-2, -1), keepdim=True).float()
    high = images.amax(dim=(-2, -1), keepdim=True).float()
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))
    return images.float().sub_(torch.where(flat, 0.0, low)).div_(scale).clamp_(0, 255).to(torch.uint8)


def _equalize(images: torch.Tensor) -> torch.Tensor:
    """torchvision's equalize (PIL's lookup tables from each channel's histogram), with the
    channels it leaves alone (step 0: one value, or one value and a few others) given the identity
    table instead of a uint8 torch.where over the whole images afterwards."""
    flat = images.reshape(images.shape[0], images.shape[1], -1)
    index = flat.long()
    histogram = torch.zeros(*flat.shape[:2], 256, dtype=torch.int32, device=images.device)
    histogram.scatter_add_(-1, index, torch.ones(1, dtype=torch.int32, device=images.device).expand_as(index))
    cumulative = histogram.cumsum(-1)
    most = histogram.gather(-1, cumulative.argmax(-1, keepdim=True))  # pixels at the channel's top value
    step = (flat.shape[-1] - most).div_(255, rounding_mode="floor")
    table = cumulative[..., :-1].add_(step // 2).div_(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    table = torch.cat([torch.zeros_like(table[..., :1]), table], -1)
    table = torch.where(step == 0, torch.arange(256, device=images.device), table).to(torch.uint8)
    return table.gather(-1, index).view_as(images)


def _sharpen(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness: the inner pixels blended with a 3x3 smoothing (centre 5/13)."""
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    out = images.to(torch.float32)
    # torchvision's kernel: 1/13 around, 5/13 in the centre = (the 3x3 sum + 4 x centre) / 13,
    # the 3x3 sum taken as three rows of three (sliced adds: no convolution set-up)
    rows = out[..., :-2] + out[..., 1:-1] + out[..., 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    blurred = box.add_(out[..., 1:-1, 1:-1], alpha=4.0).div_(13.0).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.add_(blurred.sub_(inner).mul_((1.0 - factor).float().to(images.device).view(-1, 1, 1, 1)))
    return out.clamp_(0, 255).to(torch.uint8)


def _shift(images: torch.Tensor, offsets: torch.Tensor, dim: int) -> torch.Tensor:
    """Nearest sampling of a whole-pixel move along one axis: out[..., i, ...] (i along dim) =
    images[..., i + offset, ...], 0 (torchvision's fill) where that falls outside. offsets: int64,
    broadcastable to (N, 1, H, W): one per image (translate) or one per row or column (shear)."""
    count, channels, height, width = images.shape
    size = images.shape[dim]
    line = torch.arange(size, device=images.device).view((1, 1, 1, size) if dim == -1 else (1, 1, size, 1))
    source = line + offsets.to(images.device)
    if dim == -2 and source.shape[-1] == 1:  # whole rows move (TranslateY): copied row by row
        source = source.expand(count, 1, height, 1)
        first_rows = torch.arange(count * channels, device=images.device).mul_(height).view(count, channels, 1)
        rows = (first_rows + source.clamp(0, size - 1).view(count, 1, height)).flatten()
        out = images.reshape(-1, width).index_select(0, rows).view_as(images)
        return out.mul_((source >= 0) & (source < size))
    source = source.expand(count, 1, height, width)
    inside = (source >= 0) & (source < size)
    out = torch.gather(images, dim, source.clamp(0, size - 1).expand(count, channels, height, width))
    return out.mul_(inside)


def _shear(images: torch.Tensor, magnitudes: torch.Tensor, name: str) -> torch.Tensor:
    """torchvision shears about the top-left corner, so with nearest sampling ShearX moves row y
    by round(m * (y + 1/2)) whole pixels (ShearY: column x by round(m * (x + 1/2))): a gather
    along one axis instead of a 2-D grid. (torchvision rounds x + m * (y + 1/2) as one float: the
    two differ only where m * (y + 1/2) is within float rounding of a half.)"""
    along = images.shape[-2] if name == "ShearX" else images.shape[-1]
    centres = torch.arange(along, dtype=torch.float64) + 0.5
    offsets = torch.round(magnitudes.view(-1, 1) * centres).long()
    shape = (-1, 1, along, 1) if name == "ShearX" else (-1, 1, 1, along)
    return _shift(images, offsets.view(shape), -1 if name == "ShearX" else -2)


def _rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate image i by degrees[i] about its centre, nearest sampling, 0 outside: each output
    pixel's source computed as torchvision computes its grid (inverse affine matrix in float64,
    coordinates in float32), rounded to a whole pixel and gathered from the uint8 image (no
    float copy of the image and no grid_sample: 1.4x faster, the same pixels on the policy's
    angles)."""
    count, channels, height, width = images.shape
    turns = torch.remainder(degrees, 360.0)
    # torchvision's inverse affine matrix of a turn about the centre (no shear, no move), in
    # float64 as it computes it; rotate() turns the other way than affine()
    angle = -torch.deg2rad(turns)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(count, dtype=torch.float64)
    theta = torch.stack([cos, sin, zero, -sin, cos, zero], 1).view(-1, 2, 3).float().to(images.device)
    x = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=images.device).view(1, 1, width)
    y = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=images.device).view(1, height, 1)
    out = torch.empty_like(images)
    for piece in _chunks(slice(0, count), images.device):
        t = theta[piece, :, :, None, None]  # (n, 2, 3, 1, 1)
        source_x = (x * t[:, 0, 0] + y * t[:, 0, 1]).add_(t[:, 0, 2] + (width - 1) * 0.5).round_()
        source_y = (x * t[:, 1, 0] + y * t[:, 1, 1]).add_(t[:, 1, 2] + (height - 1) * 0.5).round_()
        inside = (source_x >= 0) & (source_x <= width - 1) & (source_y >= 0) & (source_y <= height - 1)
        flat = source_y.clamp_(0, height - 1).mul_(width).add_(source_x.clamp_(0, width - 1)).long()
        part = images[piece]
        pixels = torch.gather(part.reshape(len(part), channels, -1), 2,
                              flat.view(len(part), 1, -1).expand(-1, channels, -1))
        out[piece] = pixels.view_as(part).mul_(inside.unsqueeze(1))
    for quarter in (0, 1, 2, 3):  # torchvision turns by multiples of 90 degrees exactly, without a grid
        exact = (turns == 90.0 * quarter).nonzero().flatten().to(images.device)
        if len(exact) and (quarter % 2 == 0 or height == width):
            out[exact] = torch.rot90(images[exact], k=quarter, dims=(-2, -1))
    return out


def reference_op(name: str, image: torch.Tensor, magnitude: float) -> torch.Tensor:
    """torchvision's own operation on one uint8 image (for tests and benchmarks)."""
    from torchvision.transforms.v2 import TrivialAugmentWide

    policy = TrivialAugmentWide()
    return policy._apply_image_or_video_transform(image, name, magnitude, policy.interpolation, policy._fill)
