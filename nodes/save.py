"""Save DreamCache: write a subject cache to ``models/dreamcache_caches``."""

import logging
import os

from dreamcache_core.cache import save_cache
from dreamcache_core.comfy_folders import cache_save_path

logger = logging.getLogger(__name__)


class DreamCacheSave:
    CATEGORY = "DreamCache"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    DESCRIPTION = "Saves a subject cache where Load DreamCache finds it. An existing file is never replaced silently."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "cache": ("DREAMCACHE", {"tooltip": "The subject cache to save."}),
            "name": ("STRING", {"default": "subject",
                                "tooltip": "File name without folders; '.safetensors' is added. If the name is taken "
                                           "a number is appended unless overwrite is on."}),
            "overwrite": ("BOOLEAN", {"default": False,
                                      "tooltip": "Replace a cache of the same name instead of saving a numbered copy."}),
        }}

    def save(self, cache, name, overwrite):
        path = cache_save_path(name, overwrite)
        save_cache(path, cache)
        logger.info("Saved %s to %s", cache.describe(), path)
        return {"ui": {"text": [os.path.basename(path)]}}
