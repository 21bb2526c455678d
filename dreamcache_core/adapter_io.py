"""Adapter files: the released ``cross_attention-*.pt`` and the pack's ``.safetensors`` format.

Both use the released key names, for example
``diffusion_model.output_blocks.4.1.transformer_blocks.0.attn_mem.to_q.weight``. The pack's format
adds metadata: ``format`` (``dreamcache.adapter``), ``format_version``, ``fingerprint`` (JSON) and
``sites`` (JSON list of ``{"path", "block_index"}``).
"""

from __future__ import annotations

import json
import logging
import os

import torch

from .adapter import AdapterSite, DreamCacheAdapter
from .errors import DreamCacheFileError, DreamCacheMismatchError
from .layers import Fingerprint, MemoryLayer, memory_layers
from .safetensors_io import read_safetensors, write_safetensors

logger = logging.getLogger(__name__)

ADAPTER_FORMAT = "dreamcache.adapter"
ADAPTER_FORMAT_VERSION = 1

# The stock U-Net layouts: (model_channels, channel_mult, context_dim).
_STOCK_LAYOUTS = {"sd1": (320, (1, 2, 4, 4), 768),
                  "sd2": (320, (1, 2, 4, 4), 1024),
                  "sdxl": (320, (1, 2, 4), 2048)}

ADAPTER_REBUILD_HINT = ("Use an adapter file downloaded from the DreamCache release or converted with "
                        "'python -m dreamcache_core.convert_adapter', or train one for this base model.")


def stock_fingerprint(family: str, prediction: str = "eps") -> Fingerprint:
    """Return the fingerprint of the stock SD 1.x, SD 2.x or SDXL U-Net."""
    if family not in _STOCK_LAYOUTS:
        raise DreamCacheMismatchError(f"Unknown family {family!r}. Use one of {sorted(_STOCK_LAYOUTS)}.")
    model_channels, channel_mult, context_dim = _STOCK_LAYOUTS[family]
    return Fingerprint(family=family, context_dim=context_dim, prediction=prediction,
                       layers=memory_layers(family, model_channels, channel_mult))


def validate_adapter_state(state: dict[str, torch.Tensor], adapter: DreamCacheAdapter, source: str) -> None:
    """Raise DreamCacheMismatchError listing every missing, unexpected or misshaped key."""
    expected = adapter.expected_shapes()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{key} has shape {tuple(state[key].shape)}, expected {expected[key]}"
                       for key in set(expected) & set(state) if tuple(state[key].shape) != expected[key])
    if not (missing or unexpected or misshaped):
        return

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        parts.append(f"misshaped keys ({len(misshaped)}): {'; '.join(misshaped)}")
    raise DreamCacheMismatchError(
        f"Adapter {source!r} does not fit a {adapter.fingerprint.describe()} adapter with "
        f"{len(expected)} tensors: {' | '.join(parts)}. {ADAPTER_REBUILD_HINT}")


def _build_adapter(state: dict[str, torch.Tensor], fingerprint: Fingerprint, sites: tuple[AdapterSite, ...],
                   source: str) -> DreamCacheAdapter:
    adapter = DreamCacheAdapter(fingerprint, sites)
    validate_adapter_state(state, adapter, source)
    for key, tensor in state.items():
        if not torch.is_floating_point(tensor) or not torch.isfinite(tensor).all():
            raise DreamCacheFileError(
                f"Adapter {source!r} has invalid values in {key} (non-float, NaN or inf). {ADAPTER_REBUILD_HINT}")
    adapter.load_released_state_dict({key: tensor.float() for key, tensor in state.items()})
    adapter.eval().requires_grad_(False)
    return adapter


def load_released_adapter(path: str, family: str = "sd2", prediction: str = "eps") -> DreamCacheAdapter:
    """Load a released ``cross_attention-*.pt`` adapter (a plain dict of tensors).

    The file has no fingerprint, so the caller names the base model; the only released adapter
    is for SD 2.1-base (``sd2``, epsilon prediction). The file is read with
    ``torch.load(weights_only=True)``, so a pickle that contains code is rejected, not run.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DreamCacheFileError(f"Adapter file not found: {path!r}.") from None
    except Exception as error:  # torch raises several types for corrupt or unsafe pickles
        # torch's own message suggests retrying with weights_only=False, which would run the
        # pickle's code, so only the error type is passed on.
        raise DreamCacheFileError(
            f"Cannot read adapter {path!r} as a weights-only PyTorch file ({type(error).__name__}): it is corrupt, or "
            "it holds Python objects other than tensors, which this pack never unpickles. Use the released "
            "cross_attention-*.pt file or an adapter .safetensors file.") from None

    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise DreamCacheFileError(
            f"Adapter {path!r} is not a dict of tensors, as a released cross_attention-*.pt is. {ADAPTER_REBUILD_HINT}")

    fingerprint = stock_fingerprint(family, prediction)
    sites = tuple(AdapterSite(layer) for layer in fingerprint.layers)
    return _build_adapter(state, fingerprint, sites, path)


def save_adapter(path: str, adapter: DreamCacheAdapter) -> None:
    """Write ``adapter`` in the pack's ``.safetensors`` format, atomically."""
    metadata = {"format": ADAPTER_FORMAT, "format_version": str(ADAPTER_FORMAT_VERSION),
                "fingerprint": adapter.fingerprint.to_json(),
                "sites": json.dumps([{"path": site.layer.path, "block_index": site.block_index}
                                     for site in adapter.sites])}
    write_safetensors(path, adapter.released_state_dict(), metadata)


def load_adapter_safetensors(path: str) -> DreamCacheAdapter:
    """Load an adapter written by :func:`save_adapter`, checking format, fingerprint, keys and shapes."""
    state, metadata = read_safetensors(path, ADAPTER_REBUILD_HINT)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise DreamCacheFileError(
            f"{path!r} is not a DreamCache adapter (metadata format is {metadata.get('format')!r}, expected "
            f"{ADAPTER_FORMAT!r}). A released .pt adapter must be converted first with "
            "'python -m dreamcache_core.convert_adapter'.")
    version = metadata.get("format_version")
    if version != str(ADAPTER_FORMAT_VERSION):
        raise DreamCacheFileError(
            f"Adapter {path!r} has format_version {version!r}; this pack reads version {ADAPTER_FORMAT_VERSION}. "
            "Update ComfyUI-DreamCache or convert the adapter again.")

    try:
        fingerprint = Fingerprint.from_json(metadata["fingerprint"])
        layers_by_path: dict[str, MemoryLayer] = {layer.path: layer for layer in fingerprint.layers}
        sites = tuple(AdapterSite(layers_by_path[item["path"]], int(item["block_index"]))
                      for item in json.loads(metadata["sites"]))
    except (KeyError, TypeError, ValueError) as error:
        raise DreamCacheFileError(f"Adapter {path!r} has invalid metadata ({error!r}). {ADAPTER_REBUILD_HINT}") from None
    return _build_adapter(state, fingerprint, sites, path)


def load_adapter(path: str, family: str = "sd2", prediction: str = "eps") -> DreamCacheAdapter:
    """Load an adapter by extension: ``.safetensors`` (pack format) or ``.pt``/``.pth`` (released)."""
    extension = os.path.splitext(path)[1].lower()
    if extension == ".safetensors":
        return load_adapter_safetensors(path)
    if extension in (".pt", ".pth", ".bin"):
        logger.info("Loading released DreamCache adapter %s as %s (%s-prediction)", path, family, prediction)
        return load_released_adapter(path, family, prediction)
    raise DreamCacheFileError(
        f"Adapter {path!r} has extension {extension!r}; expected .safetensors or a released .pt file.")
