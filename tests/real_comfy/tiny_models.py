"""Tiny SD-layout U-Nets built from ComfyUI's own classes, inside a real ModelPatcher.

Every tensor is initialised here, because ComfyUI's ops skip weight initialisation and an
uninitialised model gives NaN.
"""

import torch

import comfy.model_base
import comfy.model_patcher
import comfy.supported_models

from dreamcache_core.adapter import DreamCacheAdapter
from dreamcache_core.cache import SubjectCache
from dreamcache_core.comfy_patch import model_fingerprint

CPU = torch.device("cpu")

_FAMILY_CONFIG = {
    # family: (supported model class, context_dim, linear proj, channel_mult, depth per level, adm)
    "sd1": (comfy.supported_models.SD15, 768, False, [1, 2, 4, 4], [1, 1, 1, 1, 1, 1, 0, 0], None),
    "sd2": (comfy.supported_models.SD20, 1024, True, [1, 2, 4, 4], [1, 1, 1, 1, 1, 1, 0, 0], None),
    "sdxl": (comfy.supported_models.SDXL, 2048, True, [1, 2, 4], [0, 0, 1, 1, 1, 1], 2816),
}

NUM_RES_BLOCKS = 2


def tiny_unet_config(family: str = "sd2", model_channels: int = 32) -> dict:
    _, context_dim, linear, channel_mult, depth, adm = _FAMILY_CONFIG[family]
    # UNetModel pops transformer_depth_output from the end, so its last entries describe the
    # deepest decoder level. The lists match ComfyUI's stock configs: [1] * 9 + [0] * 3 for
    # SD 1.x/2.x (no transformer in output_blocks.0-2) and [0] * 3 + [1] * 6 for SDXL (none in 6-8).
    depth_per_level = [depth[level * NUM_RES_BLOCKS] for level in range(len(channel_mult))]
    depth_output = [level_depth for level_depth in depth_per_level for _ in range(NUM_RES_BLOCKS + 1)]
    config = {"in_channels": 4, "out_channels": 4, "model_channels": model_channels, "num_res_blocks": NUM_RES_BLOCKS,
              "channel_mult": channel_mult, "transformer_depth": depth, "transformer_depth_middle": 1,
              "transformer_depth_output": depth_output, "context_dim": context_dim,
              "use_linear_in_transformer": linear, "adm_in_channels": adm, "use_temporal_attention": False,
              "image_size": 32, "use_spatial_transformer": True, "legacy": False}
    if adm is not None:
        config["num_classes"] = "sequential"
    return config


def init_all_tensors(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every parameter a finite random value; norms start at weight 1 + noise, bias noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            values = torch.randn(parameter.shape, generator=generator) * std
            if name.endswith("weight") and parameter.ndim == 1:
                values = values + 1.0
            parameter.copy_(values.to(parameter.dtype))


def tiny_model(family: str = "sd2", model_channels: int = 32, prediction: str = "eps", seed: int = 0,
               head_channels: int = 8, dtype: torch.dtype = torch.float32):
    """Return a ModelPatcher around a tiny random-weight U-Net of ``family`` on the CPU.

    ``family`` is "sd1" (conv proj_in, 4 heads), "sd2" (linear proj_in, ``head_channels`` per head)
    or "sdxl" (three levels, 2816-wide ``y`` input; pass ``y`` to ``apply_model``). ``dtype`` is the
    weight and activation dtype; one seed gives the same weights, rounded, in every dtype.
    """
    model_class = _FAMILY_CONFIG[family][0]
    config = model_class(tiny_unet_config(family, model_channels))
    if family in ("sd2", "sdxl"):
        config.unet_config["num_head_channels"] = head_channels
    else:
        config.unet_config["num_heads"] = 4
        config.unet_config["num_head_channels"] = -1
    if dtype != torch.float32:
        config.set_inference_dtype(dtype, None)
    model_type = comfy.model_base.ModelType.EPS if prediction == "eps" else comfy.model_base.ModelType.V_PREDICTION
    base_class = comfy.model_base.SDXL if family == "sdxl" else comfy.model_base.BaseModel
    base_model = base_class(config, model_type=model_type, device=CPU)
    init_all_tensors(base_model.diffusion_model, seed)
    base_model.eval()
    return comfy.model_patcher.ModelPatcher(base_model, load_device=CPU, offload_device=CPU)


def random_adapter(model_patcher, seed: int = 1, std: float = 0.05) -> DreamCacheAdapter:
    adapter = DreamCacheAdapter(model_fingerprint(model_patcher))
    init_all_tensors(adapter, seed, std)
    return adapter.eval().requires_grad_(False)


def random_cache(model_patcher, tokens: int = 16, items: int = 1, seed: int = 2, label: str = "tiny") -> SubjectCache:
    fingerprint = model_fingerprint(model_patcher)
    generator = torch.Generator().manual_seed(seed)
    memory = {layer.path: torch.randn(items, tokens, layer.channels, generator=generator).half()
              for layer in fingerprint.layers}
    return SubjectCache(fingerprint=fingerprint, memory=memory, info={"label": label, "reference_count": "1"})


def tiny_vae(seed: int = 3):
    """Return a ComfyUI VAE around a tiny random AutoencoderKL: 8x downsampling, 4 latent channels, fp32 CPU."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    source = AutoencoderKL(embed_dim=4, ddconfig=ddconfig)
    init_all_tensors(source, seed)
    return comfy.sd.VAE(sd=source.state_dict(), device=CPU, dtype=torch.float32,
                        config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})


def model_inputs(model_patcher, batch: int = 2, size: int = 16, seed: int = 7) -> tuple:
    """Return (latent B x 4 x size x size, sigma B, context B x 77 x context_dim, extra conds) for ``apply_model``.

    The extra conds hold a random ``y`` for U-Nets with an ADM input (SDXL), else nothing.
    """
    config = model_patcher.model.model_config.unet_config
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 4, size, size, generator=generator)
    sigma = torch.linspace(1.0, 8.0, batch) if batch > 1 else torch.tensor([2.0])
    context = torch.randn(batch, 77, config["context_dim"], generator=generator)
    extra = {}
    if config.get("adm_in_channels"):
        extra["y"] = torch.randn(batch, config["adm_in_channels"], generator=generator)
    return latent, sigma, context, extra


def run_unet(model_patcher, latent: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, **extra) -> torch.Tensor:
    """Return ``apply_model`` of the MODEL's U-Net with its transformer patches, outside a sampling run.

    The transformer options are copied because the U-Net writes per-call keys into them.
    """
    options = dict(model_patcher.model_options.get("transformer_options", {}))
    with torch.no_grad():
        return model_patcher.model.apply_model(latent, sigma, c_crossattn=context, transformer_options=options, **extra)


def sample_latent(model_patcher, seed: int, steps: int = 3, cfg: float = 4.0, size: int = 16,
                  sampler_name: str = "euler", scheduler: str = "normal") -> torch.Tensor:
    """Sample an empty 1 x 4 x size x size latent with ComfyUI's KSampler code (``comfy.sample.sample``).

    Positive and negative text contexts are fixed random tensors, so ``seed`` only sets the noise.
    """
    import comfy.sample

    context_dim = model_patcher.model.model_config.unet_config["context_dim"]
    generator = torch.Generator().manual_seed(11)
    positive = [[torch.randn(1, 77, context_dim, generator=generator), {}]]
    negative = [[torch.randn(1, 77, context_dim, generator=generator), {}]]
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model_patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                               seed=seed, disable_pbar=True)


def max_abs_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return max |actual - expected| as a float, so a failed assert prints a number, not two tensors."""
    return float((actual.float() - expected.float()).abs().max())
