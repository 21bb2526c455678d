"""The DreamCache block patch inside ComfyUI's own U-Net, ModelPatcher and sampler (tiny random models)."""

import collections
import copy
import math

import pytest
import torch

from dreamcache_core import adapter as adapter_module
from dreamcache_core.comfy_patch import apply_dreamcache, find_patch
from dreamcache_core.errors import DreamCacheMismatchError
from dreamcache_core.patch import RUN_STATE_KEY, DreamCachePatch, Subject
from tiny_models import (max_abs_difference, model_inputs, random_adapter, random_cache, run_unet, sample_latent,
                         tiny_model)

SD_MEMORY_BLOCKS = {("middle", 0), ("output", 4), ("output", 6), ("output", 8), ("output", 10)}
SDXL_MEMORY_BLOCKS = {("middle", 0), ("output", 1), ("output", 3), ("output", 5)}


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Return per-head softmax(q k^T / sqrt(d)) v for q (B x N x C) and k, v (1 or B x N_m x C), as B x N x C."""
    batch, tokens, channels = q.shape
    dim_head = channels // heads

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, dim_head).permute(0, 2, 1, 3)

    scores = split_heads(q) @ split_heads(k).transpose(-1, -2) / math.sqrt(dim_head)
    out = scores.softmax(dim=-1) @ split_heads(v)
    return out.permute(0, 2, 1, 3).reshape(batch, tokens, channels)


def released_block_forward(block, adapter_block, memory: torch.Tensor):
    """Return a forward for ComfyUI ``block`` that computes the released DreamCache block.

    x + linear_cat([attn1(norm1 x) ; attn_mem(norm2_mem x, M)]), then the block's own
    cross-attention and feed-forward, with M = ``memory`` (1 x N_m x C).
    """
    attn_mem = adapter_block.attn_mem

    def forward(x, context=None, transformer_options={}):
        a = block.attn1(block.norm1(x))
        queries = attn_mem.to_q(adapter_block.norm2_mem(x))
        m = attn_mem.to_out[0](softmax_attention(queries, attn_mem.to_k(memory), attn_mem.to_v(memory),
                                                 block.n_heads))
        x = x + adapter_block.linear_cat(torch.cat([a, m], dim=-1))
        x = x + block.attn2(block.norm2(x), context=context)
        return x + block.ff(block.norm3(x))

    return forward


def transformer_block_count(model_patcher) -> int:
    return sum(1 for module in model_patcher.model.diffusion_model.modules()
               if type(module).__name__ == "BasicTransformerBlock")


@pytest.mark.parametrize("family", ["sd2", "sd1"])
def test_patched_output_matches_released_block(family, monkeypatch):
    model = tiny_model(family)
    # A larger adapter scale sharpens the memory attention, so a wrong head split shows.
    adapter = random_adapter(model, std=0.2)
    cache = random_cache(model, tokens=24)
    patched = apply_dreamcache(model, adapter, cache, strength=1.0)
    latent, sigma, context, _ = model_inputs(model, size=24)

    base = run_unet(model, latent, sigma, context)
    result = run_unet(patched, latent, sigma, context)

    diffusion_model = model.model.diffusion_model
    for layer in cache.fingerprint.layers:
        block = diffusion_model.get_submodule(layer.path).transformer_blocks[0]
        # The tiny SD 1.x model has 4 heads per block, and the SD 2.x model 8 channels per head.
        assert block.n_heads == (4 if family == "sd1" else layer.channels // 8)
        forward = released_block_forward(block, adapter.block_for(layer.block, 0), cache.memory[layer.path].float())
        monkeypatch.setattr(block, "forward", forward)
    expected = run_unet(model, latent, sigma, context)

    assert max_abs_difference(result, base) > 1e-2
    assert max_abs_difference(result, expected) <= 1e-4


def test_strength_zero_equals_unpatched():
    model = tiny_model()
    patched = apply_dreamcache(model, random_adapter(model), random_cache(model), strength=0.0)
    latent, sigma, context, _ = model_inputs(model)

    assert torch.equal(run_unet(patched, latent, sigma, context), run_unet(model, latent, sigma, context))
    assert torch.equal(sample_latent(patched, seed=3), sample_latent(model, seed=3))


def test_input_model_unchanged_after_patched_sampling():
    model = tiny_model()
    options_before = copy.deepcopy(model.model_options)
    wrappers_before = copy.deepcopy(model.wrappers)
    before = sample_latent(model, seed=5)

    patched = apply_dreamcache(model, random_adapter(model), random_cache(model))
    patched_result = sample_latent(patched, seed=5)
    after = sample_latent(model, seed=5)

    assert not torch.equal(patched_result, before)
    assert torch.equal(after, before)
    assert model.model_options == options_before
    assert model.wrappers == wrappers_before
    assert find_patch(model) is None


@pytest.mark.parametrize("family, memory_blocks", [("sd2", SD_MEMORY_BLOCKS), ("sd1", SD_MEMORY_BLOCKS),
                                                   ("sdxl", SDXL_MEMORY_BLOCKS)])
def test_each_memory_block_fires_once(family, memory_blocks, monkeypatch):
    calls = []
    original_middle = DreamCachePatch.middle

    def recording_middle(self, hidden, extra_options):
        out = original_middle(self, hidden, extra_options)
        calls.append((tuple(extra_options["block"]), extra_options.get("block_index", 0), not torch.equal(out, hidden)))
        return out

    # The patch binds its methods when it is applied, so the spy goes in first.
    monkeypatch.setattr(DreamCachePatch, "middle", recording_middle)
    model = tiny_model(family)
    patched = apply_dreamcache(model, random_adapter(model), random_cache(model))
    latent, sigma, context, extra = model_inputs(model)
    blocks_per_call = transformer_block_count(model)

    for call_count in (1, 2):
        run_unet(patched, latent, sigma, context, **extra)
        assert len(calls) == call_count * blocks_per_call
        with_memory = collections.Counter(block for block, _, changed in calls if changed)
        assert with_memory == {block: call_count for block in memory_blocks}

    assert all(block_index == 0 for _, block_index, _ in calls)
    without_memory = {block for block, _, changed in calls if not changed}
    assert without_memory.isdisjoint(memory_blocks)
    assert len(without_memory) == blocks_per_call - len(memory_blocks)


def test_sampling_is_reproducible_per_seed():
    model = tiny_model()
    patched = apply_dreamcache(model, random_adapter(model), random_cache(model))

    base = sample_latent(model, seed=1)
    first = sample_latent(patched, seed=1)
    other_seed = sample_latent(patched, seed=2)
    again = sample_latent(patched, seed=1)

    assert torch.isfinite(first).all()
    assert max_abs_difference(first, base) > 1e-3
    assert not torch.equal(other_seed, first)
    assert torch.equal(again, first)


def test_clone_shares_patch_and_cache():
    model = tiny_model()
    cache = random_cache(model)
    patched = apply_dreamcache(model, random_adapter(model), cache)
    clone = patched.clone()

    patch = find_patch(clone)
    assert clone.model_options is not patched.model_options
    assert patch is find_patch(patched)
    for path, tensor in cache.memory.items():
        assert patch.subjects[0].cache.memory[path].data_ptr() == tensor.data_ptr()


def test_prepare_runs_once_per_sampling(monkeypatch):
    prepare_calls = []
    run_state_seen = []
    original_prepare = DreamCachePatch.prepare
    original_middle = DreamCachePatch.middle

    def counting_prepare(self, device, dtype, *args, **kwargs):
        prepare_calls.append((torch.device(device), dtype))
        return original_prepare(self, device, dtype, *args, **kwargs)

    def recording_middle(self, hidden, extra_options):
        run_state_seen.append(extra_options.get(RUN_STATE_KEY) is not None)
        return original_middle(self, hidden, extra_options)

    monkeypatch.setattr(DreamCachePatch, "prepare", counting_prepare)
    monkeypatch.setattr(DreamCachePatch, "middle", recording_middle)
    model = tiny_model()
    patched = apply_dreamcache(model, random_adapter(model), random_cache(model))

    sample_latent(patched, seed=4, steps=4)

    assert prepare_calls == [(torch.device("cpu"), torch.float32)]
    assert len(run_state_seen) == 4 * transformer_block_count(model)
    assert all(run_state_seen)
    assert RUN_STATE_KEY not in patched.model_options.get("transformer_options", {})


def test_attn_precision_float32_in_multihead_attention(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 64, generator=generator)
    k = torch.randn(1, 24, 64, generator=generator)
    v = torch.randn(1, 24, 64, generator=generator)
    expected = softmax_attention(q, k, v, heads=4)

    sdpa_dtypes = []
    original_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, *args, **kwargs):
        sdpa_dtypes.append(query.dtype)
        return original_sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    upcast = adapter_module.multihead_attention(q.half(), k.half(), v.half(), 4, attn_precision=torch.float32)
    plain = adapter_module.multihead_attention(q.half(), k.half(), v.half(), 4)

    assert sdpa_dtypes == [torch.float32, torch.float16]
    assert upcast.dtype == torch.float16
    assert max_abs_difference(upcast.float(), expected) <= 2e-3
    assert max_abs_difference(plain.float(), expected) <= 1e-2


def test_attn_precision_honoured_in_fp16_model(monkeypatch):
    model32 = tiny_model()
    model16 = tiny_model(dtype=torch.float16)
    adapter = random_adapter(model32)
    cache = random_cache(model32)
    latent, sigma, context, _ = model_inputs(model32)
    expected = run_unet(apply_dreamcache(model32, adapter, cache), latent, sigma, context)

    for layer in cache.fingerprint.layers:
        model16.model.diffusion_model.get_submodule(layer.path).transformer_blocks[0].attn_precision = torch.float32
    precisions = []
    original_attention = adapter_module.multihead_attention

    def recording_attention(q, k, v, heads, attn_precision=None):
        precisions.append((q.dtype, attn_precision))
        return original_attention(q, k, v, heads, attn_precision)

    monkeypatch.setattr(adapter_module, "multihead_attention", recording_attention)
    result = run_unet(apply_dreamcache(model16, adapter, cache), latent, sigma, context)

    assert precisions == [(torch.float16, torch.float32)] * len(cache.fingerprint.layers)
    assert torch.isfinite(result).all()
    assert max_abs_difference(result, expected) <= 0.05 * float(expected.abs().max())


def test_chained_apply_is_order_independent():
    model = tiny_model()
    adapter_a, adapter_b = random_adapter(model, seed=1), random_adapter(model, seed=4)
    cache_a, cache_b = random_cache(model, seed=2), random_cache(model, seed=5, tokens=8)
    only_a = apply_dreamcache(model, adapter_a, cache_a, strength=0.8)
    a_then_b = apply_dreamcache(only_a, adapter_b, cache_b, strength=1.0)
    b_then_a = apply_dreamcache(apply_dreamcache(model, adapter_b, cache_b, strength=1.0), adapter_a, cache_a,
                                strength=0.8)

    manual = model.clone()
    manual_patch = DreamCachePatch((Subject(adapter=adapter_b, cache=cache_b, strength=1.0),
                                    Subject(adapter=adapter_a, cache=cache_a, strength=0.8)))
    manual.set_model_attn1_output_patch(manual_patch.attn1_output)
    manual.set_model_patch(manual_patch.middle, "middle_patch")

    patches = a_then_b.model_options["transformer_options"]["patches"]
    assert len(patches["middle_patch"]) == 1
    assert len(patches["attn1_output_patch"]) == 1
    assert len(find_patch(a_then_b).subjects) == 2
    assert len(find_patch(only_a).subjects) == 1

    latent, sigma, context, _ = model_inputs(model)
    result = run_unet(a_then_b, latent, sigma, context)
    assert torch.equal(result, run_unet(b_then_a, latent, sigma, context))
    assert torch.equal(result, run_unet(manual, latent, sigma, context))
    assert max_abs_difference(result, run_unet(only_a, latent, sigma, context)) > 1e-3


def _made_for(family: str, prediction: str = "eps"):
    return tiny_model(family, prediction=prediction)


@pytest.mark.parametrize("model_family, cache_family, cache_prediction, expected", [
    ("sd2", "sd1", "eps", r"cache 'tiny' was made for sd1 .* but the model is sd2 .*family sd1 vs sd2"),
    ("sd1", "sd2", "eps", r"cache 'tiny' was made for sd2 .* but the model is sd1 .*family sd2 vs sd1"),
    ("sd2", "sdxl", "eps", r"cache 'tiny' was made for sdxl .* but the model is sd2 .*family sdxl vs sd2"),
    ("sdxl", "sd2", "eps", r"cache 'tiny' was made for sd2 .* but the model is sdxl .*family sd2 vs sdxl"),
    ("sd2", "sd2", "v", r"cache 'tiny' was made for sd2 .*v-prediction.* but the model is sd2 .*prediction v vs eps"),
])
def test_cache_for_other_model_raises(model_family, cache_family, cache_prediction, expected):
    model = tiny_model(model_family)
    cache = random_cache(_made_for(cache_family, cache_prediction))

    with pytest.raises(DreamCacheMismatchError, match=expected + r".*Build the cache again"):
        apply_dreamcache(model, random_adapter(model), cache)


@pytest.mark.parametrize("model_family, adapter_family", [("sd2", "sd1"), ("sd1", "sd2"), ("sd2", "sdxl")])
def test_adapter_for_other_model_raises(model_family, adapter_family):
    model = tiny_model(model_family)
    adapter = random_adapter(_made_for(adapter_family))
    expected = (rf"adapter .* was made for {adapter_family} .* but the model is {model_family} .*"
                rf"family {adapter_family} vs {model_family}.*Load the adapter trained for this base model")

    with pytest.raises(DreamCacheMismatchError, match=expected):
        apply_dreamcache(model, adapter, random_cache(model))
