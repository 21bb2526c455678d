"""Build DreamCache with a tiny ComfyUI U-Net and VAE: what is captured, how, and from which images."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcache_core.builder import build_cache
from tiny_models import tiny_model, tiny_vae

REFERENCES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data",
                          "references")

# Downsampling of each SD memory layer relative to the latent.
LAYER_DOWNSAMPLING = {"middle_block.1": 8, "output_blocks.4.1": 4, "output_blocks.6.1": 2, "output_blocks.8.1": 2,
                      "output_blocks.10.1": 1}


@pytest.fixture(scope="module")
def model():
    return tiny_model("sd2")


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def reference_image(subject: str = "dog", index: str = "00", size: int = 64) -> torch.Tensor:
    """Return a reference photo resized to size x size as a 1 x H x W x 3 ComfyUI IMAGE."""
    path = os.path.join(REFERENCES, subject, f"{index}.jpg")
    if not os.path.isfile(path):
        pytest.skip(f"reference photo {path} not found; the shared data folder must lie beside the repository")
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)[None]


def full_pass_capture(model_patcher, vae, image: torch.Tensor, seed: int, paths: list[str]) -> tuple[dict, int]:
    """Capture each memory layer's input (1 x tokens x C) during one full U-Net pass, without the builder.

    The steps are VAE-encode, process_latent_in, seeded noise at sigma = sigmas[1] and a run with a
    zero text context. Also return how often the ResBlock of output_blocks.11 ran. ComfyUI calls the layers
    inside each U-Net block directly, so hooks go on those layers, never on the block itself.
    """
    base_model = model_patcher.model
    diffusion_model = base_model.diffusion_model
    sigma = model_patcher.get_model_object("model_sampling").sigmas[1].float()
    latent = base_model.process_latent_in(vae.encode(image).float())
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    context = torch.zeros(1, 77, base_model.model_config.unet_config["context_dim"])

    captured = {}
    last_block_runs = []
    handles = [diffusion_model.output_blocks[11][0].register_forward_hook(lambda *_: last_block_runs.append(1))]
    for path in paths:
        def record(module, args, path=path):
            captured[path] = args[0].movedim(1, -1).flatten(1, 2).clone()
        handles.append(diffusion_model.get_submodule(path).register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            base_model.apply_model(latent + sigma * noise, sigma.reshape(1), c_crossattn=context)
    finally:
        for handle in handles:
            handle.remove()
    return captured, len(last_block_runs)


@pytest.mark.parametrize("resolution", [64, 128])
def test_cache_shapes_and_dtype(model, vae, resolution):
    cache = build_cache(model, vae, reference_image(size=resolution), seed=0, resolution=resolution)
    sigma = float(model.get_model_object("model_sampling").sigmas[1])

    assert list(cache.memory) == [layer.path for layer in cache.fingerprint.layers]
    assert list(cache.memory) == list(LAYER_DOWNSAMPLING)
    for layer in cache.fingerprint.layers:
        tokens = (resolution // 8 // LAYER_DOWNSAMPLING[layer.path]) ** 2
        tensor = cache.memory[layer.path]
        assert tuple(tensor.shape) == (1, tokens, layer.channels), layer.path
        assert tensor.dtype == torch.float16
        assert tensor.device.type == "cpu"
        assert torch.isfinite(tensor).all()
    assert cache.info["reference_count"] == "1"
    assert cache.info["reference_resolution"] == f"{resolution}x{resolution}"
    assert cache.info["sigma"] == f"{sigma:.7f}"


def test_capture_matches_full_pass(model, vae):
    image = reference_image()
    cache = build_cache(model, vae, image, seed=123, resolution=64)
    paths = [layer.path for layer in cache.fingerprint.layers]

    expected, last_block_runs = full_pass_capture(model, vae, image, 123, paths)

    assert last_block_runs == 1
    for path in paths:
        reference = expected[path].float()
        difference = (cache.memory[path].float() - reference).abs()
        # Storing as fp16 rounds to half a unit in the last place, and nothing else may differ.
        assert (difference <= reference.abs() * 2.0 ** -11 + 2.0 ** -24).all(), path


def test_build_stops_after_last_memory_layer(model, vae):
    diffusion_model = model.model.diffusion_model
    runs = {"output_blocks.11.0": 0, "output_blocks.11.1": 0, "out": 0}
    handles = []
    for path in runs:
        def count(*_, path=path):
            runs[path] += 1
        handles.append(diffusion_model.get_submodule(path).register_forward_hook(count))
    try:
        build_cache(model, vae, reference_image(), seed=0, resolution=64)
        runs_during_build = dict(runs)
        with torch.no_grad():
            model.model.apply_model(torch.zeros(1, 4, 8, 8), torch.ones(1), c_crossattn=torch.zeros(1, 77, 1024))
    finally:
        for handle in handles:
            handle.remove()

    assert runs_during_build == {"output_blocks.11.0": 0, "output_blocks.11.1": 0, "out": 0}
    assert runs == {"output_blocks.11.0": 1, "output_blocks.11.1": 1, "out": 1}
    for path in LAYER_DOWNSAMPLING:
        assert not diffusion_model.get_submodule(path)._forward_pre_hooks, f"hook left on {path}"


def test_seed_sets_the_cache(model, vae):
    image = reference_image()
    first = build_cache(model, vae, image, seed=7, resolution=64)
    same = build_cache(model, vae, image, seed=7, resolution=64)
    other = build_cache(model, vae, image, seed=8, resolution=64)

    for path in first.memory:
        assert torch.equal(same.memory[path], first.memory[path]), path
        assert not torch.equal(other.memory[path], first.memory[path]), path
    assert first.info["seed"] == "7"


def test_reference_modes(model, vae):
    images = torch.cat([reference_image("dog", "00"), reference_image("cat", "00")])
    per_item = build_cache(model, vae, images, seed=3, resolution=64, reference_mode="per_item")
    concat = build_cache(model, vae, images, seed=3, resolution=64, reference_mode="concat")
    mean = build_cache(model, vae, images, seed=3, resolution=64, reference_mode="mean")
    first_alone = build_cache(model, vae, images[:1], seed=3, resolution=64)

    for layer in per_item.fingerprint.layers:
        tokens = (64 // 8 // LAYER_DOWNSAMPLING[layer.path]) ** 2
        items = per_item.memory[layer.path]
        assert tuple(items.shape) == (2, tokens, layer.channels)
        assert tuple(concat.memory[layer.path].shape) == (1, 2 * tokens, layer.channels)
        assert tuple(mean.memory[layer.path].shape) == (1, tokens, layer.channels)

        assert torch.equal(concat.memory[layer.path][0, :tokens], items[0])
        assert torch.equal(concat.memory[layer.path][0, tokens:], items[1])
        assert torch.equal(mean.memory[layer.path][0], ((items[0].float() + items[1].float()) / 2).half())
        assert torch.equal(first_alone.memory[layer.path][0], items[0])
        assert not torch.equal(items[0], items[1])
    assert per_item.info["reference_count"] == "2"
    assert concat.info["reference_mode"] == "concat"


def assert_same_cache(actual, expected):
    for path, tensor in expected.memory.items():
        assert torch.equal(actual.memory[path], tensor), path


def test_alpha_composited_on_white(model, vae):
    rgb = reference_image()
    opaque = torch.cat([rgb, torch.ones_like(rgb[..., :1])], dim=-1)
    transparent = torch.cat([rgb, torch.zeros_like(rgb[..., :1])], dim=-1)

    assert_same_cache(build_cache(model, vae, opaque, seed=1, resolution=64),
                      build_cache(model, vae, rgb, seed=1, resolution=64))
    assert_same_cache(build_cache(model, vae, transparent, seed=1, resolution=64),
                      build_cache(model, vae, torch.ones_like(rgb), seed=1, resolution=64))


def test_greyscale_reference(model, vae):
    grey = reference_image().mean(dim=-1, keepdim=True)

    assert_same_cache(build_cache(model, vae, grey, seed=1, resolution=64),
                      build_cache(model, vae, grey.expand(-1, -1, -1, 3), seed=1, resolution=64))


@pytest.mark.parametrize("height, width", [(8, 8), (1024, 1536)])
def test_tiny_and_large_references(model, vae, height, width):
    generator = torch.Generator().manual_seed(height)
    image = torch.rand(1, height, width, 3, generator=generator)

    cache = build_cache(model, vae, image, seed=0, resolution=64)

    for layer in cache.fingerprint.layers:
        tokens = (64 // 8 // LAYER_DOWNSAMPLING[layer.path]) ** 2
        assert tuple(cache.memory[layer.path].shape) == (1, tokens, layer.channels)
        assert torch.isfinite(cache.memory[layer.path]).all()
    assert cache.info["reference_resolution"] == "64x64"
