"""An independent computation of the released memory block and helpers shared by the unit tests.

Everything here uses plain tensor operations (its own LayerNorm, its own per-head softmax
attention, matmuls), so it does not share code with ``dreamcache_core.adapter``. It works in
float64 so that it serves as ground truth for float32 results.
"""

from __future__ import annotations

import math

import torch

from dreamcache_core.adapter import DreamCacheAdapter
from dreamcache_core.cache import SubjectCache
from dreamcache_core.layers import Fingerprint, memory_layers

LAYER_NORM_EPS = 1e-5

# The suffixes of the nine tensors of one adapter block, in the released checkpoint's names.
BLOCK_SUFFIXES = ("attn_mem.to_q.weight", "attn_mem.to_k.weight", "attn_mem.to_v.weight",
                  "attn_mem.to_out.0.weight", "attn_mem.to_out.0.bias", "linear_cat.weight", "linear_cat.bias",
                  "norm2_mem.weight", "norm2_mem.bias")


def reference_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Normalize x (... x C) over its last axis with the biased variance, then scale and shift."""
    mean = x.sum(dim=-1, keepdim=True) / x.shape[-1]
    centred = x - mean
    variance = (centred * centred).sum(dim=-1, keepdim=True) / x.shape[-1]
    return centred / torch.sqrt(variance + LAYER_NORM_EPS) * weight + bias


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention of q (B x N x C) over k, v (B x N_m x C), one head at a time, as B x N x C."""
    dim_head = q.shape[-1] // heads
    outputs = []
    for head in range(heads):
        columns = slice(head * dim_head, (head + 1) * dim_head)
        scores = q[..., columns] @ k[..., columns].transpose(-1, -2) / math.sqrt(dim_head)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probabilities = torch.exp(scores)
        probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
        outputs.append(probabilities @ v[..., columns])
    return torch.cat(outputs, dim=-1)


def reference_block_parameters(adapter_block) -> dict[str, torch.Tensor]:
    """Return an AdapterBlock's tensors under their released suffixes, as float64 copies."""
    return {name: tensor.detach().double().clone() for name, tensor in adapter_block.state_dict().items()}


def reference_memory_attention(x: torch.Tensor, memory: torch.Tensor, parameters: dict[str, torch.Tensor],
                               heads: int) -> torch.Tensor:
    """Return m = attn_mem(norm2_mem(x), M) for x (B x N x C) and M (B or 1 x N_m x C) in float64."""
    x = x.double()
    memory = memory.double().expand(x.shape[0], -1, -1)
    normed = reference_layer_norm(x, parameters["norm2_mem.weight"], parameters["norm2_mem.bias"])
    q = normed @ parameters["attn_mem.to_q.weight"].T
    k = memory @ parameters["attn_mem.to_k.weight"].T
    v = memory @ parameters["attn_mem.to_v.weight"].T
    attended = reference_attention(q, k, v, heads)
    return attended @ parameters["attn_mem.to_out.0.weight"].T + parameters["attn_mem.to_out.0.bias"]


def reference_released_block(x: torch.Tensor, a: torch.Tensor, memory: torch.Tensor,
                             parameters: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """Return the released block's x + linear_cat([a ; m]) in float64 (the stock block has x + a)."""
    m = reference_memory_attention(x, memory, parameters, heads)
    fused = torch.cat([a.double(), m], dim=-1) @ parameters["linear_cat.weight"].T + parameters["linear_cat.bias"]
    return x.double() + fused


def tiny_fingerprint(family: str = "sd2", model_channels: int = 8, prediction: str = "eps") -> Fingerprint:
    """Return a fingerprint with the stock layer layout of ``family`` at a small base width.

    With model_channels 8 the SD layers are 32, 32, 16, 16 and 8 channels wide.
    """
    context_dims = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
    channel_mult = (1, 2, 4) if family == "sdxl" else (1, 2, 4, 4)
    return Fingerprint(family=family, context_dim=context_dims[family], prediction=prediction,
                       layers=memory_layers(family, model_channels, channel_mult))


def randomize_adapter(adapter: DreamCacheAdapter, seed: int) -> DreamCacheAdapter:
    """Fill every adapter tensor with seeded random values of a scale that keeps activations near 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            values = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 2:
                values = values / math.sqrt(parameter.shape[1])
            elif name.endswith("norm2_mem.weight"):
                values = 1.0 + 0.2 * values
            else:
                values = 0.1 * values
            parameter.copy_(values)
    return adapter


def random_adapter(fingerprint: Fingerprint, seed: int = 0, sites=None) -> DreamCacheAdapter:
    adapter = randomize_adapter(DreamCacheAdapter(fingerprint, sites), seed)
    return adapter.eval().requires_grad_(False)


def random_cache(fingerprint: Fingerprint, seed: int = 0, tokens: int = 6, items: int = 1,
                 label: str = "subject") -> SubjectCache:
    """Return a cache of fp16 random memory tokens, ``items x tokens x channels`` per layer."""
    generator = torch.Generator().manual_seed(seed)
    memory = {layer.path: torch.randn(items, tokens, layer.channels, generator=generator).half()
              for layer in fingerprint.layers}
    info = {"reference_count": "1", "reference_resolution": "512", "reference_mode": "single",
            "sigma": "14.6146", "caching_prompt": "", "seed": str(seed), "created": "2025-01-01T00:00:00+00:00",
            "label": label}
    return SubjectCache(fingerprint=fingerprint, memory=memory, info=info)
