"""Build DreamCache: one U-Net pass per reference image, recorded as a subject cache."""

from dreamcache_core.builder import REFERENCE_MODES, build_cache
from dreamcache_core.image import FITS


class DreamCacheBuild:
    CATEGORY = "DreamCache"
    RETURN_TYPES = ("DREAMCACHE",)
    RETURN_NAMES = ("cache",)
    OUTPUT_TOOLTIPS = ("The subject cache: memory tokens of every memory layer, about 6 MB per 512 px reference.",)
    FUNCTION = "build"
    DESCRIPTION = ("Runs the frozen U-Net once per reference at sigma = sigmas[1] (timestep 1) and caches the "
                   "inputs of its memory layers. Use a cut-out on white for best results.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint's MODEL. The cache only fits this base model family."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE, used to encode the references."}),
                "image": ("IMAGE", {"tooltip": "Reference photo(s) of the subject. A batch makes one subject from "
                                               "several photos (see reference_mode). Alpha is composited on white."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the small noise added at timestep 1 before the caching pass."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                       "tooltip": "Side in pixels each reference is resized to. The released adapter "
                                                  "was trained at 512."}),
                "fit": (list(FITS), {"default": "stretch",
                                     "tooltip": "stretch: resize to a square as the released code does. crop: take "
                                                "the centred square first, keeping proportions."}),
                "reference_mode": (list(REFERENCE_MODES), {
                    "default": "concat",
                    "tooltip": "concat: one subject, memory tokens of all photos joined. mean: one subject, tokens "
                               "averaged. per_item: photo i is the memory of latent i in the batch."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP, to encode caching_text. Without it the caching "
                                             "pass uses a zero text context."}),
                "caching_text": ("STRING", {"default": "", "multiline": False,
                                            "tooltip": "Text context of the caching pass. Empty, as in training, "
                                                       "is the default."}),
                "label": ("STRING", {"default": "", "tooltip": "Optional subject label stored in the cache file."}),
            },
        }

    def build(self, model, vae, image, seed, resolution, fit, reference_mode, clip=None, caching_text="", label=""):
        cache = build_cache(model, vae, image, clip=clip, caching_text=caching_text, seed=seed,
                            resolution=resolution, fit=fit, reference_mode=reference_mode, label=label)
        return (cache,)
