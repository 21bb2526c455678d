"""The DreamCache block patch for training: same math as inference, weights read live from the adapter.

:class:`dreamcache_core.patch.DreamCachePatch` precomputes detached weight copies once per sampling
run, which cuts the gradient. This patch hooks the same two ComfyUI patch lists
(``attn1_output_patch`` stashes a, ``middle_patch`` adds linear_cat([a ; m]) - a) and calls the
same functions from :mod:`dreamcache_core.adapter`. It builds :class:`BlockWeights` from the
adapter's parameters on every block call, so the loss reaches them. Training uses strength 1, no
mask and one memory item per batch row (each sample has its own reference).
"""

from __future__ import annotations

import torch

from ..adapter import AdapterBlock, BlockWeights, DreamCacheAdapter, fused_residual_delta, memory_attention_output
from ..adapter import memory_keys_values
from ..patch import block_key, stash_attn1_output

ATTN1_STASH_KEY = "dreamcache_train_attn1_output"


def live_block_weights(module: AdapterBlock, dtype: torch.dtype) -> BlockWeights:
    """Return the block's weights cast to ``dtype`` without detaching them (the cast is differentiable)."""
    channels = module.channels
    weight = module.linear_cat.weight.to(dtype)
    return BlockWeights(norm_weight=module.norm2_mem.weight.to(dtype), norm_bias=module.norm2_mem.bias.to(dtype),
                        to_q=module.attn_mem.to_q.weight.to(dtype), to_k=module.attn_mem.to_k.weight.to(dtype),
                        to_v=module.attn_mem.to_v.weight.to(dtype),
                        out_weight=module.attn_mem.to_out[0].weight.to(dtype),
                        out_bias=module.attn_mem.to_out[0].bias.to(dtype),
                        cat_a=weight[:, :channels], cat_m=weight[:, channels:],
                        cat_bias=module.linear_cat.bias.to(dtype))


class TrainingPatch:
    """Memory patch of one training forward pass.

    ``memory`` maps each memory layer's module path to B x N_m x C tokens, row i being the
    reference of batch row i (or 1 x N_m x C shared by every row).
    """

    def __init__(self, adapter: DreamCacheAdapter, memory: dict[str, torch.Tensor]):
        self.adapter = adapter
        self.memory = memory
        self.sites = {(site.layer.block, site.block_index): (site, module)
                      for site, module in zip(adapter.sites, adapter.blocks, strict=True)}

    def attn1_output(self, attn1_out: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """Keep the self-attention output a for :meth:`middle`; return it unchanged."""
        return stash_attn1_output(attn1_out, extra_options, self.sites, ATTN1_STASH_KEY)

    def middle(self, hidden: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """Return hidden + linear_cat([a ; m]) - a for ``hidden`` = x + a (B x N x C)."""
        attn1_out = extra_options.pop(ATTN1_STASH_KEY, None)
        if attn1_out is None:
            return hidden
        site, module = self.sites[block_key(extra_options)]
        weights = live_block_weights(module, hidden.dtype)
        memory = self.memory[site.layer.path].to(device=hidden.device, dtype=hidden.dtype)
        keys, values = memory_keys_values(weights, memory)

        x = hidden - attn1_out
        m = memory_attention_output(weights, x, keys, values, int(extra_options["n_heads"]),
                                    extra_options.get("attn_precision"))
        return hidden + fused_residual_delta(weights, attn1_out, m)

    def transformer_options(self, base_options: dict | None = None) -> dict:
        """Return U-Net ``transformer_options`` with this patch added after any patches in ``base_options``."""
        options = dict(base_options or {})
        patches = {name: list(value) for name, value in options.get("patches", {}).items()}
        patches["attn1_output_patch"] = patches.get("attn1_output_patch", []) + [self.attn1_output]
        patches["middle_patch"] = patches.get("middle_patch", []) + [self.middle]
        options["patches"] = patches
        return options
