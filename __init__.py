"""ComfyUI entry point of ComfyUI-DreamCache."""

import os
import sys

# The node modules import the library as ``dreamcache_core``. Append (never prepend) the pack
# folder so that ComfyUI's own top-level ``nodes`` module keeps precedence over our ``nodes``.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

try:
    import folder_paths  # noqa: F401
except ModuleNotFoundError as error:
    # pytest (8 and later) imports this file when it collects the repository root as a package,
    # also without ComfyUI. Only ComfyUI provides folder_paths, so outside it there are no nodes.
    if error.name != "folder_paths":
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from dreamcache_core.comfy_folders import register_folders

    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    register_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
