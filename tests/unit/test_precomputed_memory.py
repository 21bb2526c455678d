"""Memory keys and values computed once per run give the same blocks as computing them every call.

``DreamCachePatch.prepare`` projects every cache to keys and values once per sampling run, and
``middle`` only reads them. The reference here, ``recomputing_middle``, does the whole job on
every call instead: it casts the adapter weights and the cache, projects the keys and values,
picks rows with a gather and sums the terms into a zero-filled buffer. The prepared patch must
give bit-for-bit the same hidden states over several steps, for every way rows are selected.
"""

from __future__ import annotations

import pytest
import torch

import dreamcache_core.patch as patch_module
from dreamcache_core.adapter import BlockWeights, fused_residual_delta, memory_attention_output, memory_keys_values
from dreamcache_core.patch import ATTN1_STASH_KEY, MEMORY_CHUNKS_KEY, RUN_STATE_KEY, DreamCachePatch, RunState, Subject
from reference_math import random_adapter, random_cache, tiny_fingerprint

FINGERPRINT = tiny_fingerprint("sd2")  # middle_block.1 and output_blocks.4.1 are 32 channels wide
BLOCKS = (("middle", 0), ("output", 4))
CHANNELS = 32
HEADS = 4
HEIGHT, WIDTH = 3, 4
MEMORY_TOKENS = 9
STEP_SIGMAS = (9.0, 4.0, 1.5)


def recomputing_middle(patch: DreamCachePatch, hidden: torch.Tensor, attn1_out: torch.Tensor, extra: dict,
                       sigma_windows: tuple) -> torch.Tensor:
    """Return the block's new hidden state (B x N x C), projecting every cache to keys and values in this call."""
    block = extra["block"]
    cond_or_uncond = extra["cond_or_uncond"]
    memory_chunks = extra.get(MEMORY_CHUNKS_KEY)
    batch = hidden.shape[0]
    chunk_size = batch // len(cond_or_uncond)
    sigmas = extra["sigmas"].tolist()

    x = hidden - attn1_out
    delta = torch.zeros_like(hidden)
    for subject, window in zip(patch.subjects, sigma_windows):
        site_index = [site.layer.block for site in subject.adapter.sites].index(block)
        weights = BlockWeights.from_module(subject.adapter.blocks[site_index], hidden.device, hidden.dtype)
        memory = subject.cache.memory[subject.adapter.sites[site_index].layer.path].to(hidden.dtype)
        keys, values = memory_keys_values(weights, memory)

        row_weight = []
        for row in range(batch):
            chunk = cond_or_uncond[row // chunk_size]
            gets_memory = memory_chunks is None or chunk in memory_chunks
            inside = window is None or window[1] <= sigmas[row] <= window[0]
            row_weight.append(subject.strength if gets_memory and inside else 0.0)
        active = torch.tensor([row for row, weight in enumerate(row_weight) if weight != 0.0], dtype=torch.long)
        if active.numel() == 0:
            continue

        item = active % chunk_size if keys.shape[0] > 1 else torch.zeros_like(active)
        m = memory_attention_output(weights, x[active], keys[item], values[item], HEADS)
        term = fused_residual_delta(weights, attn1_out[active], m)
        term = term * torch.tensor(row_weight, dtype=hidden.dtype)[active, None, None]
        if subject.mask is not None:
            mask = subject.mask.reshape(subject.mask.shape[0], HEIGHT * WIDTH, 1)
            term = term * mask[item if mask.shape[0] > 1 else torch.zeros_like(active)]
        delta.index_add_(0, active, term)
    return hidden + delta


def block_call(patch: DreamCachePatch, hidden: torch.Tensor, attn1_out: torch.Tensor, extra: dict) -> torch.Tensor:
    """Drive the patch as ComfyUI's transformer block does: attn1_output, then middle."""
    patch.attn1_output(attn1_out, extra)
    assert ATTN1_STASH_KEY in extra
    return patch.middle(hidden, extra)


def grid_mask() -> torch.Tensor:
    """Return a 1 x H x W mask on the token grid itself, so resizing it to the grid changes nothing."""
    mask = torch.ones(1, HEIGHT, WIDTH)
    mask[:, 0, :] = 0.0
    mask[:, 2, 1] = 0.3
    return mask


# name: (cond_or_uncond, latents per chunk, memory chunks, subject settings)
# subject settings: (cache seed, cache items, strength, mask, sigma window)
CASES = {
    "cfg_every_row": ([1, 0], 1, None, [(41, 1, 1.0, False, None)]),
    "image_guidance_rows": ([2, 1, 0], 1, frozenset({0, 1}), [(42, 1, 1.0, False, None)]),
    "scattered_rows": ([0, 1, 2], 2, frozenset({0, 2}), [(43, 1, 1.0, False, None)]),
    "strength_and_mask": ([1, 0], 2, None, [(44, 1, 0.6, True, None)]),
    "per_latent_items": ([1, 0], 2, frozenset({1}), [(45, 2, 1.0, False, None)]),
    "two_subjects_window": ([2, 1, 0], 1, frozenset({0, 1}),
                            [(46, 1, 0.8, False, None), (47, 1, 1.0, False, (5.0, 1.0))]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepared_equals_recomputed(case):
    cond_or_uncond, latents, memory_chunks, settings = CASES[case]
    adapter = random_adapter(FINGERPRINT, seed=40)
    subjects = tuple(Subject(adapter, random_cache(FINGERPRINT, seed=seed, tokens=MEMORY_TOKENS, items=items),
                             strength=strength, mask=grid_mask() if masked else None)
                     for seed, items, strength, masked, _ in settings)
    patch = DreamCachePatch(subjects)
    window_by_subject = {id(subject): window for subject, (*_, window) in zip(subjects, settings)}
    sigma_windows = tuple(window_by_subject[id(subject)] for subject in patch.subjects)
    run_state = RunState({id(patch): patch.prepare(torch.device("cpu"), torch.float32, sigma_windows)})

    batch = len(cond_or_uncond) * latents
    generator = torch.Generator().manual_seed(48)
    for step, sigma in enumerate(STEP_SIGMAS):
        for block in BLOCKS:
            x = torch.randn(batch, HEIGHT * WIDTH, CHANNELS, generator=generator)
            attn1_out = torch.randn(batch, HEIGHT * WIDTH, CHANNELS, generator=generator)
            hidden = x + attn1_out
            extra = {"block": block, "block_index": 0, "n_heads": HEADS, "attn_precision": None,
                     "activations_shape": [batch, CHANNELS, HEIGHT, WIDTH], "cond_or_uncond": cond_or_uncond,
                     "sigmas": torch.full((batch,), sigma), RUN_STATE_KEY: run_state}
            if memory_chunks is not None:
                extra[MEMORY_CHUNKS_KEY] = memory_chunks

            prepared = block_call(patch, hidden, attn1_out, dict(extra))
            recomputed = recomputing_middle(patch, hidden, attn1_out, extra, sigma_windows)

            assert torch.equal(prepared, recomputed), f"step {step} block {block}"
            assert not torch.equal(prepared, hidden), f"step {step} block {block} got no memory term"


def test_keys_values_projected_once_per_run(monkeypatch):
    adapter = random_adapter(FINGERPRINT, seed=50)
    patch = DreamCachePatch((Subject(adapter, random_cache(FINGERPRINT, seed=51, tokens=MEMORY_TOKENS)),
                             Subject(adapter, random_cache(FINGERPRINT, seed=52, tokens=MEMORY_TOKENS))))
    calls = []

    def counting_keys_values(weights, memory):
        calls.append(memory.shape)
        return memory_keys_values(weights, memory)

    monkeypatch.setattr(patch_module, "memory_keys_values", counting_keys_values)
    run_state = RunState({id(patch): patch.prepare(torch.device("cpu"), torch.float32)})
    assert len(calls) == 2 * len(FINGERPRINT.layers)

    generator = torch.Generator().manual_seed(53)
    for sigma in STEP_SIGMAS:
        for block in BLOCKS:
            attn1_out = torch.randn(2, HEIGHT * WIDTH, CHANNELS, generator=generator)
            hidden = torch.randn(2, HEIGHT * WIDTH, CHANNELS, generator=generator) + attn1_out
            extra = {"block": block, "block_index": 0, "n_heads": HEADS,
                     "activations_shape": [2, CHANNELS, HEIGHT, WIDTH], "cond_or_uncond": [1, 0],
                     "sigmas": torch.full((2,), sigma), RUN_STATE_KEY: run_state}
            block_call(patch, hidden, attn1_out, extra)
    assert len(calls) == 2 * len(FINGERPRINT.layers)


def test_prepared_keys_match_projection():
    adapter = random_adapter(FINGERPRINT, seed=60)
    cache = random_cache(FINGERPRINT, seed=61, tokens=MEMORY_TOKENS)
    run = DreamCachePatch((Subject(adapter, cache),)).prepare(torch.device("cpu"), torch.float32)

    for site, module in zip(adapter.sites, adapter.blocks):
        (prepared,) = run.blocks[(site.layer.block, site.block_index)]
        memory = cache.memory[site.layer.path].double()
        expected_keys = memory @ module.attn_mem.to_k.weight.double().T
        expected_values = memory @ module.attn_mem.to_v.weight.double().T
        torch.testing.assert_close(prepared.keys.double(), expected_keys, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(prepared.values.double(), expected_values, atol=1e-6, rtol=1e-6)
