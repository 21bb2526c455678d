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
}


def tiny_unet_config(family: str = "sd2", model_channels: int = 32) -> dict:
    _, context_dim, linear, channel_mult, depth, adm = _FAMILY_CONFIG[family]
    # UNetModel pops transformer_depth_output from the end, so its last three entries are the
    # deepest decoder level (output_blocks.0-2, no transformer), as in ComfyUI's stock SD configs.
    return {"in_channels": 4, "out_channels": 4, "model_channels": model_channels, "num_res_blocks": 2,
            "channel_mult": channel_mult, "transformer_depth": depth, "transformer_depth_middle": 1,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "context_dim": context_dim,
            "use_linear_in_transformer": linear, "adm_in_channels": adm, "use_temporal_attention": False,
            "image_size": 32, "use_spatial_transformer": True, "legacy": False}


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
               head_channels: int = 8):
    """Return a ModelPatcher around a tiny random-weight SD-layout U-Net of ``family`` (fp32, CPU)."""
    model_class = _FAMILY_CONFIG[family][0]
    config = model_class(tiny_unet_config(family, model_channels))
    if family == "sd2":
        config.unet_config["num_head_channels"] = head_channels
    else:
        config.unet_config["num_heads"] = 4
        config.unet_config["num_head_channels"] = -1
    model_type = comfy.model_base.ModelType.EPS if prediction == "eps" else comfy.model_base.ModelType.V_PREDICTION
    base_model = comfy.model_base.BaseModel(config, model_type=model_type, device=CPU)
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
