"""Build a subject cache with a ComfyUI MODEL and VAE (ComfyUI 0.3.64).

For each reference: VAE-encode, ``process_latent_in``, add noise at sigma = sigmas[1] (DDPM
timestep t = 1) from a seeded generator, run the frozen U-Net once with no patches and record the
raw input of every memory layer (before GroupNorm and proj_in). The pass stops right after the last
memory layer, so the rest of the decoder is never run.
"""

from __future__ import annotations

import logging

import torch

from .cache import CACHE_DTYPE, SubjectCache, now_iso
from .comfy_patch import model_fingerprint
from .errors import DreamCacheMismatchError
from .image import prepare_reference

logger = logging.getLogger(__name__)

REFERENCE_MODES = ("concat", "mean", "per_item")


class _CaptureComplete(Exception):
    """Raised by the last memory layer's hook to end the caching pass early."""


def caching_sigma(model_sampling) -> torch.Tensor:
    """Return sigma at DDPM timestep 1: ``model_sampling.sigmas[1]`` (0.0413 for SD's schedule)."""
    return model_sampling.sigmas[1].detach().float().cpu()


def capture_memory(diffusion_model, layer_paths: list[str], run) -> dict[str, torch.Tensor]:
    """Run ``run()`` and return each layer's first input as B x N x C, stopping after the last layer.

    ``layer_paths`` are module paths under ``diffusion_model`` in traversal order.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(path: str, is_last: bool):
        def hook(module, args):
            activation = args[0]
            captured[path] = activation.movedim(1, 3).flatten(1, 2).detach()
            if is_last:
                raise _CaptureComplete()
        return hook

    try:
        for index, path in enumerate(layer_paths):
            module = diffusion_model.get_submodule(path)
            handles.append(module.register_forward_pre_hook(make_hook(path, index == len(layer_paths) - 1)))
        try:
            run()
        except _CaptureComplete:
            pass
    finally:
        for handle in handles:
            handle.remove()

    missing = [path for path in layer_paths if path not in captured]
    if missing:
        raise DreamCacheMismatchError(f"The caching pass never reached memory layers {missing}; is this a stock U-Net?")
    return captured


def encode_caching_context(clip, text: str, context_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the caching pass's text context and pooled output: ``clip`` on ``text``, or zeros without a CLIP."""
    if clip is None:
        return torch.zeros(1, 77, context_dim), None
    tokens = clip.tokenize(text)
    context, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return context, pooled


def extra_conditioning(base_model, family: str, pooled: torch.Tensor | None, resolution: int) -> dict:
    """Return the ``y`` vector SDXL needs (pooled text and size embeddings); nothing for SD 1.x/2.x."""
    if family != "sdxl":
        return {}
    if pooled is None:
        pooled = torch.zeros(1, 1280)
    adm = base_model.encode_adm(pooled_output=pooled, width=resolution, height=resolution, crop_w=0, crop_h=0,
                                target_width=resolution, target_height=resolution)
    return {"y": adm}


def build_cache(model_patcher, vae, images: torch.Tensor, clip=None, caching_text: str = "", seed: int = 0,
                resolution: int = 512, fit: str = "stretch", reference_mode: str = "concat",
                label: str = "") -> SubjectCache:
    """Build a :class:`SubjectCache` from a ComfyUI IMAGE batch (each image is one reference)."""
    import comfy.model_management
    import comfy.utils

    if reference_mode not in REFERENCE_MODES:
        raise DreamCacheMismatchError(f"Unknown reference_mode {reference_mode!r}; use one of {REFERENCE_MODES}.")

    fingerprint = model_fingerprint(model_patcher)
    pixels = prepare_reference(images, resolution, fit)
    count = pixels.shape[0]
    progress = comfy.utils.ProgressBar(2 * count)
    logger.info("Building DreamCache from %d reference(s) at %dx%d", count, resolution, resolution)

    base_model = model_patcher.model
    latents = []
    for index in range(count):
        latent = vae.encode(pixels[index:index + 1])
        latents.append(base_model.process_latent_in(latent.float()))
        progress.update(1)

    context, pooled = encode_caching_context(clip, caching_text, fingerprint.context_dim)
    if context.shape[-1] != fingerprint.context_dim:
        raise DreamCacheMismatchError(
            f"The CLIP gives a {context.shape[-1]}-wide text context but the model expects {fingerprint.context_dim}. "
            "Connect the CLIP of the same checkpoint as the MODEL.")

    comfy.model_management.load_models_gpu([model_patcher])
    device = model_patcher.load_device
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    sigma = caching_sigma(model_patcher.get_model_object("model_sampling"))
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    layer_paths = [layer.path for layer in fingerprint.layers]
    extra = {key: value.to(device=device, dtype=dtype)
             for key, value in extra_conditioning(base_model, fingerprint.family, pooled, resolution).items()}

    per_reference: dict[str, list[torch.Tensor]] = {path: [] for path in layer_paths}
    with torch.inference_mode():
        for latent in latents:
            noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32)
            noisy = (latent + sigma * noise).to(device)
            sigma_batch = sigma.reshape(1).to(device)

            def run():
                base_model.apply_model(noisy, sigma_batch, c_crossattn=context.to(device=device, dtype=dtype),
                                       transformer_options={}, **extra)

            captured = capture_memory(base_model.diffusion_model, layer_paths, run)
            for path in layer_paths:
                per_reference[path].append(captured[path].to("cpu", CACHE_DTYPE))
            progress.update(1)

    memory = {}
    for path in layer_paths:
        stacked = torch.cat(per_reference[path], dim=0)
        if reference_mode == "concat":
            memory[path] = stacked.reshape(1, -1, stacked.shape[-1])
        elif reference_mode == "mean":
            memory[path] = stacked.float().mean(dim=0, keepdim=True).to(CACHE_DTYPE)
        else:
            memory[path] = stacked

    info = {"reference_count": str(count), "reference_resolution": f"{resolution}x{resolution}",
            "reference_mode": reference_mode, "sigma": f"{float(sigma):.7f}",
            "caching_prompt": caching_text if clip is not None else "<zero context: no CLIP connected>",
            "seed": str(int(seed)), "created": now_iso(), "label": label}
    cache = SubjectCache(fingerprint=fingerprint, memory=memory, info=info)
    logger.info("Built %s", cache.describe())
    return cache
