"""Apply DreamCache: a MODEL whose memory layers attend to a subject cache."""

from dreamcache_core.comfy_patch import apply_dreamcache
from dreamcache_core.masks import normalize_mask


class DreamCacheApply:
    CATEGORY = "DreamCache"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A patched copy of the model. The input MODEL is unchanged and still samples the base model.",)
    FUNCTION = "apply"
    DESCRIPTION = "Personalizes the model with a subject cache. Chain several to compose subjects."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to personalize; its weights are never changed."}),
                "adapter": ("DREAMCACHE_ADAPTER", {"tooltip": "Adapter trained for this base model."}),
                "cache": ("DREAMCACHE", {"tooltip": "Subject cache built on this base model."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01,
                                       "tooltip": "0 gives the unpatched model exactly, 1 the released DreamCache "
                                                  "block. Values between blend the two residuals."}),
                "image_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 20.0, "step": 0.05,
                                          "tooltip": "Image guidance s_I. 1 is ordinary CFG with memory in both "
                                                     "branches. Other values add a memory-free negative prediction "
                                                     "(three predictions per step) and sample eps_u + cfg (eps_c - "
                                                     "eps_img) + s_I (eps_img - eps_u). Ignored by DualCFGGuider."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "Fraction of the sampling schedule where memory starts acting."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Fraction of the sampling schedule where memory stops acting."}),
            },
            "optional": {
                "attn_mask": ("MASK", {"tooltip": "Where the subject may appear: 1 = memory acts, 0 = the unpatched "
                                                  "model. Any resolution; one mask or one per latent."}),
            },
        }

    def apply(self, model, adapter, cache, strength, image_scale, start_percent, end_percent, attn_mask=None):
        mask = normalize_mask(attn_mask) if attn_mask is not None else None
        patched = apply_dreamcache(model, adapter, cache, strength=strength, start_percent=start_percent,
                                   end_percent=end_percent, mask=mask, image_scale=image_scale)
        return (patched,)
