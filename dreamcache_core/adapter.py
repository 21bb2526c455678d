"""The DreamCache adapter: the modules added to each memory transformer block, and their math.

Per memory block of width C, with hidden tokens x (B x N x C), the stock self-attention output
a = attn1(norm1(x)) (B x N x C) and memory tokens M (B_m x N_m x C, the raw layer input taken
before GroupNorm and proj_in), the released block computes

    m = attn_mem(norm2_mem(x), M)               # q from x, k and v from M
    x = x + linear_cat([a ; m])                 # replaces the stock x + a

and then the stock cross-attention and feed-forward. ``linear_cat`` is affine, so with
W_a, W_m the first and last C input columns of its weight and b its bias,
linear_cat([a ; m]) = W_a a + W_m m + b.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Fingerprint, MemoryLayer

NORM_EPS = 1e-5


class MemoryAttention(nn.Module):
    """Multi-head attention from generated tokens (queries) to memory tokens (keys and values).

    Parameter names match the released checkpoint: ``to_q``, ``to_k``, ``to_v`` without bias and
    ``to_out.0`` with bias (``to_out.1`` is a parameter-free dropout of rate 0).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])


class AdapterBlock(nn.Module):
    """``norm2_mem``, ``attn_mem`` and ``linear_cat`` of one memory transformer block."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.norm2_mem = nn.LayerNorm(channels, eps=NORM_EPS)
        self.attn_mem = MemoryAttention(channels)
        self.linear_cat = nn.Linear(2 * channels, channels)

    def reset_to_identity(self) -> None:
        """Set ``linear_cat`` to [I | 0] with zero bias, so the block starts equal to the stock block."""
        with torch.no_grad():
            self.linear_cat.weight.zero_()
            self.linear_cat.weight[:, :self.channels].copy_(torch.eye(self.channels))
            self.linear_cat.bias.zero_()


@dataclasses.dataclass(frozen=True)
class AdapterSite:
    """One adapter position: a memory layer and the inner transformer block inside it."""

    layer: MemoryLayer
    block_index: int = 0

    @property
    def key_prefix(self) -> str:
        return f"diffusion_model.{self.layer.path}.transformer_blocks.{self.block_index}."


class DreamCacheAdapter(nn.Module):
    """All adapter blocks of one base model, keyed by the released checkpoint's key names."""

    def __init__(self, fingerprint: Fingerprint, sites: tuple[AdapterSite, ...] | None = None):
        super().__init__()
        if sites is None:
            sites = tuple(AdapterSite(layer) for layer in fingerprint.layers)
        self.fingerprint = fingerprint
        self.sites = tuple(sites)
        self.blocks = nn.ModuleList([AdapterBlock(site.layer.channels) for site in self.sites])

    def block_for(self, block: tuple[str, int], block_index: int) -> AdapterBlock | None:
        for site, module in zip(self.sites, self.blocks):
            if site.layer.block == block and site.block_index == block_index:
                return module
        return None

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the weights under the released key names (``diffusion_model.<path>...``)."""
        state = {}
        for site, module in zip(self.sites, self.blocks):
            for name, tensor in module.state_dict().items():
                state[site.key_prefix + name] = tensor
        return state

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(tensor.shape) for key, tensor in self.released_state_dict().items()}

    def load_released_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights from released key names; the caller has validated keys and shapes."""
        for site, module in zip(self.sites, self.blocks):
            local = {name[len(site.key_prefix):]: tensor for name, tensor in state.items()
                     if name.startswith(site.key_prefix)}
            module.load_state_dict(local, strict=True)

    def reset_to_identity(self) -> None:
        for module in self.blocks:
            module.reset_to_identity()


def parameter_count(channels: int) -> int:
    """Return the parameters of one adapter block of width C: 6 C^2 + 4 C."""
    return 6 * channels * channels + 4 * channels


@dataclasses.dataclass(frozen=True)
class BlockWeights:
    """One adapter block's weights as plain tensors on one device and dtype.

    ``cat_a`` and ``cat_m`` are the columns of ``linear_cat.weight`` that multiply the
    self-attention output and the memory-attention output.
    """

    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    to_q: torch.Tensor
    to_k: torch.Tensor
    to_v: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    cat_a: torch.Tensor
    cat_m: torch.Tensor
    cat_bias: torch.Tensor

    @staticmethod
    def from_module(module: AdapterBlock, device=None, dtype=None) -> "BlockWeights":
        channels = module.channels

        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().to(device=device, dtype=dtype)

        weight = module.linear_cat.weight
        return BlockWeights(norm_weight=cast(module.norm2_mem.weight), norm_bias=cast(module.norm2_mem.bias),
                            to_q=cast(module.attn_mem.to_q.weight), to_k=cast(module.attn_mem.to_k.weight),
                            to_v=cast(module.attn_mem.to_v.weight),
                            out_weight=cast(module.attn_mem.to_out[0].weight),
                            out_bias=cast(module.attn_mem.to_out[0].bias),
                            cat_a=cast(weight[:, :channels]), cat_m=cast(weight[:, channels:]),
                            cat_bias=cast(module.linear_cat.bias))


def memory_keys_values(weights: BlockWeights, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project memory tokens M (B_m x N_m x C) to keys and values (each B_m x N_m x C).

    They depend only on the cache and the adapter, so callers compute them once per sampling run.
    """
    return F.linear(memory, weights.to_k), F.linear(memory, weights.to_v)


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        attn_precision: torch.dtype | None = None) -> torch.Tensor:
    """Return softmax attention of q (B x N x C) over k, v (B or 1 x N_m x C), as B x N x C.

    With ``attn_precision`` float32 the attention runs in float32 and the result is cast back,
    as ComfyUI does for blocks that ask for it.
    """
    batch, tokens, channels = q.shape
    dim_head = channels // heads
    out_dtype = q.dtype
    if attn_precision == torch.float32 and q.dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, dim_head).transpose(1, 2).expand(batch, -1, -1, -1)

    out = F.scaled_dot_product_attention(split_heads(q), split_heads(k), split_heads(v))
    return out.transpose(1, 2).reshape(batch, tokens, channels).to(out_dtype)


def memory_attention_output(weights: BlockWeights, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            heads: int, attn_precision: torch.dtype | None = None) -> torch.Tensor:
    """Return m = attn_mem(norm2_mem(x), M) for hidden tokens x (B x N x C), as B x N x C."""
    normed = F.layer_norm(x, (x.shape[-1],), weights.norm_weight, weights.norm_bias, NORM_EPS)
    q = F.linear(normed, weights.to_q)
    attended = multihead_attention(q, keys, values, heads, attn_precision)
    return F.linear(attended, weights.out_weight, weights.out_bias)


def fused_residual_delta(weights: BlockWeights, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Return linear_cat([a ; m]) - a: what the memory block adds over the stock x + a."""
    return F.linear(a, weights.cat_a, weights.cat_bias) + F.linear(m, weights.cat_m) - a
