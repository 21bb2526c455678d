"""Model folders of this pack in ComfyUI: ``models/dreamcache`` (adapters) and ``models/dreamcache_caches``.

Folders added by ``extra_model_paths.yaml`` under the same names are kept and come first, so Save
DreamCache writes to a cache folder configured there (an encrypted volume, say) rather than to
``models/dreamcache_caches``.
"""

from __future__ import annotations

import logging
import os
import re

from .errors import DreamCacheInputError

logger = logging.getLogger(__name__)

ADAPTER_FOLDER = "dreamcache"
CACHE_FOLDER = "dreamcache_caches"
ADAPTER_EXTENSIONS = {".safetensors", ".pt", ".pth"}
CACHE_EXTENSIONS = {".safetensors"}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]*$")

# Leaves room for the numbering suffix, the extension and the temporary-file prefix within the
# 255-byte file name limit of common file systems.
MAX_NAME_LENGTH = 200


def register_folders() -> None:
    """Add the default folders after any configured ones and set the file extensions each lists."""
    import folder_paths

    for name, extensions in ((ADAPTER_FOLDER, ADAPTER_EXTENSIONS), (CACHE_FOLDER, CACHE_EXTENSIONS)):
        default = os.path.join(folder_paths.models_dir, name)
        folder_paths.add_model_folder_path(name, default, is_default=False)
        paths, current = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(current) | extensions)


def file_change_token(folder_name: str, file_name: str) -> str | float:
    """Return a token that changes when the file is rewritten (mtime and size), for a node's IS_CHANGED.

    A missing file returns NaN, which never equals itself, so ComfyUI runs the node and its loader
    reports the missing file.
    """
    import folder_paths

    path = folder_paths.get_full_path(folder_name, file_name)
    if path is None or not os.path.exists(path):
        return float("nan")
    status = os.stat(path)
    return f"{status.st_mtime_ns}:{status.st_size}"


def validate_cache_name(name: str) -> str:
    """Return ``name`` without a ``.safetensors`` suffix, or raise if it could leave the cache folder."""
    stem = name.strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if len(stem) > MAX_NAME_LENGTH:
        raise DreamCacheInputError(
            f"Cache name {stem[:40]!r}... is invalid: it has {len(stem)} characters, the limit is {MAX_NAME_LENGTH}. "
            "Use a shorter name such as 'my_dog'.")
    if not stem or "/" in stem or "\\" in stem or ".." in stem or os.path.isabs(stem) or not _SAFE_NAME.match(stem):
        raise DreamCacheInputError(
            f"Cache name {name!r} is invalid: use letters, digits, spaces, '_', '-' or '.', starting with a letter or "
            "digit, with no path separators and no '..'. Example: 'my_dog'.")
    return stem


def cache_save_path(name: str, overwrite: bool) -> str:
    """Return where Save DreamCache writes ``name``: the first cache folder, numbered when the name is taken.

    The first folder is the first ``dreamcache_caches`` entry of extra_model_paths.yaml, if any.
    """
    import folder_paths

    stem = validate_cache_name(name)
    folder = folder_paths.get_folder_paths(CACHE_FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{stem}.safetensors")
    if overwrite or not os.path.exists(path):
        return path
    for counter in range(1, 100000):
        numbered = os.path.join(folder, f"{stem}_{counter:05d}.safetensors")
        if not os.path.exists(numbered):
            logger.info("DreamCache %s exists, so the cache is saved as %s", path, numbered)
            return numbered
    raise DreamCacheInputError(f"Too many caches named {stem!r}. Pick another name.")
