"""One training micro-batch: the no-grad preparation and the differentiable loss.

Per sample at global position p, with generators seeded by (seed, p): t uniform over the
schedule's timesteps (0-999 for SD), target noise, and the caching pass's reference noise.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..adapter import DreamCacheAdapter
from .augment import sample_generator
from .live_patch import TrainingPatch
from .model import FrozenBase, TextConditioner, objective_target


@dataclasses.dataclass
class PreparedBatch:
    """Everything the loss needs for one micro-batch, on the training device.

    ``x0``, ``noise`` and ``noisy`` are B x C x h x w latents, ``sigma`` is B, ``context`` is
    B x T x D, ``extra`` contains SDXL's ``y``, and ``memory`` maps layer paths to B x N x C tokens.
    """

    x0: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    sigma: torch.Tensor
    context: torch.Tensor
    extra: dict
    memory: dict


def draw_sample_randomness(seed: int, positions: list[int], latent_shape: tuple[int, ...],
                           timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (t: B long, target noise: B x latent_shape, reference noise: B x latent_shape) for ``positions``."""
    steps, noises, reference_noises = [], [], []
    for position in positions:
        generator = sample_generator(seed, "diffusion", position)
        steps.append(torch.randint(0, timesteps, (), generator=generator))
        noises.append(torch.randn(latent_shape, generator=generator))
        reference_noises.append(torch.randn(latent_shape, generator=generator))
    return torch.stack(steps), torch.stack(noises), torch.stack(reference_noises)


def prepare_batch(base: FrozenBase, text: TextConditioner, batch: dict, seed: int) -> PreparedBatch:
    """Encode a collated data batch, run the caching pass and noise the targets (all without gradient)."""
    positions = [int(position) for position in batch["position"]]
    x0 = base.encode_images(batch["target"])
    reference_latent = base.encode_images(batch["reference"])
    timestep, noise, reference_noise = draw_sample_randomness(seed, positions, tuple(x0.shape[1:]), base.timesteps)
    sigma = base.sigmas_at(timestep)

    context, extra = text.encode(list(batch["caption"]))
    empty_context, empty_extra = text.encode([""] * len(positions))
    base.load()
    memory = base.reference_memory(reference_latent, reference_noise, empty_context, empty_extra)

    device = base.device
    noisy = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    return PreparedBatch(x0=x0.to(device), noise=noise.to(device), noisy=noisy.to(device), sigma=sigma.to(device),
                         context=context.to(device), extra={key: value.to(device) for key, value in extra.items()},
                         memory=memory)


class AdapterObjective(nn.Module):
    """The trainable part of a run: the adapter, and the loss of the frozen U-Net patched with it.

    Only the adapter is a submodule, so DistributedDataParallel syncs the adapter alone and never
    broadcasts the base model.
    """

    def __init__(self, adapter: DreamCacheAdapter, base: FrozenBase):
        super().__init__()
        self.adapter = adapter
        self.base = base

    def forward(self, batch: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean squared error over C x h x w, then over the batch; denoised x0 estimate, detached)."""
        patch = TrainingPatch(self.adapter, batch.memory)
        base_options = self.base.model_patcher.model_options.get("transformer_options", {})
        output = self.base.predict(batch.noisy, batch.sigma, batch.context, batch.extra,
                                   patch.transformer_options(base_options))
        target = objective_target(self.base.fingerprint.prediction, batch.x0, batch.noise, batch.sigma)
        loss = (output - target).pow(2).mean(dim=tuple(range(1, output.ndim))).mean()
        denoised = self.base.denoised(batch.sigma, output.detach(), batch.noisy)
        return loss, denoised
