"""Shared set-up for the DreamCache benchmarks: real ComfyUI, full-size random-weight models, timing.

Every benchmark script imports this module first. It puts ``COMFYUI_PATH`` and the repository on
``sys.path`` and configures ComfyUI's arguments: PyTorch attention, and the CPU when no CUDA
device exists. It builds full-size SD 1.5 / SD 2.1-base U-Nets, the SD VAE and a CLIP ViT-H/14
image tower from ComfyUI's own classes with random weights. Timings do not depend on weight values, but
they do depend on the values staying finite and normal (denormals and NaN slow CPUs down), so
every tensor is initialised with fan-in scaling and every output is checked.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAMILIES = {"sd15": "sd1", "sd21": "sd2"}
BENCH_DATE = "2026-12-04"
TEXT_SCALE = 7.5
IMAGE_SCALE = 0.4
SEED = 0


def setup_comfy() -> None:
    """Import ComfyUI from ``COMFYUI_PATH`` with CPU arguments when no CUDA device exists."""
    comfy_path = os.environ.get("COMFYUI_PATH", "")
    if not os.path.isfile(os.path.join(comfy_path, "comfy", "model_patcher.py")):
        raise SystemExit(f"COMFYUI_PATH={comfy_path!r} is not a ComfyUI checkout. "
                         "Set COMFYUI_PATH to the ComfyUI directory (the one that contains comfy/).")
    for path in (os.path.abspath(comfy_path), REPO_ROOT):
        if path not in sys.path:
            sys.path.insert(0, path)

    import torch
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.use_pytorch_cross_attention = True
    if not torch.cuda.is_available():
        args.cpu = True

    import logging
    logging.getLogger().setLevel(logging.WARNING)


def add_common_arguments(parser: argparse.ArgumentParser, default_repeats: int) -> None:
    parser.add_argument("--model", choices=sorted(FAMILIES), default="sd21", help="base U-Net layout")
    parser.add_argument("--size", type=int, default=512, help="generated image side in pixels (latent = size / 8)")
    parser.add_argument("--repeats", type=int, default=default_repeats, help="interleaved repeats of every case")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads value. With 1, process CPU time is the work done, "
                             "even on a busy machine")


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    print(f"torch.set_num_threads({threads}); torch.get_num_threads() = {torch.get_num_threads()}")


def machine_description() -> str:
    """Return the CPU model, core count, accelerator and torch version as one line."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (f"{cpu}, {os.cpu_count()} logical cores, {device}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def print_header(title: str, args: argparse.Namespace) -> None:
    print(f"== {title}")
    print(f"machine: {machine_description()}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    set_threads(args.threads)


def compute_device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def init_tensors(module, seed: int = SEED, gain: float = 0.5) -> None:
    """Give every parameter and floating buffer of ``module`` a finite value in place.

    Matrices and kernels get N(0, gain^2 / fan_in) so activations keep their scale through the
    network; 1-D weights (norm scales) get 1 + N(0, 0.02^2) and biases N(0, 0.02^2).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not torch.is_floating_point(tensor):
                continue
            if tensor.ndim >= 2:
                fan_in = max(1, tensor[0].numel())
                values = torch.randn(tensor.shape, generator=generator) * (gain / fan_in ** 0.5)
            elif name.endswith("weight"):
                values = 1.0 + 0.02 * torch.randn(tensor.shape, generator=generator)
            else:
                values = 0.02 * torch.randn(tensor.shape, generator=generator)
            tensor.copy_(values.to(tensor.dtype))


def full_unet_config(family: str) -> dict:
    """Return the stock SD 1.x / SD 2.x U-Net config (320 channels, mult 1-2-4-4, no attention at the 8x level).

    ComfyUI's UNetModel pops ``transformer_depth_output`` from the end, so its last three entries
    are ``output_blocks.0-2`` (the 8x-downsampled level without attention).
    """
    context_dim = 768 if family == "sd1" else 1024
    return {"in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "context_dim": context_dim, "use_linear_in_transformer": family == "sd2", "adm_in_channels": None,
            "use_temporal_attention": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False}


def build_model(model_name: str):
    """Return a ModelPatcher around a full-size random-weight U-Net (``sd15`` or ``sd21``) on the compute device."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    family = FAMILIES[model_name]
    config_class = comfy.supported_models.SD15 if family == "sd1" else comfy.supported_models.SD20
    config = config_class(full_unet_config(family))
    base_model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
    init_tensors(base_model.diffusion_model)
    base_model.eval()
    parameters = sum(parameter.numel() for parameter in base_model.diffusion_model.parameters())
    print(f"U-Net {model_name}: {parameters / 1e6:.1f}M parameters, random weights")
    device = compute_device()
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(base_model, load_device=device, offload_device=offload)


def build_vae():
    """Return a ComfyUI VAE with the full-size SD AutoencoderKL layout (ch 128, mult 1-2-4-4) and random weights."""
    import comfy.ldm.models.autoencoder
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    autoencoder = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_tensors(autoencoder, seed=SEED + 1)
    state = autoencoder.state_dict()
    del autoencoder
    return comfy.sd.VAE(sd=state)


def build_clip_vision_h():
    """Return ComfyUI's ClipVisionModel with the ViT-H/14 config (32 layers, width 1280, 224 px) and random weights."""
    import comfy.clip_vision

    config_path = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json")
    vision = comfy.clip_vision.ClipVisionModel(config_path)
    init_tensors(vision.model, seed=SEED + 2)
    parameters = sum(parameter.numel() for parameter in vision.model.parameters())
    print(f"CLIP ViT-H/14 image tower: {parameters / 1e6:.1f}M parameters, random weights")
    return vision


def random_adapter(model_patcher):
    """Return a DreamCache adapter for ``model_patcher`` with random weights (25.2M parameters for SD)."""
    from dreamcache_core.adapter import DreamCacheAdapter
    from dreamcache_core.comfy_patch import model_fingerprint

    adapter = DreamCacheAdapter(model_fingerprint(model_patcher))
    init_tensors(adapter, seed=SEED + 3)
    return adapter.eval().requires_grad_(False)


class LatentVAE:
    """Stand-in VAE whose ``encode`` returns a fixed latent, so ``build_cache`` times only its U-Net part."""

    def __init__(self, latent):
        self.latent = latent

    def encode(self, pixels):
        return self.latent[:pixels.shape[0]].clone()


def reference_image(resolution: int):
    """Return a seeded random IMAGE (1 x H x W x 3 in [0, 1])."""
    import torch

    generator = torch.Generator().manual_seed(SEED + 4)
    return torch.rand(1, resolution, resolution, 3, generator=generator)


def reference_latent(resolution: int):
    """Return a seeded random unscaled latent (1 x 4 x H/8 x W/8), what a VAE encode would return."""
    import torch

    generator = torch.Generator().manual_seed(SEED + 5)
    return torch.randn(1, 4, resolution // 8, resolution // 8, generator=generator) * 5.0


def build_reference_cache(model_patcher, resolution: int = 512):
    """Return a cache built by the pack's ``build_cache`` from a random reference latent at ``resolution``."""
    from dreamcache_core.builder import build_cache

    vae = LatentVAE(reference_latent(resolution))
    return build_cache(model_patcher, vae, reference_image(resolution), resolution=resolution, label="benchmark")


def text_conditioning(model_patcher, seed: int):
    """Return a ComfyUI CONDITIONING with a seeded random 77-token text context of the model's width."""
    import torch

    context_dim = model_patcher.model.model_config.unet_config["context_dim"]
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, context_dim, generator=generator), {}]]


def wall_clock():
    """Return a time stamp in seconds after waiting for queued device work."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def stamp() -> tuple[float, float]:
    """Return (wall clock, process CPU time) in seconds."""
    return wall_clock(), time.process_time()


def elapsed(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return end[0] - start[0], end[1] - start[1]


def timed_call(function) -> list[tuple[float, float]]:
    """Call ``function()`` once and return [(wall seconds, process CPU seconds)]."""
    start = stamp()
    function()
    return [elapsed(start, stamp())]


METRICS = {"wall": 0, "cpu": 1}


def values(repeats: list, metric: str) -> list[float]:
    """Flatten one case's samples (a list per repeat of (wall, cpu) pairs) to one metric."""
    return [sample[METRICS[metric]] for repeat in repeats for sample in repeat]


def summarize(samples: list[float]) -> str:
    return f"min {min(samples):8.3f} s  median {statistics.median(samples):8.3f} s  (n={len(samples)})"


def ratio_line(name: str, numerator: list, denominator: list, metric: str) -> str:
    """Return the ratio of two cases' samples by min, by median and paired within each repeat.

    The paired ratio divides the two cases' medians within one repeat, so both sides of each
    ratio ran minutes apart at most, under similar load from other processes.
    """
    top, bottom = values(numerator, metric), values(denominator, metric)
    paired = [statistics.median(sample[METRICS[metric]] for sample in upper)
              / statistics.median(sample[METRICS[metric]] for sample in lower)
              for upper, lower in zip(numerator, denominator)]
    return (f"RATIO {metric} {name}: {min(top) / min(bottom):.3f}x by min, "
            f"{statistics.median(top) / statistics.median(bottom):.3f}x by median, "
            f"paired per repeat median {statistics.median(paired):.3f}x "
            f"(range {min(paired):.3f}-{max(paired):.3f})")


def run_interleaved(cases: dict, repeats: int) -> dict:
    """Call every case once per repeat in a fixed rotation (A B C A B C ...) and collect its samples.

    Each case is a callable returning a list of (wall, CPU) second pairs. The result maps each
    case name to a list with one such list per repeat.
    """
    samples = {name: [] for name in cases}
    for repeat in range(repeats):
        for name, case in cases.items():
            measured = case()
            samples[name].append(measured)
            print(f"  repeat {repeat + 1}/{repeats} {name:<16} "
                  + " ".join(f"{wall:.3f}s wall/{cpu:.3f}s cpu" for wall, cpu in measured), flush=True)
    return samples


def print_summary(samples: dict, title: str) -> None:
    for metric in METRICS:
        print(f"{title}, {metric} seconds:")
        for name, repeats in samples.items():
            print(f"  {name:<24} {summarize(values(repeats, metric))}")
