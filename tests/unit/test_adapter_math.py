"""The adapter block math of dreamcache_core.adapter against an independent float64 computation."""

import pytest
import torch

from dreamcache_core.adapter import (AdapterBlock, BlockWeights, fused_residual_delta, memory_attention_output,
                                     memory_keys_values, multihead_attention, parameter_count)
from reference_math import (randomize_adapter, reference_attention, reference_block_parameters,
                            reference_layer_norm, reference_released_block)

BATCH = 2
TOKENS = 12  # N, a 3 x 4 token grid
MEMORY_TOKENS = 7  # N_m, deliberately different from N


def make_block(channels: int, seed: int) -> AdapterBlock:
    """Return an AdapterBlock of width ``channels`` with seeded random weights."""
    block = AdapterBlock(channels)
    randomize_adapter(block, seed)  # walks named_parameters, so it works on a single block too
    return block.eval().requires_grad_(False)


@pytest.mark.parametrize("channels, heads", [(64, 8), (40, 8)])
@pytest.mark.parametrize("memory_batch", [1, BATCH])
def test_fused_block_matches_released_block(channels, heads, memory_batch):
    block = make_block(channels, seed=channels)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, TOKENS, channels, generator=generator)
    a = torch.randn(BATCH, TOKENS, channels, generator=generator)
    memory = torch.randn(memory_batch, MEMORY_TOKENS, channels, generator=generator)

    weights = BlockWeights.from_module(block)
    keys, values = memory_keys_values(weights, memory)
    m = memory_attention_output(weights, x, keys, values, heads)
    result = x + a + fused_residual_delta(weights, a, m)

    expected = reference_released_block(x, a, memory, reference_block_parameters(block), heads)
    assert result.dtype == torch.float32
    assert result.shape == (BATCH, TOKENS, channels)
    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=1e-5)


def test_fused_block_differs_from_stock_block():
    # Guards the comparison above: random weights must move the output away from x + a.
    block = make_block(64, seed=3)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, TOKENS, 64, generator=generator)
    a = torch.randn(BATCH, TOKENS, 64, generator=generator)
    memory = torch.randn(1, MEMORY_TOKENS, 64, generator=generator)

    weights = BlockWeights.from_module(block)
    keys, values = memory_keys_values(weights, memory)
    delta = fused_residual_delta(weights, a, memory_attention_output(weights, x, keys, values, 8))
    assert delta.abs().max() > 0.1


def test_identity_adapter_adds_nothing():
    block = make_block(40, seed=4)
    block.reset_to_identity()
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(BATCH, TOKENS, 40, generator=generator)
    m = torch.randn(BATCH, TOKENS, 40, generator=generator)

    delta = fused_residual_delta(BlockWeights.from_module(block), a, m)
    assert torch.equal(delta, torch.zeros_like(delta))


def test_block_weights_split_linear_cat_columns():
    block = make_block(40, seed=6)
    weights = BlockWeights.from_module(block)
    assert torch.equal(torch.cat([weights.cat_a, weights.cat_m], dim=1), block.linear_cat.weight)
    assert weights.cat_a.shape == (40, 40)
    assert weights.cat_m.shape == (40, 40)


def test_layer_norm_reference_matches_torch():
    # The reference LayerNorm is used as ground truth, so check it once against torch.
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 40, generator=generator, dtype=torch.float64)
    weight = torch.randn(40, generator=generator, dtype=torch.float64)
    bias = torch.randn(40, generator=generator, dtype=torch.float64)
    expected = torch.nn.functional.layer_norm(x, (40,), weight, bias, 1e-5)
    torch.testing.assert_close(reference_layer_norm(x, weight, bias), expected)


@pytest.mark.parametrize("channels, heads", [(64, 8), (40, 8)])
def test_multihead_attention_matches_reference(channels, heads):
    generator = torch.Generator().manual_seed(8)
    q = torch.randn(BATCH, TOKENS, channels, generator=generator)
    k = torch.randn(1, MEMORY_TOKENS, channels, generator=generator)
    v = torch.randn(1, MEMORY_TOKENS, channels, generator=generator)

    result = multihead_attention(q, k, v, heads)
    expected = reference_attention(q.double(), k.double().expand(BATCH, -1, -1), v.double().expand(BATCH, -1, -1),
                                   heads)
    assert result.shape == (BATCH, TOKENS, channels)
    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_multihead_attention_float32_precision(dtype, tolerance):
    generator = torch.Generator().manual_seed(9)
    # Large logits make low-precision softmax visibly worse than float32.
    q = (4.0 * torch.randn(BATCH, TOKENS, 64, generator=generator)).to(dtype)
    k = (4.0 * torch.randn(BATCH, MEMORY_TOKENS, 64, generator=generator)).to(dtype)
    v = torch.randn(BATCH, MEMORY_TOKENS, 64, generator=generator).to(dtype)

    result = multihead_attention(q, k, v, 8, attn_precision=torch.float32)
    # Ground truth on the same rounded inputs. Computed in float32, the result differs from it only
    # by the final cast, so almost every element equals the rounded ground truth exactly. Computed
    # in the input dtype, 42 (float16) and 46 (bfloat16) of these 1536 elements differ, as measured
    # on CPU with torch 2.13, which the 1% bound below rejects.
    expected = reference_attention(q.double(), k.double(), v.double(), 8)
    full_precision = multihead_attention(q.float(), k.float(), v.float(), 8)
    rounding_differences = int((result != expected.to(dtype)).sum())

    assert result.dtype == dtype
    assert result.shape == q.shape
    assert rounding_differences <= result.numel() // 100
    torch.testing.assert_close(result.double(), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(result.float(), full_precision, atol=tolerance, rtol=tolerance)


def test_parameter_count_matches_block():
    for channels in (8, 40, 64):
        block = AdapterBlock(channels)
        assert sum(parameter.numel() for parameter in block.parameters()) == parameter_count(channels)
