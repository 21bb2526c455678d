"""Subject caches and their ``.safetensors`` file format.

A cache holds, per memory layer, the memory tokens M as an ``items x tokens x channels`` fp16 CPU
tensor stored under the layer's module path (``middle_block.1``, ``output_blocks.4.1``, ...).
``items`` is 1 for one subject (however many reference photos it was built from) and B for a
cache that gives latent i the memory of item i. The metadata records how it was made.
"""

from __future__ import annotations

import dataclasses
import datetime
import json

import torch

from .errors import DreamCacheFileError, DreamCacheMismatchError
from .layers import Fingerprint
from .safetensors_io import read_safetensors, write_safetensors

CACHE_FORMAT = "dreamcache.cache"
CACHE_FORMAT_VERSION = 1
CACHE_DTYPE = torch.float16

CACHE_REBUILD_HINT = "Build the cache again with the Build DreamCache node and save it."

# Metadata keys other than format, format_version, fingerprint and layers; all are strings.
INFO_KEYS = ("reference_count", "reference_resolution", "reference_mode", "sigma", "caching_prompt",
             "seed", "created", "label")


@dataclasses.dataclass(frozen=True)
class SubjectCache:
    """Memory tokens for one subject (or one per batch item) and the facts of how they were built.

    ``memory`` maps each memory layer's module path to an ``items x tokens x channels`` tensor.
    """

    fingerprint: Fingerprint
    memory: dict[str, torch.Tensor]
    info: dict[str, str]

    @property
    def items(self) -> int:
        return next(iter(self.memory.values())).shape[0]

    def tokens(self, path: str) -> int:
        return self.memory[path].shape[1]

    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.memory.values())

    def describe(self) -> str:
        label = self.info.get("label") or "unlabelled"
        return (f"DreamCache '{label}': {self.fingerprint.family}, {self.items} item(s), "
                f"{self.info.get('reference_count', '?')} reference(s) at {self.info.get('reference_resolution', '?')}, "
                f"tokens {[self.tokens(layer.path) for layer in self.fingerprint.layers]}, "
                f"{self.nbytes() / 1e6:.2f} MB")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def validate_cache(cache: SubjectCache, source: str) -> None:
    """Raise DreamCacheFileError unless every layer is present with items x tokens x channels finite floats."""
    expected_paths = [layer.path for layer in cache.fingerprint.layers]
    missing = [path for path in expected_paths if path not in cache.memory]
    unexpected = [path for path in cache.memory if path not in expected_paths]
    if missing or unexpected:
        raise DreamCacheFileError(
            f"Cache {source!r} has missing layers {missing} and unexpected layers {unexpected} for its "
            f"fingerprint {cache.fingerprint.describe()}. {CACHE_REBUILD_HINT}")

    items = None
    for layer in cache.fingerprint.layers:
        tensor = cache.memory[layer.path]
        if tensor.ndim != 3 or tensor.shape[2] != layer.channels or tensor.shape[1] == 0:
            raise DreamCacheFileError(
                f"Cache {source!r} layer {layer.path} has shape {tuple(tensor.shape)}; expected "
                f"(items, tokens, {layer.channels}). {CACHE_REBUILD_HINT}")
        if items is None:
            items = tensor.shape[0]
        if tensor.shape[0] != items or items == 0:
            raise DreamCacheFileError(
                f"Cache {source!r} layer {layer.path} has {tensor.shape[0]} items but the first layer has {items}. "
                f"{CACHE_REBUILD_HINT}")
        if not torch.is_floating_point(tensor) or not torch.isfinite(tensor).all():
            raise DreamCacheFileError(
                f"Cache {source!r} layer {layer.path} contains non-finite or non-float values. {CACHE_REBUILD_HINT}")


def save_cache(path: str, cache: SubjectCache) -> None:
    """Write ``cache`` as fp16 ``.safetensors`` with its metadata, atomically."""
    validate_cache(cache, path)
    metadata = {"format": CACHE_FORMAT, "format_version": str(CACHE_FORMAT_VERSION),
                "fingerprint": cache.fingerprint.to_json(),
                "layers": json.dumps([{"path": layer.path, "channels": layer.channels,
                                       "tokens": cache.tokens(layer.path)} for layer in cache.fingerprint.layers])}
    for key in INFO_KEYS:
        if key in cache.info:
            metadata[key] = str(cache.info[key])
    tensors = {path_key: tensor.to(CACHE_DTYPE) for path_key, tensor in cache.memory.items()}
    write_safetensors(path, tensors, metadata)


def load_cache(path: str) -> SubjectCache:
    """Read and fully validate a cache file written by :func:`save_cache`."""
    tensors, metadata = read_safetensors(path, CACHE_REBUILD_HINT)
    if metadata.get("format") != CACHE_FORMAT:
        raise DreamCacheFileError(
            f"{path!r} is not a DreamCache cache (metadata format is {metadata.get('format')!r}, expected "
            f"{CACHE_FORMAT!r}). {CACHE_REBUILD_HINT}")
    version = metadata.get("format_version")
    if version != str(CACHE_FORMAT_VERSION):
        raise DreamCacheFileError(
            f"Cache {path!r} has format_version {version!r}; this pack reads version {CACHE_FORMAT_VERSION}. "
            f"Update ComfyUI-DreamCache or rebuild the cache.")

    try:
        fingerprint = Fingerprint.from_json(metadata["fingerprint"])
        layer_records = json.loads(metadata["layers"])
        declared_tokens = {str(item["path"]): int(item["tokens"]) for item in layer_records}
    except (KeyError, TypeError, ValueError) as error:
        raise DreamCacheFileError(f"Cache {path!r} has invalid metadata ({error!r}). {CACHE_REBUILD_HINT}") from None

    cache = SubjectCache(fingerprint=fingerprint, memory=tensors,
                         info={key: metadata[key] for key in INFO_KEYS if key in metadata})
    validate_cache(cache, path)
    for layer_path, tokens in declared_tokens.items():
        if layer_path in tensors and tensors[layer_path].shape[1] != tokens:
            raise DreamCacheFileError(
                f"Cache {path!r} layer {layer_path} has {tensors[layer_path].shape[1]} tokens but its metadata "
                f"declares {tokens}. {CACHE_REBUILD_HINT}")
    return cache


def combine_caches(caches: list[SubjectCache], mode: str = "concat", label: str = "") -> SubjectCache:
    """Merge single-item caches of one base model into one subject.

    ``concat`` joins the memory tokens along the token axis; ``mean`` averages them and needs
    equal token counts (references of one resolution).
    """
    if not caches:
        raise DreamCacheMismatchError("combine_caches needs at least one cache.")
    first = caches[0]
    for index, cache in enumerate(caches[1:], start=1):
        if cache.fingerprint != first.fingerprint:
            raise DreamCacheMismatchError(
                f"Cache {index} was made for {cache.fingerprint.describe()} but cache 0 for "
                f"{first.fingerprint.describe()}. Combine only caches built on the same base model.")
    for index, cache in enumerate(caches):
        if cache.items != 1:
            raise DreamCacheMismatchError(
                f"Cache {index} has {cache.items} per-item subjects; only single-subject caches can be combined.")

    memory = {}
    for layer in first.fingerprint.layers:
        stacked = [cache.memory[layer.path] for cache in caches]
        if mode == "concat":
            memory[layer.path] = torch.cat(stacked, dim=1)
        elif mode == "mean":
            counts = sorted({tensor.shape[1] for tensor in stacked})
            if len(counts) != 1:
                raise DreamCacheMismatchError(
                    f"Mode 'mean' needs equal token counts, but layer {layer.path} has {counts}. Build every "
                    "reference at one resolution, or use mode 'concat'.")
            memory[layer.path] = torch.stack([tensor.float() for tensor in stacked]).mean(dim=0).to(CACHE_DTYPE)
        else:
            raise DreamCacheMismatchError(f"Unknown combine mode {mode!r}; use 'concat' or 'mean'.")

    references = sum(int(cache.info.get("reference_count", "1")) for cache in caches)
    info = dict(first.info)
    info.update({"reference_count": str(references), "reference_mode": mode, "created": now_iso(),
                 "label": label or first.info.get("label", "")})
    return SubjectCache(fingerprint=first.fingerprint, memory=memory, info=info)
