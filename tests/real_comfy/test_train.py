"""Adapter training on tiny ComfyUI U-Nets, on the CPU.

The U-Net is ComfyUI's own class (``tiny_models.tiny_model``). The VAE and the text encoder are
stand-ins with ComfyUI's call interface:

* ``StandInVAE`` maps pixels to a 4-channel latent by 8 x 8 average pooling. A random-weight
  AutoencoderKL would cost most of each CPU training step and its latents would carry no more
  structure than pooled pixels; what the training path needs is the pixel -> latent contract
  (B x H x W x 3 in [0, 1] in, B x 4 x H/8 x W/8 out).
* ``StandInTextEncoder`` gives every word a fixed random embedding, so captions differ
  deterministically.

Every training test runs with one intra-op thread: on a shared 2-core machine that is several
times faster than two for these tiny tensors.
"""

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import comfy.model_sampling
import comfy.sample
import tiny_models
from dreamcache_core.adapter_io import load_adapter
from dreamcache_core.builder import build_cache
from dreamcache_core.comfy_patch import apply_dreamcache, model_fingerprint
from dreamcache_core.train import TrainConfig, train
from dreamcache_core.train.augment import ReferenceAugmentation
from dreamcache_core.train.checkpoint import RESUME_FILE
from dreamcache_core.train.data import TrainingSamples, discover_samples
from dreamcache_core.train.live_patch import TrainingPatch
from dreamcache_core.train.model import FrozenBase, TextConditioner, adapter_sites, decoder_gradient_checkpointing
from dreamcache_core.train.model import new_adapter, objective_target
from dreamcache_core.train.objective import AdapterObjective, prepare_batch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
RESOLUTION = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}


class StandInVAE:
    """8 x 8 average pooling to 4 channels (RGB and their mean) in [-1, 1]; decode repeats the pixels."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(pixels.movedim(-1, 1) * 2.0 - 1.0, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        rgb = F.interpolate(latent[:, :3], scale_factor=8, mode="nearest")
        return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)


class StandInTextEncoder:
    """CLIP-like: 1 x 77 x dim context with one fixed random vector per word; pooled is their mean."""

    def __init__(self, dim: int, pooled_dim: int | None = None):
        self.dim = dim
        self.pooled_dim = pooled_dim or dim

    def tokenize(self, text: str) -> list[str]:
        return text.split()[:77]

    def encode_from_tokens(self, tokens: list[str], return_pooled: bool = False):
        context = torch.zeros(1, 77, self.dim)
        for index, word in enumerate(tokens):
            generator = torch.Generator().manual_seed(sum(ord(character) * 31 ** i for i, character in enumerate(word)))
            context[0, index] = torch.randn(self.dim, generator=generator)
        pooled = context.mean(dim=1)[:, :self.pooled_dim]
        return (context, pooled) if return_pooled else context


def shape_image(index: int, size: int = RESOLUTION) -> tuple[np.ndarray, np.ndarray, str]:
    """Return (RGB image, 0/255 mask, caption) of a coloured square or disc on a random plain background."""
    rng = np.random.default_rng(index)
    name = list(COLOURS)[index % len(COLOURS)]
    shape = ("square", "disc")[(index // len(COLOURS)) % 2]
    image = np.empty((size, size, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    rows, columns = np.mgrid[:size, :size]
    centre_row, centre_column = rng.integers(size // 3, 2 * size // 3, 2)
    radius = size // 5
    if shape == "square":
        mask = (abs(rows - centre_row) < radius) & (abs(columns - centre_column) < radius)
    else:
        mask = (rows - centre_row) ** 2 + (columns - centre_column) ** 2 < radius ** 2
    image[mask] = COLOURS[name]
    return image, (mask * 255).astype(np.uint8), f"a {name} {shape}"


def write_released_dataset(root: str, count: int = 8) -> str:
    for index in range(count):
        image, mask, caption = shape_image(index)
        folder = os.path.join(root, f"object{index:02d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, "s0_generation.png"))
        Image.fromarray(mask, mode="L").save(os.path.join(folder, "s0_mask.png"))
        with open(os.path.join(folder, "s0_caption.txt"), "w", encoding="utf-8") as handle:
            handle.write(caption)
    return root


def tiny_config(data: str, output: str, **overrides) -> TrainConfig:
    settings = {"resolution": RESOLUTION, "micro_batch": 4, "max_steps": 200, "learning_rate": 1e-3,
                "save_every": 100, "log_every": 50, "resume": "auto"}
    settings.update(overrides)
    return TrainConfig(data=data, output=output, **settings)


def train_tiny(config: TrainConfig, family: str = "sd2"):
    model_patcher = tiny_models.tiny_model(family)
    context_dim = model_patcher.model.model_config.unet_config["context_dim"]
    pooled_dim = 1280 if family == "sdxl" else None
    return train(config, model_patcher, StandInVAE(), StandInTextEncoder(context_dim, pooled_dim))


def adapter_state(adapter) -> dict:
    return {key: tensor.detach().clone() for key, tensor in adapter.state_dict().items()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_released_dataset(str(tmp_path_factory.mktemp("released")))


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    """200 uninterrupted steps at lr 1e-3, checkpoints every 100 steps."""
    output = str(tmp_path_factory.mktemp("full_run"))
    result = train_tiny(tiny_config(dataset, output))
    return result, output


def base_and_text(model_patcher, family: str = "sd2"):
    fingerprint = model_fingerprint(model_patcher)
    base = FrozenBase(model_patcher, StandInVAE(), fingerprint)
    pooled_dim = 1280 if family == "sdxl" else None
    text = TextConditioner(StandInTextEncoder(fingerprint.context_dim, pooled_dim), base.base_model, fingerprint,
                           RESOLUTION)
    return base, text


def first_batch(dataset_root: str, seed: int = 0, size: int = 4) -> dict:
    samples = TrainingSamples(discover_samples(dataset_root), seed, ReferenceAugmentation(resolution=RESOLUTION))
    loader = torch.utils.data.DataLoader(samples, batch_size=size, sampler=list(range(size)))
    return next(iter(loader))


def test_step_zero_equals_base_model(dataset):
    model_patcher = tiny_models.tiny_model("sd2")
    base, text = base_and_text(model_patcher)
    prepared = prepare_batch(base, text, first_batch(dataset), seed=0)
    assert all(float(memory.abs().max()) > 0 for memory in prepared.memory.values())

    adapter = new_adapter(base.fingerprint, adapter_sites(base.fingerprint, base.diffusion_model), seed=0)
    patch = TrainingPatch(adapter, prepared.memory)
    with torch.no_grad():
        stock = base.predict(prepared.noisy, prepared.sigma, prepared.context, prepared.extra, {})
        patched = base.predict(prepared.noisy, prepared.sigma, prepared.context, prepared.extra,
                               patch.transformer_options())
    assert torch.allclose(patched, stock, atol=1e-6, rtol=0), float((patched - stock).abs().max())

    # The same memory with a non-identity linear_cat must change the output, so the check above
    # is not passing because the patch never ran.
    with torch.no_grad():
        adapter.blocks[-1].linear_cat.weight[:, adapter.blocks[-1].channels:].fill_(0.05)
        changed = base.predict(prepared.noisy, prepared.sigma, prepared.context, prepared.extra,
                               patch.transformer_options())
    assert float((changed - stock).abs().max()) > 1e-3


def test_training_patch_matches_inference_patch():
    model_patcher = tiny_models.tiny_model("sd2")
    adapter = tiny_models.random_adapter(model_patcher)
    cache = tiny_models.random_cache(model_patcher)
    base, _ = base_and_text(model_patcher)
    generator = torch.Generator().manual_seed(4)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    sigma = torch.tensor([1.0, 4.0])
    context = torch.randn(2, 77, 1024, generator=generator)
    extra = {}

    patched = apply_dreamcache(model_patcher, adapter, cache)
    inference_options = dict(patched.model_options["transformer_options"])
    memory = {path: tensor.float() for path, tensor in cache.memory.items()}
    training_options = TrainingPatch(adapter, memory).transformer_options()
    with torch.no_grad():
        inference = base.predict(latent, sigma, context, extra, inference_options)
        training = base.predict(latent, sigma, context, extra, training_options)
        stock = base.predict(latent, sigma, context, extra, {})
    assert float((inference - stock).abs().max()) > 1e-3
    assert torch.allclose(training, inference, atol=1e-6, rtol=0), float((training - inference).abs().max())


def test_loss_reaches_every_adapter_parameter(dataset):
    model_patcher = tiny_models.tiny_model("sd2")
    base, text = base_and_text(model_patcher)
    prepared = prepare_batch(base, text, first_batch(dataset), seed=0)
    adapter = tiny_models.random_adapter(model_patcher).requires_grad_(True)
    loss, _ = AdapterObjective(adapter, base)(prepared)
    loss.backward()
    for name, parameter in adapter.named_parameters():
        assert parameter.grad is not None, name
        assert float(parameter.grad.abs().max()) > 0, name
    assert all(not parameter.requires_grad for parameter in base.diffusion_model.parameters())


def test_gradient_checkpointing_keeps_gradients(dataset):
    model_patcher = tiny_models.tiny_model("sd2")
    base, text = base_and_text(model_patcher)
    prepared = prepare_batch(base, text, first_batch(dataset), seed=0)
    gradients = []
    for enabled in (False, True):
        adapter = tiny_models.random_adapter(model_patcher).requires_grad_(True)
        with decoder_gradient_checkpointing(base.diffusion_model, enabled):
            loss, _ = AdapterObjective(adapter, base)(prepared)
            loss.backward()
        gradients.append({name: parameter.grad.clone() for name, parameter in adapter.named_parameters()})
    for name, gradient in gradients[0].items():
        assert torch.allclose(gradients[1][name], gradient, atol=1e-7, rtol=1e-5), name
    assert not any("forward" in vars(layer) for layer in base.diffusion_model.modules())


def test_v_prediction_target_inverts_comfy_sampling():
    generator = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    sigma = torch.tensor([0.03, 1.0, 14.6])
    alpha_bar = (1.0 / (1.0 + sigma ** 2)).reshape(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * x0
    target = objective_target("v", x0, noise, sigma)
    assert torch.allclose(target, expected, atol=1e-6)

    sampling = comfy.model_sampling.V_PREDICTION()
    sampling.sigma_data = 1.0
    denoised = sampling.calculate_denoised(sigma, target, x0 + sigma.reshape(-1, 1, 1, 1) * noise)
    assert torch.allclose(denoised, x0, atol=1e-4)
    assert torch.equal(objective_target("eps", x0, noise, sigma), noise)
    with pytest.raises(ValueError, match="epsilon and v-prediction"):
        objective_target("flow", x0, noise, sigma)


def test_training_lowers_loss(full_run):
    result, _ = full_run
    assert len(result.losses) == 200
    first = float(np.mean(result.losses[:20]))
    last = float(np.mean(result.losses[-20:]))
    print(f"mean loss of steps 1-20: {first:.5f}; of steps 181-200: {last:.5f}; "
          f"{result.samples_per_second:.1f} samples/s")
    assert last < 0.95 * first


def test_resume_matches_uninterrupted_run(full_run, dataset, tmp_path, caplog):
    result, _ = full_run
    output = str(tmp_path / "resumed")
    stopped = train_tiny(tiny_config(dataset, output, max_steps=100))
    assert stopped.step == 100
    assert os.path.isfile(os.path.join(output, RESUME_FILE))

    with caplog.at_level(logging.INFO, logger="dreamcache_core.train"):
        resumed = train_tiny(tiny_config(dataset, output, max_steps=200))
    assert "Resuming from" in caplog.text
    assert len(resumed.losses) == 100
    assert resumed.losses == result.losses[100:]
    expected = adapter_state(result.adapter)
    for key, tensor in adapter_state(resumed.adapter).items():
        assert torch.equal(tensor, expected[key]), key


def test_resume_rejects_other_settings(full_run, dataset):
    _, output = full_run
    with pytest.raises(ValueError, match=r"different run \(seed: saved 0, now 7"):
        train_tiny(tiny_config(dataset, output, max_steps=300, seed=7))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


WORKER = """
import json
import sys
comfy_path, repo_root, tests_dir, data, output = sys.argv[1:]
sys.path[:0] = [comfy_path, repo_root, tests_dir]
import comfy.options
comfy.options.enable_args_parsing(False)
from comfy.cli_args import args
args.cpu = True
args.use_pytorch_cross_attention = True
import logging
logging.basicConfig(level=logging.INFO)
import torch
torch.set_num_threads(1)
import test_train
result = test_train.train_tiny(test_train.tiny_config(data, output, micro_batch=2, max_steps=10, save_every=0,
                                                      learning_rate=1e-5))
print("LOSSES", json.dumps(result.losses))
"""


def test_two_gloo_processes_match_one(dataset, tmp_path):
    single = train_tiny(tiny_config(dataset, str(tmp_path / "single"), micro_batch=4, max_steps=10, save_every=0,
                                    learning_rate=1e-5))

    output = str(tmp_path / "ddp")
    environment = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
                       GLOO_SOCKET_IFNAME="lo", PYTHONPATH="")
    arguments = [sys.executable, "-c", WORKER, os.environ["COMFYUI_PATH"], REPO_ROOT, TESTS_DIR, dataset, output]
    workers = [subprocess.Popen(arguments, env=dict(environment, RANK=str(rank), LOCAL_RANK=str(rank)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = []
    for rank, worker in enumerate(workers):
        log, _ = worker.communicate(timeout=180)
        assert worker.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
        logs.append(log)
    assert "Joined gloo process group as rank 0 of 2" in logs[0]
    assert "Joined gloo process group as rank 1 of 2" in logs[1]

    distributed = load_adapter(os.path.join(output, "adapter.safetensors"))
    expected = single.adapter.released_state_dict()
    differences = [float((tensor - expected[key].cpu()).abs().max())
                   for key, tensor in distributed.released_state_dict().items()]
    assert max(differences) <= 1e-6, max(differences)
    # The ten steps moved the weights (linear_cat's bias starts at zero), so equal weights are not
    # just the shared starting point.
    moved = expected["diffusion_model.output_blocks.10.1.transformer_blocks.0.linear_cat.bias"]
    assert float(moved.abs().max()) > 2e-5

    # Both ranks log the loss averaged over the global batch, equal to the single process's.
    for log in logs:
        losses = json.loads(log.split("LOSSES ", 1)[1].splitlines()[0])
        assert np.allclose(losses, single.losses, rtol=1e-5, atol=0), (losses, single.losses)


def load_node_class(relative_path: str, class_name: str):
    """Import one node module from the pack by file path (ComfyUI's own ``nodes`` module shadows ours)."""
    spec = importlib.util.spec_from_file_location(f"dreamcache_test_{class_name}", os.path.join(REPO_ROOT,
                                                                                                relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)


def sample(model_patcher, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    positive = [[torch.randn(1, 77, 1024, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 1024, generator=generator), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model_patcher, noise, 4, 3.0, "euler", "normal", positive, negative, latent,
                               seed=seed, disable_pbar=True)


def test_trained_adapter_samples_with_ksampler(full_run, monkeypatch):
    import folder_paths

    result, output = full_run
    path = os.path.join(output, "adapter.safetensors")
    adapter = load_adapter(path)
    expected = result.adapter.released_state_dict()
    for key, tensor in adapter.released_state_dict().items():
        assert torch.equal(tensor, expected[key].cpu()), key
    assert os.path.isfile(os.path.join(output, "adapter-000100.safetensors"))

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "dreamcache", ([output], {".safetensors"}))
    loader = load_node_class("nodes/adapter_loader.py", "DreamCacheAdapterLoader")
    (from_node,) = loader().load("adapter.safetensors")
    assert torch.equal(from_node.blocks[0].linear_cat.weight, adapter.blocks[0].linear_cat.weight)

    model_patcher = tiny_models.tiny_model("sd2")
    image, _, _ = shape_image(0)
    cache = build_cache(model_patcher, StandInVAE(), torch.from_numpy(image[None]).float() / 255.0,
                        resolution=RESOLUTION)
    patched = apply_dreamcache(model_patcher, adapter, cache)
    stock = sample(model_patcher)
    personalised = sample(patched)
    assert torch.isfinite(personalised).all()
    assert float((personalised - stock).abs().max()) > 1e-4


def write_bad_files(root: str) -> None:
    write_released_dataset(root, count=4)
    os.remove(os.path.join(root, "object01", "s0_caption.txt"))
    with open(os.path.join(root, "object02", "s0_generation.png"), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("L", (32, 48), 255).save(os.path.join(root, "object03", "s0_mask.png"))


def test_bad_files_are_reported_and_skipped(tmp_path, caplog):
    root = str(tmp_path / "bad")
    write_bad_files(root)
    with caplog.at_level(logging.WARNING, logger="dreamcache_core.train"):
        records = discover_samples(root)
        assert [record.name for record in records] == ["object00/s0_generation.png", "object02/s0_generation.png",
                                                       "object03/s0_generation.png"]
        samples = TrainingSamples(records, seed=0, augmentation=ReferenceAugmentation(resolution=RESOLUTION))
        names = {samples[position]["name"] for position in range(12)}
    assert names == {"object00/s0_generation.png"}
    messages = caplog.text
    assert "object01/s0_generation.png: missing s0_caption.txt" in messages
    assert "object02/s0_generation.png: cannot read image" in messages
    assert "object03/s0_generation.png: mask" in messages
    assert "is 32x48 but its image is 64x64" in messages
    assert messages.count("object02/s0_generation.png: cannot read image") == 1

    result = train_tiny(tiny_config(root, str(tmp_path / "out"), micro_batch=2, max_steps=2, save_every=0))
    assert len(result.losses) == 2
    assert all(np.isfinite(result.losses))


def test_plain_layout_reads_captions_and_masks(tmp_path, caplog):
    root = tmp_path / "plain"
    (root / "masks").mkdir(parents=True)
    lines = []
    for index in range(3):
        image, mask, caption = shape_image(index)
        Image.fromarray(image).save(root / f"{index}.png")
        lines.append(json.dumps({"file": f"{index}.png", "caption": caption}))
    Image.fromarray(shape_image(0)[1], mode="L").save(root / "masks" / "0.png")
    Image.fromarray(shape_image(3)[0]).save(root / "uncaptioned.png")
    lines.append(json.dumps({"file": "gone.png", "caption": "missing"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="dreamcache_core.train"):
        records = discover_samples(str(root))
    assert [(record.name, record.mask_path is not None, record.caption) for record in records] == [
        ("0.png", True, "a red square"), ("1.png", False, "a green square"), ("2.png", False, "a blue square")]
    assert "uncaptioned.png: missing caption" in caplog.text
    assert "gone.png has no image file" in caplog.text

    (root / "captions.jsonl").unlink()
    (root / "captions.txt").write_text("0.png\ta red square\n1.png\ta green square\n", encoding="utf-8")
    assert [record.caption for record in discover_samples(str(root))] == ["a red square", "a green square"]


def test_reference_processing_is_seeded(dataset):
    records = discover_samples(dataset)
    settings = ReferenceAugmentation(resolution=RESOLUTION)
    first = TrainingSamples(records, seed=0, augmentation=settings)
    again = TrainingSamples(records, seed=0, augmentation=settings)
    other_seed = TrainingSamples(records, seed=1, augmentation=settings)
    for position in (0, 5, 13):
        assert torch.equal(first[position]["reference"], again[position]["reference"])
        assert first[position]["name"] == again[position]["name"]
    assert not torch.equal(first[3]["reference"], other_seed[3]["reference"])

    sample = first[0]
    assert sample["reference"].shape == (3, RESOLUTION, RESOLUTION)
    assert sample["target"].shape == (3, RESOLUTION, RESOLUTION)
    assert float(sample["reference"].min()) >= -1.0
    assert float(sample["reference"].max()) <= 1.0
    # The background is painted white and the object is pasted on a white canvas, so white
    # (1.0 in [-1, 1]) covers more of the reference than of the target, whose background is a colour.
    white = (sample["reference"] > 0.99).all(dim=0).float().mean()
    assert float(white) > float((sample["target"] > 0.99).all(dim=0).float().mean()) + 0.2

    # One pass over the data per epoch: positions 0-7 read each of the 8 records once.
    assert sorted(first.record_index(position) for position in range(8)) == list(range(8))

    dropped = TrainingSamples(records, seed=0, augmentation=settings, caption_dropout=1.0)
    assert dropped[0]["caption"] == ""


def test_sdxl_sites_and_steps(dataset, tmp_path):
    try:
        model_patcher = tiny_models.tiny_model("sdxl")
    except KeyError:
        pytest.skip("tiny_models has no SDXL layout")
    fingerprint = model_fingerprint(model_patcher)
    sites = adapter_sites(fingerprint, model_patcher.model.diffusion_model, all_inner_blocks=True)
    paths = [site.layer.path for site in sites]
    assert sorted(set(paths)) == ["middle_block.1", "output_blocks.1.1", "output_blocks.3.1", "output_blocks.5.1"]
    depths = {path: len(model_patcher.model.diffusion_model.get_submodule(path).transformer_blocks) for path in paths}
    assert len(sites) == sum(depths.values())

    result = train_tiny(tiny_config(dataset, str(tmp_path / "sdxl"), micro_batch=2, max_steps=2, save_every=0,
                                    all_inner_blocks=True), family="sdxl")
    assert all(np.isfinite(result.losses))
    saved = load_adapter(result.adapter_path)
    assert [site.layer.path for site in saved.sites] == paths


def test_command_line_trains_from_checkpoint(dataset, tmp_path, monkeypatch):
    import comfy.sd
    from dreamcache_core.train.__main__ import main

    loads = []

    def load_tiny_checkpoint(path, output_vae=True, output_clip=True, embedding_directory=None, model_options=None,
                             **unused):
        loads.append((path, model_options))
        return tiny_models.tiny_model("sd2"), StandInTextEncoder(1024), StandInVAE(), None

    monkeypatch.setattr(comfy.sd, "load_checkpoint_guess_config", load_tiny_checkpoint)
    output = tmp_path / "cli"
    main(["--checkpoint", "base.safetensors", "--data", dataset, "--output", str(output),
          "--comfyui-path", os.environ["COMFYUI_PATH"], "--resolution", str(RESOLUTION), "--batch-size", "2",
          "--max-steps", "2", "--num-workers", "1", "--preview-every", "2", "--gradient-checkpointing"])
    assert loads == [("base.safetensors", {"dtype": torch.float32})]
    assert (output / "resume.pt").is_file()
    assert (output / "adapter-000002.safetensors").is_file()
    assert (output / "previews" / "step-000002.png").is_file()
    with Image.open(output / "previews" / "step-000002.png") as preview:
        assert preview.size == (3 * RESOLUTION, RESOLUTION)
    assert load_adapter(str(output / "adapter.safetensors")).fingerprint.family == "sd2"

    with pytest.raises(SystemExit, match="ComfyUI not found"):
        main(["--checkpoint", "base.safetensors", "--data", dataset, "--output", str(output),
              "--comfyui-path", str(tmp_path / "no-comfyui")])


def test_hue_shift_matches_colorsys():
    import colorsys

    from dreamcache_core.train.augment import shift_hue

    generator = torch.Generator().manual_seed(8)
    image = torch.rand(3, 6, 7, generator=generator)
    image[:, 0, 0] = torch.tensor([0.5, 0.5, 0.5])
    shifted = shift_hue(image, 0.13)
    for row in range(image.shape[1]):
        for column in range(image.shape[2]):
            hue, saturation, value = colorsys.rgb_to_hsv(*image[:, row, column].tolist())
            expected = colorsys.hsv_to_rgb((hue + 0.13) % 1.0, saturation, value)
            assert torch.allclose(shifted[:, row, column], torch.tensor(expected), atol=1e-5), (row, column)
