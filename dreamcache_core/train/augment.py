"""Target and reference processing for adapter training, seeded per sample.

The reference is the target image itself, re-processed. Its background is painted white through
the mask and it is cropped to the object's bounding box. It is rescaled to a random width in
[0.7, 1] x resolution (aspect kept, height capped at the resolution) and pasted at a random
position on a white square canvas. Last it is flipped with p 0.5, colour-jittered with p 0.1 and
given a white random-erasing box with p 0.4 (2-25 % of the area). Images are ``3 x H x W`` float tensors: pixels in [0, 1] until
:func:`to_model_range` maps them to [-1, 1].

Every random draw comes from a ``torch.Generator`` passed in by the caller, so one seed and one
sample position always give the same tensors, on any rank and after a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
import torch.nn.functional as F


def sample_seed(seed: int, purpose: str, position: int) -> int:
    """Return a 63-bit seed for one draw ``purpose`` of the sample at global ``position``."""
    digest = hashlib.blake2b(f"{seed}:{purpose}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, purpose: str, position: int) -> torch.Generator:
    """Return a CPU generator seeded for ``purpose`` at sample ``position``."""
    return torch.Generator(device="cpu").manual_seed(sample_seed(seed, purpose, position))


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """Return an integer uniform in [low, high] (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


@dataclasses.dataclass(frozen=True)
class ReferenceAugmentation:
    """Settings of the reference processing; the defaults are the released training recipe's."""

    resolution: int = 512
    min_width_fraction: float = 0.7
    flip_probability: float = 0.5
    jitter_probability: float = 0.1
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    erase_probability: float = 0.4
    erase_area: tuple[float, float] = (0.02, 0.25)
    erase_aspect: tuple[float, float] = (0.3, 3.3)


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a 3 x H x W image bilinearly with antialiasing."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    resized = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp(0.0, 1.0)


def process_target(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` and take the centred square (no flip, no crop jitter)."""
    height, width = image.shape[-2:]
    scale = resolution / min(height, width)
    new_height = max(resolution, round(height * scale))
    new_width = max(resolution, round(width * scale))
    resized = resize(image, new_height, new_width)
    top = (new_height - resolution) // 2
    left = (new_width - resolution) // 2
    return resized[:, top:top + resolution, left:left + resolution]


def composite_on_white(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Paint white every pixel where the H x W boolean ``mask`` is False (background)."""
    if mask is None:
        return image
    return torch.where(mask[None], image, torch.ones_like(image))


def crop_to_mask(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Crop to the bounding box of the mask's foreground; the whole image without a mask."""
    if mask is None:
        return image
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    columns = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("the mask has no foreground pixel")
    return image[:, int(rows[0]):int(rows[-1]) + 1, int(columns[0]):int(columns[-1]) + 1]


def rescale_cutout(cutout: torch.Tensor, settings: ReferenceAugmentation, generator: torch.Generator) -> torch.Tensor:
    """Rescale so the width is uniform in [min_width_fraction, 1] x resolution, keeping the aspect ratio.

    When that would make the cut-out taller than the canvas, its height becomes the resolution
    instead (again keeping the aspect ratio).
    """
    resolution = settings.resolution
    height, width = cutout.shape[-2:]
    target_width = uniform(generator, settings.min_width_fraction * resolution, resolution)
    scale = min(target_width / width, resolution / height)
    new_height = min(resolution, max(1, round(height * scale)))
    new_width = min(resolution, max(1, round(width * scale)))
    return resize(cutout, new_height, new_width)


def paste_on_canvas(cutout: torch.Tensor, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """Paste at a uniformly random position on a white ``resolution`` x ``resolution`` canvas."""
    height, width = cutout.shape[-2:]
    top = randint(generator, 0, resolution - height)
    left = randint(generator, 0, resolution - width)
    canvas = torch.ones(3, resolution, resolution, dtype=cutout.dtype)
    canvas[:, top:top + height, left:left + width] = cutout
    return canvas


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """Return the ITU-R 601 luma of a 3 x H x W image as 1 x H x W."""
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]


def shift_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of a 3 x H x W image in [0, 1] by ``shift`` turns (HSV round trip)."""
    red, green, blue = image[0], image[1], image[2]
    maximum, _ = image.max(dim=0)
    minimum, _ = image.min(dim=0)
    chroma = maximum - minimum
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue_if_red_max = ((green - blue) / safe_chroma) % 6.0
    hue_if_green_max = (blue - red) / safe_chroma + 2.0
    hue_if_blue_max = (red - green) / safe_chroma + 4.0
    hue = torch.where(maximum == red, hue_if_red_max, torch.where(maximum == green, hue_if_green_max, hue_if_blue_max))
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue))
    hue = (hue + shift) % 1.0

    # HSV back to RGB with value = maximum and chroma unchanged.
    sector = hue * 6.0
    second = chroma * (1.0 - (sector % 2.0 - 1.0).abs())
    zero = torch.zeros_like(chroma)
    index = sector.floor().long().clamp(0, 5)
    table = torch.stack([torch.stack(channels) for channels in (
        (chroma, second, zero), (second, chroma, zero), (zero, chroma, second),
        (zero, second, chroma), (second, zero, chroma), (chroma, zero, second))])
    rgb = table.gather(0, index[None, None].expand(1, 3, *index.shape))[0]
    return (rgb + (maximum - chroma)[None]).clamp(0.0, 1.0)


def colour_jitter(image: torch.Tensor, settings: ReferenceAugmentation, generator: torch.Generator) -> torch.Tensor:
    """Apply brightness, contrast, saturation and hue changes in a random order, as torchvision's ColorJitter.

    Factors are uniform in [1 - x, 1 + x] for brightness, contrast and saturation, and the hue
    shift is uniform in [-hue, hue]. Each step clamps to [0, 1].
    """
    order = torch.randperm(4, generator=generator).tolist()
    brightness = uniform(generator, 1.0 - settings.brightness, 1.0 + settings.brightness)
    contrast = uniform(generator, 1.0 - settings.contrast, 1.0 + settings.contrast)
    saturation = uniform(generator, 1.0 - settings.saturation, 1.0 + settings.saturation)
    hue = uniform(generator, -settings.hue, settings.hue)
    for step in order:
        if step == 0:
            image = (image * brightness).clamp(0.0, 1.0)
        elif step == 1:
            mean = grayscale(image).mean()
            image = (mean + contrast * (image - mean)).clamp(0.0, 1.0)
        elif step == 2:
            grey = grayscale(image)
            image = (grey + saturation * (image - grey)).clamp(0.0, 1.0)
        else:
            image = shift_hue(image, hue)
    return image


def random_erase(image: torch.Tensor, settings: ReferenceAugmentation, generator: torch.Generator,
                 fill: float) -> torch.Tensor:
    """Fill one random box of 2-25 % of the area (aspect ratio log-uniform in erase_aspect) with ``fill``.

    As in torchvision's RandomErasing, up to 10 boxes are drawn and the first that fits is used.
    """
    height, width = image.shape[-2:]
    area = height * width
    log_low, log_high = math.log(settings.erase_aspect[0]), math.log(settings.erase_aspect[1])
    for _ in range(10):
        erase_area = area * uniform(generator, *settings.erase_area)
        aspect = math.exp(uniform(generator, log_low, log_high))
        box_height = round(math.sqrt(erase_area * aspect))
        box_width = round(math.sqrt(erase_area / aspect))
        if 0 < box_height < height and 0 < box_width < width:
            top = randint(generator, 0, height - box_height)
            left = randint(generator, 0, width - box_width)
            erased = image.clone()
            erased[:, top:top + box_height, left:left + box_width] = fill
            return erased
    return image


def to_model_range(image: torch.Tensor) -> torch.Tensor:
    """Map pixels from [0, 1] to [-1, 1]."""
    return image * 2.0 - 1.0


def process_reference(image: torch.Tensor, mask: torch.Tensor | None, settings: ReferenceAugmentation,
                      generator: torch.Generator) -> torch.Tensor:
    """Return the augmented reference of a 3 x H x W image in [0, 1] as 3 x R x R in [-1, 1].

    ``mask`` is an H x W boolean foreground mask, or None to use the whole image as the object.
    NOTE: the released code applied colour jitter after mapping to [-1, 1], so its clamps to
    [0, 1] flattened every darker-than-mid-grey pixel of the jittered references. Here the
    jitter runs on [0, 1] pixels, before the mapping.
    """
    cutout = crop_to_mask(composite_on_white(image, mask), mask)
    cutout = rescale_cutout(cutout, settings, generator)
    reference = paste_on_canvas(cutout, settings.resolution, generator)
    if uniform(generator) < settings.flip_probability:
        reference = reference.flip(-1)
    if uniform(generator) < settings.jitter_probability:
        reference = colour_jitter(reference, settings, generator)
    reference = to_model_range(reference)
    if uniform(generator) < settings.erase_probability:
        reference = random_erase(reference, settings, generator, fill=1.0)
    return reference
