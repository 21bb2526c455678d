"""Combine DreamCaches: merge saved caches of one base model into one subject."""

from dreamcache_core.cache import combine_caches


class DreamCacheCombine:
    CATEGORY = "DreamCache"
    RETURN_TYPES = ("DREAMCACHE",)
    RETURN_NAMES = ("cache",)
    OUTPUT_TOOLTIPS = ("One subject whose memory holds every input cache's tokens (concat) or their average (mean).",)
    FUNCTION = "combine"
    DESCRIPTION = "Merges caches of the same subject, built on the same base model, into one cache."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "cache_1": ("DREAMCACHE", {"tooltip": "First cache."}),
                "cache_2": ("DREAMCACHE", {"tooltip": "Second cache, built on the same base model."}),
                "mode": (["concat", "mean"], {"default": "concat",
                                              "tooltip": "concat: join memory tokens (more detail, more attention "
                                                         "cost). mean: average them (needs equal resolutions)."}),
            },
            "optional": {
                "cache_3": ("DREAMCACHE", {"tooltip": "Optional third cache."}),
                "cache_4": ("DREAMCACHE", {"tooltip": "Optional fourth cache."}),
                "label": ("STRING", {"default": "", "tooltip": "Subject label of the combined cache."}),
            },
        }

    def combine(self, cache_1, cache_2, mode, cache_3=None, cache_4=None, label=""):
        caches = [cache for cache in (cache_1, cache_2, cache_3, cache_4) if cache is not None]
        return (combine_caches(caches, mode=mode, label=label),)
