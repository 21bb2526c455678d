"""ComfyUI node classes of ComfyUI-DreamCache."""

from .adapter_loader import DreamCacheAdapterLoader
from .apply import DreamCacheApply
from .build import DreamCacheBuild
from .combine import DreamCacheCombine
from .load import DreamCacheLoad
from .save import DreamCacheSave

# Node ids are stored in saved workflows; never rename them.
NODE_CLASS_MAPPINGS = {
    "DreamCacheAdapterLoader": DreamCacheAdapterLoader,
    "DreamCacheBuild": DreamCacheBuild,
    "DreamCacheSave": DreamCacheSave,
    "DreamCacheLoad": DreamCacheLoad,
    "DreamCacheApply": DreamCacheApply,
    "DreamCacheCombine": DreamCacheCombine,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamCacheAdapterLoader": "Load DreamCache Adapter",
    "DreamCacheBuild": "Build DreamCache",
    "DreamCacheSave": "Save DreamCache",
    "DreamCacheLoad": "Load DreamCache",
    "DreamCacheApply": "Apply DreamCache",
    "DreamCacheCombine": "Combine DreamCaches",
}
