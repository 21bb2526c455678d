"""Checked reading and atomic writing of ``.safetensors`` files."""

from __future__ import annotations

import json
import os
import struct
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .errors import DreamCacheFileError

# A header larger than this is not a DreamCache file; safetensors itself caps it at 100 MB.
MAX_HEADER_BYTES = 100_000_000


def read_safetensors(path: str, rebuild_hint: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a ``.safetensors`` file, with errors that name the file.

    ``rebuild_hint`` is appended to each error message as the fix.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise DreamCacheFileError(f"File not found: {path!r}. {rebuild_hint}") from None
    except OSError as error:
        raise DreamCacheFileError(f"Cannot read {path!r}: {error}. {rebuild_hint}") from error

    if len(data) < 8:
        raise DreamCacheFileError(
            f"{path!r} is empty or truncated ({len(data)} bytes); a .safetensors file starts with an "
            f"8-byte header length. {rebuild_hint}")

    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > MAX_HEADER_BYTES or 8 + header_length > len(data):
        raise DreamCacheFileError(
            f"{path!r} is not a valid .safetensors file or is truncated: its header claims {header_length} "
            f"bytes but the file has {len(data)} bytes. {rebuild_hint}")

    try:
        header = json.loads(data[8:8 + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DreamCacheFileError(f"{path!r} has a corrupt .safetensors header ({error}). {rebuild_hint}") from None
    if not isinstance(header, dict):
        raise DreamCacheFileError(f"{path!r} has a corrupt .safetensors header (not a JSON object). {rebuild_hint}")

    try:
        tensors = load_safetensors_bytes(data)
    except SafetensorError as error:
        raise DreamCacheFileError(f"{path!r} is corrupt or truncated: {error}. {rebuild_hint}") from None

    metadata = header.get("__metadata__") or {}
    return tensors, {str(key): str(value) for key, value in metadata.items()}


def write_atomic(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and an atomic rename.

    A crash or a full disk leaves either the old file or the new one, never a partial file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Serialize contiguous CPU copies of ``tensors`` with ``metadata`` and write them atomically."""
    prepared = {key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}
    write_atomic(path, save_safetensors_bytes(prepared, metadata=metadata))
