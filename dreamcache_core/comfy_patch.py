"""Glue between the DreamCache patch and ComfyUI's ModelPatcher and sampler (ComfyUI 0.3.64).

Imports ``comfy`` lazily so the rest of the package works without ComfyUI.
"""

from __future__ import annotations

import logging

import torch

from .adapter import DreamCacheAdapter
from .cache import SubjectCache
from .errors import DreamCacheMismatchError
from .layers import Fingerprint, check_fingerprint, family_from_config, memory_layers
from .patch import MEMORY_CHUNKS_KEY, RUN_STATE_KEY, DreamCachePatch, RunState, Subject

logger = logging.getLogger(__name__)

WRAPPER_KEY = "dreamcache"

# Guider_DualCFG stacks chunks as [negative, middle, positive]. Memory goes to middle and positive.
DUAL_CFG_MEMORY_CHUNKS = frozenset({1, 2})

# Image guidance stacks [cond, uncond, uncond without memory]. Memory goes to the first two.
IMAGE_GUIDANCE_MEMORY_CHUNKS = frozenset({0, 1})


def model_fingerprint(model_patcher) -> Fingerprint:
    """Return the fingerprint of the U-Net inside a ComfyUI MODEL."""
    import comfy.model_base

    base_model = model_patcher.model
    config = base_model.model_config.unet_config
    context_dim = config.get("context_dim")
    if context_dim is None:
        raise DreamCacheMismatchError(
            f"Model {type(base_model).__name__} has no text cross-attention U-Net. DreamCache supports "
            "SD 1.x, SD 2.x and SDXL checkpoints.")
    family = family_from_config(int(context_dim), config.get("adm_in_channels"))

    model_type = base_model.model_type
    if model_type == comfy.model_base.ModelType.EPS:
        prediction = "eps"
    elif model_type == comfy.model_base.ModelType.V_PREDICTION:
        prediction = "v"
    else:
        prediction = str(model_type.name).lower()

    layers = memory_layers(family, int(config["model_channels"]), tuple(config["channel_mult"]))
    return Fingerprint(family=family, context_dim=int(context_dim), prediction=prediction, layers=layers)


def check_adapter_fits(model_patcher, adapter: DreamCacheAdapter, source: str = "adapter") -> None:
    check_fingerprint(model_fingerprint(model_patcher), adapter.fingerprint, f"DreamCache adapter {source}",
                      "Load the adapter trained for this base model.")


def check_cache_fits(model_patcher, cache: SubjectCache, source: str = "cache") -> None:
    check_fingerprint(model_fingerprint(model_patcher), cache.fingerprint, f"DreamCache {source}",
                      "Build the cache again with Build DreamCache on this model.")


def patches_in(model_options: dict) -> dict[int, DreamCachePatch]:
    """Return the DreamCache patches registered in ``model_options``, keyed by object id."""
    patches = model_options.get("transformer_options", {}).get("patches", {})
    owners = [getattr(patch, "__self__", None) for patch in patches.get("middle_patch", [])]
    return {id(owner): owner for owner in owners if isinstance(owner, DreamCachePatch)}


def find_patch(model_patcher) -> DreamCachePatch | None:
    """Return the DreamCache patch already on ``model_patcher``, if any."""
    return next(iter(patches_in(model_patcher.model_options).values()), None)


def _replace_patch(model_patcher, old: DreamCachePatch | None, new: DreamCachePatch) -> None:
    patches = model_patcher.model_options.setdefault("transformer_options", {}).setdefault("patches", {})
    for name, method in (("attn1_output_patch", new.attn1_output), ("middle_patch", new.middle)):
        kept = [patch for patch in patches.get(name, []) if old is None or getattr(patch, "__self__", None) is not old]
        patches[name] = kept + [method]


def apply_dreamcache(model_patcher, adapter: DreamCacheAdapter, cache: SubjectCache, strength: float = 1.0,
                     start_percent: float = 0.0, end_percent: float = 1.0, mask: torch.Tensor | None = None,
                     image_scale: float = 1.0):
    """Return a clone of ``model_patcher`` whose memory blocks attend to ``cache``.

    Checkpoint weights are not touched; the input MODEL keeps sampling the base model. A second
    call on the returned MODEL adds another subject to the same patch. Its ``image_scale``
    replaces the earlier one, because image guidance applies to the whole model.
    """
    check_adapter_fits(model_patcher, adapter)
    check_cache_fits(model_patcher, cache, source=f"cache '{cache.info.get('label') or 'unlabelled'}'")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise DreamCacheMismatchError(
            f"start_percent {start_percent} and end_percent {end_percent} are invalid. "
            "Use 0 <= start_percent <= end_percent <= 1.")

    subject = Subject(adapter=adapter, cache=cache, strength=float(strength), start_percent=float(start_percent),
                      end_percent=float(end_percent), mask=mask)
    patched = model_patcher.clone()
    old = find_patch(patched)
    new = old.with_subject(subject) if old is not None else DreamCachePatch((subject,))
    _replace_patch(patched, old, new)

    import comfy.patcher_extension

    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    set_image_guidance(patched, image_scale)
    logger.info("DreamCache applied: %s, strength %.3f, percent %.2f-%.2f, image_scale %.3f%s", cache.describe(),
                strength, start_percent, end_percent, image_scale, ", masked" if mask is not None else "")
    return patched


class ImageGuidance:
    """``sampler_calc_cond_batch_function`` that adds the memory-free negative prediction.

    The method samples with three predictions per step, eps_u (negative prompt, no memory),
    eps_img (negative prompt, memory) and eps_c (prompt, memory), combined as
    eps_u + s_T (eps_c - eps_img) + s_I (eps_img - eps_u). ComfyUI's CFG computes
    U + s_T (C - U), so returning C = eps_c + d and U = eps_img + d with
    d = (1 - s_I) (eps_u - eps_img) gives exactly that combination for any s_T. The three
    predictions go through one ``calc_cond_batch`` call, which batches them where memory allows.
    The combination is linear with weights summing to 1, so it holds for denoised outputs too.
    """

    def __init__(self, image_scale: float):
        self.image_scale = float(image_scale)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args: dict) -> list:
        import comfy.samplers

        cond, uncond = args["conds"]
        model_options = args["model_options"]
        if uncond is None:
            return comfy.samplers.calc_cond_batch(args["model"], [cond, None], args["input"], args["sigma"],
                                                  model_options)

        options = dict(model_options)
        options["transformer_options"] = dict(model_options.get("transformer_options", {}))
        options["transformer_options"][MEMORY_CHUNKS_KEY] = IMAGE_GUIDANCE_MEMORY_CHUNKS
        eps_c, eps_img, eps_u = comfy.samplers.calc_cond_batch(args["model"], [cond, uncond, uncond], args["input"],
                                                               args["sigma"], options)
        shift = (1.0 - self.image_scale) * (eps_u - eps_img)
        return [eps_c + shift, eps_img + shift]


def set_image_guidance(model_patcher, image_scale: float) -> None:
    """Install (image_scale != 1) or remove (image_scale == 1) DreamCache image guidance on ``model_patcher``.

    Another pack's ``sampler_calc_cond_batch_function`` is never replaced.
    """
    current = model_patcher.model_options.get("sampler_calc_cond_batch_function")
    if current is not None and not isinstance(current, ImageGuidance):
        if image_scale != 1.0:
            raise DreamCacheMismatchError(
                f"image_scale {image_scale} needs ComfyUI's sampler_calc_cond_batch_function, which another node "
                "already set on this model. Use image_scale 1 with a DualCFGGuider instead (cfg_conds = text "
                "scale, cfg_cond2_negative = image scale).")
        return

    if image_scale == 1.0:
        model_patcher.model_options.pop("sampler_calc_cond_batch_function", None)
        if isinstance(current, ImageGuidance):
            model_patcher.model_options.pop("disable_cfg1_optimization", None)
        return

    model_patcher.model_options["sampler_calc_cond_batch_function"] = ImageGuidance(image_scale)
    # With cfg 1 ComfyUI would drop the negative prompt, which image guidance needs.
    model_patcher.model_options["disable_cfg1_optimization"] = True


def compute_dtype(model_patcher) -> torch.dtype:
    """Return the dtype the U-Net's activations have (ComfyUI's manual cast dtype, else the weights')."""
    base_model = model_patcher.model
    return base_model.manual_cast_dtype or base_model.get_dtype()


def sigma_windows(patch: DreamCachePatch, model_sampling) -> tuple:
    windows = []
    for subject in patch.subjects:
        if subject.start_percent <= 0.0 and subject.end_percent >= 1.0:
            windows.append(None)
        else:
            windows.append((float(model_sampling.percent_to_sigma(subject.start_percent)),
                            float(model_sampling.percent_to_sigma(subject.end_percent))))
    return tuple(windows)


def prepare_run_state(model_patcher, model_options: dict) -> RunState | None:
    """Prepare every DreamCache patch in ``model_options`` for one sampling run on the model's device."""
    owners = patches_in(model_options)
    if not owners:
        return None
    device = model_patcher.load_device
    dtype = compute_dtype(model_patcher)
    model_sampling = model_patcher.get_model_object("model_sampling")
    runs = {key: owner.prepare(device, dtype, sigma_windows(owner, model_sampling)) for key, owner in owners.items()}
    return RunState(runs)


def outer_sample_wrapper(executor, *args, **kwargs):
    """Prepare cache and adapter tensors once for the whole sampling run, and drop them afterwards."""
    guider = executor.class_obj
    transformer_options = guider.model_options.setdefault("transformer_options", {})
    state = prepare_run_state(guider.model_patcher, guider.model_options)
    if state is None:
        return executor(*args, **kwargs)

    transformer_options[RUN_STATE_KEY] = state
    if type(guider).__name__ == "Guider_DualCFG":
        transformer_options[MEMORY_CHUNKS_KEY] = DUAL_CFG_MEMORY_CHUNKS
        if isinstance(guider.model_options.get("sampler_calc_cond_batch_function"), ImageGuidance):
            logger.warning("DreamCache: image_scale on Apply DreamCache is ignored under DualCFGGuider, "
                           "whose cfg_cond2_negative is the image scale.")
    try:
        return executor(*args, **kwargs)
    finally:
        transformer_options.pop(RUN_STATE_KEY, None)
        transformer_options.pop(MEMORY_CHUNKS_KEY, None)
