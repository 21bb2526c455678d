"""Count the compute and activation memory of one training step on the meta device (no weights, no GPU).

``python -m dreamcache_core.train.estimate --family sd2 --batch-size 12 --resolution 512 --dtype bf16``

builds the stock U-Net of the family and the SD VAE encoder with ComfyUI's classes on the meta
device. It runs the caching pass and the patched forward and backward of one micro-batch. It then
prints the FLOPs per sample of each part (counted by ``torch.utils.flop_counter``), the bytes of
the tensors that autograd saves for backward, and the memory of the weights and the optimizer.
The text encoder is not counted. Needs ComfyUI (``--comfyui-path`` or ``COMFYUI_PATH``).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..builder import capture_memory
from .live_patch import TrainingPatch
from .model import adapter_sites, new_adapter

META = torch.device("meta")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAM_BYTES_PER_PARAMETER = 16  # float32 weight, gradient and the two AdamW moments

# Hyperparameters of the stock SD 1.5, SD 2.1 and SDXL base U-Nets. ComfyUI's model config
# classes fill in everything not listed here.
SD_DEPTHS = {"num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_middle": 1, "transformer_depth_output": [1] * 9 + [0] * 3}
UNET_CONFIGS = {
    "sd1": dict(SD_DEPTHS, context_dim=768, use_linear_in_transformer=False, adm_in_channels=None),
    "sd2": dict(SD_DEPTHS, context_dim=1024, use_linear_in_transformer=True, adm_in_channels=None),
    "sdxl": {"num_res_blocks": 2, "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "context_dim": 2048, "use_linear_in_transformer": True, "adm_in_channels": 2816,
             "num_classes": "sequential"},
}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def meta_unet(family: str, dtype: torch.dtype):
    """Return a ComfyUI base model of the stock ``family`` U-Net on the meta device, frozen."""
    import comfy.model_base
    import comfy.supported_models

    config_class = {"sd1": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20,
                    "sdxl": comfy.supported_models.SDXL}[family]
    unet = dict(UNET_CONFIGS[family], in_channels=4, out_channels=4, model_channels=320,
                use_temporal_attention=False, image_size=32, use_spatial_transformer=True, legacy=False)
    config = config_class(unet)
    if family == "sd1":
        config.unet_config.update(num_heads=8, num_head_channels=-1)
    else:
        config.unet_config.update(num_heads=-1, num_head_channels=64)
    config.set_inference_dtype(dtype, None)
    base_class = comfy.model_base.SDXL if family == "sdxl" else comfy.model_base.BaseModel
    base_model = base_class(config, device=META)
    return base_model.requires_grad_(False)


def vae_encode_flops(resolution: int) -> int:
    """Return the FLOPs of one SD VAE encoder pass over a resolution x resolution image."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device(META):
        vae = AutoencoderKL(embed_dim=4, ddconfig=SD_VAE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encode(torch.zeros(1, 3, resolution, resolution, device=META))
    return counter.get_total_flops()


def estimate(family: str, batch: int, resolution: int, dtype: torch.dtype) -> dict:
    """Return FLOPs per sample and memory in bytes of one training micro-batch of the stock ``family`` model."""
    from ..comfy_patch import model_fingerprint
    import comfy.model_patcher

    base_model = meta_unet(family, dtype)
    fingerprint = model_fingerprint(comfy.model_patcher.ModelPatcher(base_model, load_device=META,
                                                                     offload_device=META))
    unet = base_model.diffusion_model
    latent = torch.zeros(batch, 4, resolution // 8, resolution // 8, device=META, dtype=dtype)
    timestep = torch.ones(batch, device=META)
    context = torch.zeros(batch, 77, fingerprint.context_dim, device=META, dtype=dtype)
    extra = {"y": torch.zeros(batch, 2816, device=META, dtype=dtype)} if family == "sdxl" else {}

    def run_unet(options):
        return unet(latent, timestep, context=context, transformer_options=options, **extra)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        memory = capture_memory(unet, [layer.path for layer in fingerprint.layers], lambda: run_unet({}))
    caching_flops = counter.get_total_flops()

    adapter = new_adapter(fingerprint, adapter_sites(fingerprint, unet), seed=0).to(META)
    saved: dict[int, int] = {}

    def pack(tensor):
        saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with FlopCounterMode(display=False) as counter:
            run_unet(TrainingPatch(adapter, memory).transformer_options()).float().pow(2).mean().backward()
    training_flops = counter.get_total_flops()

    weights = {parameter.untyped_storage()._cdata for parameter in unet.parameters()}
    weights |= {parameter.untyped_storage()._cdata for parameter in adapter.parameters()}
    adapter_parameters = sum(parameter.numel() for parameter in adapter.parameters())
    return {"caching_pass": caching_flops / batch, "forward_backward": training_flops / batch,
            "vae_encode_two_images": 2 * vae_encode_flops(resolution),
            "saved_activations_bytes": sum(size for key, size in saved.items() if key not in weights),
            "unet_weight_bytes": sum(parameter.numel() * parameter.element_size() for parameter in unet.parameters()),
            "adapter_parameters": adapter_parameters,
            "adapter_optimizer_bytes": adapter_parameters * ADAM_BYTES_PER_PARAMETER}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreamcache_core.train.estimate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(UNET_CONFIGS), default="sd2")
    parser.add_argument("--batch-size", type=int, default=12, help="Samples per forward pass on one GPU.")
    parser.add_argument("--resolution", type=int, default=512, help="Image side in pixels.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="U-Net weight and activation dtype.")
    parser.add_argument("--comfyui-path", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI folder.")
    arguments = parser.parse_args(argv)

    from .__main__ import set_up_comfyui

    set_up_comfyui(arguments.comfyui_path)
    from comfy.cli_args import args

    # The meta device carries no memory statistics, which ComfyUI's other attention choices query.
    args.cpu = True
    args.use_pytorch_cross_attention = True
    result = estimate(arguments.family, arguments.batch_size, arguments.resolution, DTYPES[arguments.dtype])
    total = result["caching_pass"] + result["forward_backward"] + result["vae_encode_two_images"]
    print(f"{arguments.family}, batch {arguments.batch_size}, {arguments.resolution}px, {arguments.dtype}")
    for key in ("caching_pass", "forward_backward", "vae_encode_two_images"):
        print(f"  {key:24s} {result[key] / 1e12:8.3f} TFLOP per sample")
    print(f"  {'total':24s} {total / 1e12:8.3f} TFLOP per sample")
    print(f"  saved activations        {result['saved_activations_bytes'] / 2**30:8.2f} GiB per micro-batch")
    print(f"  U-Net weights            {result['unet_weight_bytes'] / 2**30:8.2f} GiB")
    print(f"  adapter + AdamW          {result['adapter_optimizer_bytes'] / 2**30:8.2f} GiB "
          f"({result['adapter_parameters']} parameters)")


if __name__ == "__main__":
    main()
