"""Load DreamCache: a saved subject cache, re-read when the file changes on disk."""

import folder_paths

from dreamcache_core.cache import load_cache
from dreamcache_core.comfy_folders import CACHE_FOLDER, file_change_token


class DreamCacheLoad:
    CATEGORY = "DreamCache"
    RETURN_TYPES = ("DREAMCACHE",)
    RETURN_NAMES = ("cache",)
    OUTPUT_TOOLTIPS = ("The subject cache read from disk, checked layer by layer.",)
    FUNCTION = "load"
    DESCRIPTION = "Loads a subject cache saved by Save DreamCache."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "cache_name": (folder_paths.get_filename_list(CACHE_FOLDER), {
                "tooltip": "Cache file in models/dreamcache_caches."}),
        }}

    @classmethod
    def IS_CHANGED(cls, cache_name):
        return file_change_token(CACHE_FOLDER, cache_name)

    def load(self, cache_name):
        path = folder_paths.get_full_path_or_raise(CACHE_FOLDER, cache_name)
        return (load_cache(path),)
