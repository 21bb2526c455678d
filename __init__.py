"""ComfyUI entry point of ComfyUI-DreamCache."""

import os
import sys

# The node modules import the library as ``dreamcache_core``. Append (never prepend) the pack
# folder so that ComfyUI's own top-level ``nodes`` module keeps precedence over our ``nodes``.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

from dreamcache_core.comfy_folders import register_folders  # noqa: E402

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

register_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
