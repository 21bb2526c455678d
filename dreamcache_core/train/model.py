"""The frozen base model of adapter training (ComfyUI U-Net, VAE and text encoder) and the new adapter.

Only the adapter trains. The base model comes from a ComfyUI checkpoint file, loaded with
``comfy.sd.load_checkpoint_guess_config``, or from objects the caller built: a ModelPatcher, a
VAE-like object (``encode(B x H x W x 3 in [0, 1]) -> latent``, ``decode(latent) -> image``) and a
CLIP-like object (``tokenize(text)``, ``encode_from_tokens(tokens, return_pooled=True)``).
ComfyUI is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from ..adapter import AdapterSite, DreamCacheAdapter
from ..builder import caching_sigma, capture_memory, extra_conditioning
from ..layers import Fingerprint

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_checkpoint_components(path: str, mixed_precision: str = "no"):
    """Load (model_patcher, vae, clip) from a ComfyUI checkpoint, with U-Net weights in the training dtype."""
    import comfy.sd

    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"Unknown mixed precision {mixed_precision!r}; use one of {MIXED_PRECISION}.")
    logger.info("Loading base checkpoint %s (U-Net weights %s)", path, WEIGHT_DTYPES[mixed_precision])
    model_patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=None,
        model_options={"dtype": WEIGHT_DTYPES[mixed_precision]})
    if model_patcher is None or clip is None or vae is None:
        raise ValueError(
            f"Checkpoint {path!r} lacks a U-Net, a VAE or a text encoder; DreamCache training needs a full "
            "SD 1.x, SD 2.x or SDXL checkpoint.")
    return model_patcher, vae, clip


def adapter_sites(fingerprint: Fingerprint, diffusion_model, all_inner_blocks: bool = False) -> tuple[AdapterSite, ...]:
    """Return one site per memory layer (inner block 0), or one per inner block with ``all_inner_blocks``."""
    sites = []
    for layer in fingerprint.layers:
        depth = len(diffusion_model.get_submodule(layer.path).transformer_blocks) if all_inner_blocks else 1
        sites.extend(AdapterSite(layer, index) for index in range(depth))
    return tuple(sites)


def new_adapter(fingerprint: Fingerprint, sites: tuple[AdapterSite, ...], seed: int) -> DreamCacheAdapter:
    """Return a trainable adapter: PyTorch default init from ``seed``, then ``linear_cat`` = [I | 0], bias 0.

    With that ``linear_cat`` every block returns x + a whatever the memory, so step 0 is the base model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = DreamCacheAdapter(fingerprint, sites)
    adapter.reset_to_identity()
    return adapter.train().requires_grad_(True)


def stack_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate 1 x T_i x D text contexts to B x T x D, repeating each to the LCM of the T_i as ComfyUI does."""
    lengths = [context.shape[1] for context in contexts]
    common = math.lcm(*lengths)
    return torch.cat([context.repeat(1, common // context.shape[1], 1) for context in contexts], dim=0)


class TextConditioner:
    """Encode captions with the frozen text encoder; also builds SDXL's ``y`` vector."""

    def __init__(self, clip, base_model, fingerprint: Fingerprint, resolution: int):
        self.clip = clip
        self.base_model = base_model
        self.fingerprint = fingerprint
        self.resolution = resolution
        self._empty = None

    def encode_one(self, caption: str) -> tuple[torch.Tensor, dict]:
        if caption == "" and self._empty is not None:
            return self._empty
        with torch.no_grad():
            context, pooled = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True)
            extra = extra_conditioning(self.base_model, self.fingerprint.family, pooled, self.resolution)
        if context.shape[-1] != self.fingerprint.context_dim:
            raise ValueError(
                f"The text encoder gives {context.shape[-1]}-wide contexts but the U-Net expects "
                f"{self.fingerprint.context_dim}; use the text encoder of the same checkpoint.")
        encoded = (context.float().cpu(), {key: value.float().cpu() for key, value in extra.items()})
        if caption == "":
            self._empty = encoded
        return encoded

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, dict]:
        """Return contexts (B x T x D) and extra U-Net inputs (SDXL: ``y``, B x 2816) on the CPU."""
        encoded = [self.encode_one(caption) for caption in captions]
        context = stack_contexts([item[0] for item in encoded])
        extra = {key: torch.cat([item[1][key] for item in encoded], dim=0) for key in encoded[0][1]}
        return context, extra


class FrozenBase:
    """The frozen U-Net, VAE and sampling schedule of one training run, on the model's load device."""

    def __init__(self, model_patcher, vae, fingerprint: Fingerprint):
        self.model_patcher = model_patcher
        self.vae = vae
        self.fingerprint = fingerprint
        self.base_model = model_patcher.model
        self.diffusion_model = self.base_model.diffusion_model
        self.model_sampling = model_patcher.get_model_object("model_sampling")
        self.device = torch.device(model_patcher.load_device)
        self.dtype = self.base_model.manual_cast_dtype or self.base_model.get_dtype()
        self.layer_paths = [layer.path for layer in fingerprint.layers]
        self.base_model.requires_grad_(False)
        for frozen in (getattr(vae, "first_stage_model", None),):
            if isinstance(frozen, torch.nn.Module):
                frozen.requires_grad_(False)

    @property
    def timesteps(self) -> int:
        return int(self.model_sampling.sigmas.shape[0])

    def load(self) -> None:
        """Put the whole U-Net on its device (ComfyUI may have offloaded it while the VAE ran)."""
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.model_patcher], force_full_load=True)

    def sigmas_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.model_sampling.sigmas.detach().float().cpu()[timesteps]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encode B x 3 x H x W images in [-1, 1] to scaled latents (after ``process_latent_in``), float32 on CPU."""
        pixels = ((images + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
        with torch.no_grad():
            latent = self.vae.encode(pixels).float().cpu().clone()
            return self.base_model.process_latent_in(latent)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents to B x H x W x 3 images in [0, 1] on the CPU."""
        with torch.no_grad():
            return self.vae.decode(self.base_model.process_latent_out(latents.float().cpu())).float().cpu()

    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, extra: dict,
                transformer_options: dict) -> torch.Tensor:
        """Return the U-Net's raw output (epsilon or v) as float32, with ComfyUI's input scaling.

        ``noisy`` = x0 + sigma * noise (B x C x h x w) and ``sigma`` (B) are on the device.
        """
        model_input = self.model_sampling.calculate_input(sigma, noisy).to(self.dtype)
        timestep = self.model_sampling.timestep(sigma).float()
        extra = {key: value.to(device=self.device, dtype=self.dtype) for key, value in extra.items()}
        output = self.diffusion_model(model_input, timestep, context=context.to(device=self.device, dtype=self.dtype),
                                      transformer_options=transformer_options, **extra)
        return output.float()

    def denoised(self, sigma: torch.Tensor, output: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        return self.model_sampling.calculate_denoised(sigma, output, noisy)

    def reference_memory(self, reference_latent: torch.Tensor, noise: torch.Tensor, context: torch.Tensor,
                         extra: dict) -> dict[str, torch.Tensor]:
        """Run the caching pass: noise the reference at sigmas[1] (t = 1) and record each memory layer's input.

        No patch is active and no gradient is kept, so this is the stock model, as at inference.
        Returns B x N x C tokens per layer path, on the device in the U-Net's dtype.
        """
        sigma = caching_sigma(self.model_sampling)
        sigma_batch = sigma.expand(reference_latent.shape[0]).to(self.device)
        noisy = (reference_latent + sigma * noise).to(self.device)

        def run():
            self.predict(noisy, sigma_batch, context, extra, transformer_options={})

        with torch.no_grad():
            return capture_memory(self.diffusion_model, self.layer_paths, run)


def objective_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Return the regression target: epsilon, or v = (noise - sigma * x0) / sqrt(sigma^2 + 1).

    With alpha_bar = 1 / (sigma^2 + 1) the v target is sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0,
    which is what ComfyUI's V_PREDICTION sampling inverts.
    """
    if prediction == "eps":
        return noise
    if prediction == "v":
        sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
        return (noise - sigma * x0) / (sigma ** 2 + 1.0).sqrt()
    raise ValueError(f"Training supports epsilon and v-prediction checkpoints, not {prediction!r}.")


def checkpointed(forward):
    """Wrap a layer's ``forward`` in non-reentrant activation checkpointing.

    ComfyUI's U-Net rewrites one shared ``transformer_options`` dict as it walks the blocks. Every
    dict argument is therefore copied at call time, so the recomputation in backward runs with
    the options of its own block, not those of the last block.
    """
    def run(*args, **kwargs):
        args = [dict(value) if isinstance(value, dict) else value for value in args]
        kwargs = {key: dict(value) if isinstance(value, dict) else value for key, value in kwargs.items()}

        def call():
            return forward(*[dict(value) if isinstance(value, dict) else value for value in args],
                           **{key: dict(value) if isinstance(value, dict) else value for key, value in kwargs.items()})

        return torch.utils.checkpoint.checkpoint(call, use_reentrant=False)
    return run


@contextlib.contextmanager
def decoder_gradient_checkpointing(diffusion_model, enabled: bool = True):
    """Recompute the activations of the middle block and the decoder in backward instead of storing them.

    Only those blocks need activations for the adapter's gradient: the encoder runs before the first
    memory layer. Each ResBlock and SpatialTransformer is wrapped while the context is open.
    """
    wrapped = []
    if enabled:
        for block in [diffusion_model.middle_block, *diffusion_model.output_blocks]:
            for layer in block:
                if type(layer).__name__ in ("ResBlock", "SpatialTransformer"):
                    layer.forward = checkpointed(layer.forward)
                    wrapped.append(layer)
    try:
        yield
    finally:
        for layer in wrapped:
            del layer.forward
