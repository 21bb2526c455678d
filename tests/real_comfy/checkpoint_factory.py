"""Full-size random-weight SD 2.1-base checkpoint and SD2 DreamCache adapter for the real-ComfyUI tests.

The checkpoint has the key layout of a stock SD 2.1-base ``.safetensors`` file (prefixes
``model.diffusion_model.``, ``first_stage_model.`` and ``cond_stage_model.model.`` for the
OpenCLIP ViT-H text tower), so ComfyUI's CheckpointLoaderSimple detects it as SD 2.x with
epsilon prediction. The layout comes from ComfyUI's own modules, built on the meta device and
converted by ComfyUI's own save path (``BaseModel.state_dict_for_saving``), so it follows the
ComfyUI version under test. Each tensor is drawn from a generator seeded by the global seed and
its key name. A file therefore depends only on the seed and the layout, and a test can recompute
any one tensor to check it.

Files are written once per machine under ``$DREAMCACHE_TEST_CACHE_DIR`` (default
``/tmp/dreamcache-test-assets``): about 2.6 GB for the fp16 checkpoint and 100 MB for the adapter.
Nothing is downloaded. Writing streams one tensor at a time, so memory stays near the size of the
largest tensor (the 49408 x 1024 token embedding) instead of the whole checkpoint.

Run ``COMFYUI_PATH=/path/to/ComfyUI python tests/real_comfy/checkpoint_factory.py`` to build both
files ahead of the tests; it prints their paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import struct
import sys
import tempfile
import zlib

import torch

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "DREAMCACHE_TEST_CACHE_DIR"
DEFAULT_CACHE_DIR = "/tmp/dreamcache-test-assets"

# Version in every file name. Raise it whenever random_checkpoint_tensor or random_sd2_adapter
# changes, so that files cached on a machine by an older rule are not reused.
ASSET_VERSION = 1
DEFAULT_SEED = 2101

# The SD 2.1-base U-Net as ComfyUI's model detection describes it (ComfyUI 0.3.64): four levels,
# two res blocks each, linear proj_in/proj_out, 64-channel heads, no transformers at the lowest
# resolution. UNetModel pops transformer_depth_output from the end, so its last three entries are
# output_blocks 0-2 (no attention) and its first is output_blocks.11.
SD21_BASE_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_spatial_transformer": True, "use_linear_in_transformer": True, "legacy": False,
    "context_dim": 1024, "num_head_channels": 64, "num_heads": -1, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

# The KL autoencoder shared by SD 1.x and SD 2.x (8x downsampling, 4 latent channels).
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                   "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                   "dropout": 0.0}

# Standard deviation of every bias. SD20.model_type reads a checkpoint as v-prediction when the
# std of output_blocks.11.1.transformer_blocks.0.norm1.bias exceeds 0.09, so this stays well below.
BIAS_STD = 0.02

# OpenCLIP stores the softmax temperature as log(1 / 0.01).
LOGIT_SCALE = math.log(100.0)

SAFETENSORS_DTYPE = "F16"
CHECKPOINT_DTYPE = torch.float16


def asset_dir() -> str:
    """Return the folder of the generated files: ``$DREAMCACHE_TEST_CACHE_DIR`` or the default."""
    return os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR


def checkpoint_path(seed: int = DEFAULT_SEED) -> str:
    return os.path.join(asset_dir(), f"sd21-base-random-v{ASSET_VERSION}-seed{seed}.safetensors")


def adapter_path(seed: int = DEFAULT_SEED) -> str:
    return os.path.join(asset_dir(), f"dreamcache-sd2-random-v{ASSET_VERSION}-seed{seed}.safetensors")


def checkpoint_layout() -> dict[str, tuple[int, ...]]:
    """Return ``key -> shape`` of every tensor in an SD 2.1-base checkpoint.

    ComfyUI's U-Net, SD2 text encoder and KL autoencoder are built on the meta device (no memory,
    no values) and passed through ``BaseModel.state_dict_for_saving``, which renames the text
    encoder to the OpenCLIP layout (fused ``in_proj_weight``, ``text_projection``, ...).
    """
    import comfy.model_base
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = comfy.supported_models.SD20(dict(SD21_BASE_UNET_CONFIG))
    config.set_inference_dtype(CHECKPOINT_DTYPE, None)
    meta = torch.device("meta")
    with meta:
        base_model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=meta)
        text_encoder = comfy.text_encoders.sd2_clip.SD2ClipModel(device=meta, dtype=CHECKPOINT_DTYPE)
        autoencoder = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=SD_VAE_DDCONFIG["z_channels"])
    state = base_model.state_dict_for_saving(text_encoder.state_dict(), autoencoder.state_dict())
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def key_generator(key: str, seed: int) -> torch.Generator:
    """Return a CPU generator seeded by ``seed`` and the CRC-32 of ``key``, so no tensor depends on another."""
    return torch.Generator(device="cpu").manual_seed(seed * 2**32 + zlib.crc32(key.encode("utf-8")))


def random_checkpoint_tensor(key: str, shape: tuple[int, ...], seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Return the fp16 value of checkpoint tensor ``key``.

    Norm weights (1-D ``weight``) are ones, biases are N(0, BIAS_STD^2) and the OpenCLIP
    ``logit_scale`` scalar is log(100). Every other tensor is N(0, 1 / fan_in) with
    ``fan_in = prod(shape[1:])``. That keeps activations near unit scale through the full-depth
    random networks (the U-Net's epsilon output has a std of about 0.5), so sampling stays finite.
    """
    if len(shape) == 0:
        return torch.tensor(LOGIT_SCALE, dtype=CHECKPOINT_DTYPE)
    if len(shape) == 1 and key.endswith("weight"):
        return torch.ones(shape, dtype=CHECKPOINT_DTYPE)

    values = torch.randn(shape, generator=key_generator(key, seed), dtype=torch.float32)
    if len(shape) == 1:
        std = BIAS_STD
    else:
        std = 1.0 / math.sqrt(math.prod(shape[1:]))
    return (values * std).to(CHECKPOINT_DTYPE)


def safetensors_header(layout: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> bytes:
    """Return the 8-byte length prefix and JSON header of a ``.safetensors`` file of fp16 tensors.

    Tensors are laid out in sorted key order. The header is padded with spaces to a multiple of 8
    bytes, as the format recommends, so that the data starts aligned.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key in sorted(layout):
        size = math.prod(layout[key]) * torch.finfo(CHECKPOINT_DTYPE).bits // 8
        header[key] = {"dtype": SAFETENSORS_DTYPE, "shape": list(layout[key]), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def write_checkpoint(path: str, seed: int = DEFAULT_SEED) -> None:
    """Write the random SD 2.1-base checkpoint to ``path`` through a temporary file and a rename."""
    if sys.byteorder != "little":
        raise RuntimeError("This checkpoint writer needs a little-endian host, because safetensors stores "
                           "little-endian data and the writer copies tensor bytes as they are in memory.")
    layout = checkpoint_layout()
    metadata = {"format": "pt", "dreamcache_test_asset": f"random SD 2.1-base, version {ASSET_VERSION}, seed {seed}"}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(safetensors_header(layout, metadata))
            for key in sorted(layout):
                tensor = random_checkpoint_tensor(key, layout[key], seed).contiguous()
                stream.write(tensor.numpy().tobytes())
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def random_sd2_adapter(seed: int = DEFAULT_SEED):
    """Return a full-size SD2 DreamCacheAdapter with small random weights.

    ``linear_cat`` is [I | 0] plus N(0, 0.01^2) noise. [I | 0] alone would make the block equal
    the stock block, so the noise lets the memory branch change the output clearly without
    swamping the U-Net. Attention projections are N(0, 1 / C), norm weights 1 + N(0, 0.01^2) and
    biases N(0, 0.01^2).
    """
    from dreamcache_core.adapter import DreamCacheAdapter
    from dreamcache_core.adapter_io import stock_fingerprint

    adapter = DreamCacheAdapter(stock_fingerprint("sd2"))
    adapter.reset_to_identity()
    with torch.no_grad():
        for key, tensor in adapter.released_state_dict().items():
            noise = torch.randn(tensor.shape, generator=key_generator(key, seed), dtype=torch.float32)
            if key.endswith("linear_cat.weight"):
                tensor.add_(noise * 0.01)
            elif key.endswith("norm2_mem.weight"):
                tensor.copy_(1.0 + noise * 0.01)
            elif tensor.ndim == 1:
                tensor.copy_(noise * 0.01)
            else:
                tensor.copy_(noise / math.sqrt(tensor.shape[1]))
    return adapter.eval().requires_grad_(False)


@contextlib.contextmanager
def build_lock(path: str):
    """Hold an exclusive lock on ``path + '.lock'`` so parallel test processes build a file once."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def ensure_sd21_checkpoint(seed: int = DEFAULT_SEED) -> str:
    """Return the path of the random SD 2.1-base checkpoint, writing it first if it is missing."""
    path = checkpoint_path(seed)
    with build_lock(path):
        if not os.path.exists(path):
            logger.info("Writing random SD 2.1-base checkpoint to %s (about 2.6 GB)", path)
            write_checkpoint(path, seed)
    return path


def ensure_sd2_adapter(seed: int = DEFAULT_SEED) -> str:
    """Return the path of the random SD2 adapter file, writing it first if it is missing."""
    from dreamcache_core.adapter_io import save_adapter

    path = adapter_path(seed)
    with build_lock(path):
        if not os.path.exists(path):
            logger.info("Writing random SD2 DreamCache adapter to %s", path)
            save_adapter(path, random_sd2_adapter(seed))
    return path


def main() -> None:
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        raise SystemExit("Set COMFYUI_PATH to a ComfyUI checkout, for example COMFYUI_PATH=/opt/ComfyUI.")
    sys.path.insert(0, os.path.abspath(comfy_path))
    sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_sd21_checkpoint())
    print(ensure_sd2_adapter())


if __name__ == "__main__":
    main()
