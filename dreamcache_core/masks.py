"""Attention masks for Apply DreamCache."""

from __future__ import annotations

import torch

from .errors import DreamCacheMismatchError


def normalize_mask(mask: torch.Tensor) -> torch.Tensor:
    """Return a 2-D (H x W), 3-D (M x H x W) or 4-D (M x 1 x H x W) mask as M x H x W float in [0, 1]."""
    if mask.ndim == 2:
        mask = mask[None]
    elif mask.ndim == 4:
        if mask.shape[1] != 1:
            raise DreamCacheMismatchError(
                f"A 4-D mask must have shape M x 1 x H x W, got {tuple(mask.shape)}. Convert it to a MASK first.")
        mask = mask[:, 0]
    elif mask.ndim != 3:
        raise DreamCacheMismatchError(
            f"Mask has {mask.ndim} dimensions (shape {tuple(mask.shape)}); expected H x W, M x H x W or M x 1 x H x W.")
    if mask.shape[0] == 0 or mask.shape[1] == 0 or mask.shape[2] == 0:
        raise DreamCacheMismatchError(f"Mask is empty (shape {tuple(mask.shape)}).")
    return mask.float().clamp(0.0, 1.0)
