"""Reference image preparation: any mode and size in, ``B x H x W x 3`` RGB in [0, 1] out.

The released method composites cut-outs on white and resizes every reference to 512 x 512 with
bilinear filtering, stretching it when it is not square (``fit="stretch"``). ``fit="crop"`` takes
the centred square instead, which keeps the subject's proportions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import DreamCacheMismatchError

FITS = ("stretch", "crop")


def pil_to_image_tensor(image: Image.Image) -> torch.Tensor:
    """Convert a PIL image of any mode (1, L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 1 x H x W x 3.

    Transparent pixels are composited on white. 16-bit and 32-bit greyscale are scaled by their
    nominal range (65535 for I;16, 65535 for I, 1.0 for F).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32) / 65535.0
        grey = torch.from_numpy(np.clip(array, 0.0, 1.0))
        return grey[None, :, :, None].expand(1, -1, -1, 3).contiguous()
    if image.mode == "F":
        grey = torch.from_numpy(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0))
        return grey[None, :, :, None].expand(1, -1, -1, 3).contiguous()

    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    converted = image.convert("RGBA" if has_alpha else "RGB")
    array = torch.from_numpy(np.asarray(converted, dtype=np.float32) / 255.0)
    return to_rgb_on_white(array[None])


def to_rgb_on_white(image: torch.Tensor) -> torch.Tensor:
    """Return a B x H x W x 3 copy of a B x H x W x C image (C = 1, 2, 3 or 4), alpha on white."""
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4:
        raise DreamCacheMismatchError(
            f"Reference image has shape {tuple(image.shape)}; expected a ComfyUI IMAGE of shape B x H x W x C.")

    channels = image.shape[-1]
    image = image.float()
    if channels == 1:
        return image.expand(-1, -1, -1, 3).clone()
    if channels == 2:
        grey, alpha = image[..., :1], image[..., 1:2]
        return (grey * alpha + (1.0 - alpha)).expand(-1, -1, -1, 3).clone()
    if channels == 3:
        return image.clone()
    if channels == 4:
        rgb, alpha = image[..., :3], image[..., 3:4]
        return rgb * alpha + (1.0 - alpha)
    raise DreamCacheMismatchError(
        f"Reference image has {channels} channels; expected 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA).")


def prepare_reference(image: torch.Tensor, resolution: int = 512, fit: str = "stretch") -> torch.Tensor:
    """Composite on white and resize a B x H x W x C IMAGE to B x resolution x resolution x 3.

    Resizing is bilinear with antialiasing, so very small and very large photos both work.
    """
    if resolution % 64 != 0 or resolution < 64:
        raise DreamCacheMismatchError(
            f"Reference resolution {resolution} is invalid; use a multiple of 64 such as 512.")
    if fit not in FITS:
        raise DreamCacheMismatchError(f"Unknown fit {fit!r}; use one of {FITS}.")

    rgb = to_rgb_on_white(image).clamp(0.0, 1.0)
    height, width = rgb.shape[1], rgb.shape[2]
    if height == 0 or width == 0:
        raise DreamCacheMismatchError(f"Reference image is empty ({height} x {width} pixels).")

    if fit == "crop" and height != width:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        rgb = rgb[:, top:top + side, left:left + side, :]

    channels_first = rgb.permute(0, 3, 1, 2)
    if channels_first.shape[-2:] != (resolution, resolution):
        channels_first = F.interpolate(channels_first, size=(resolution, resolution), mode="bilinear",
                                       align_corners=False, antialias=True)
    return channels_first.permute(0, 2, 3, 1).clamp(0.0, 1.0).contiguous()
