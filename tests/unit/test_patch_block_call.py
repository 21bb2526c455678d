"""DreamCachePatch driven like ComfyUI's BasicTransformerBlock drives it, and its pure helpers.

A block call is simulated with the ``extra_options`` dict ComfyUI builds for one transformer
block: ``attn1_output`` gets the self-attention output a, then ``middle`` gets x + a.
"""

import copy
import itertools

import pytest
import torch

import dreamcache_core.patch as patch_module
from dreamcache_core.errors import DreamCacheMismatchError
from dreamcache_core.patch import (ATTN1_STASH_KEY, MEMORY_CHUNKS_KEY, RUN_STATE_KEY, DreamCachePatch,
                                   PreparedSubject, RunState, Subject, memory_rows, select_items,
                                   subject_row_weights)
from reference_math import (random_adapter, random_cache, reference_block_parameters, reference_released_block,
                            tiny_fingerprint)

FINGERPRINT = tiny_fingerprint("sd2")  # output_blocks.4.1 is 32 channels wide
LAYER_PATH = "output_blocks.4.1"
BLOCK = ("output", 4)
CHANNELS = 32
HEADS = 4
HEIGHT, WIDTH = 3, 4  # token grid, N = 12
BATCH = 4  # two chunks (cond, uncond) of two latents
MEMORY_TOKENS = 7


@pytest.fixture(scope="module")
def adapter():
    return random_adapter(FINGERPRINT, seed=11)


@pytest.fixture(scope="module")
def caches():
    return [random_cache(FINGERPRINT, seed=seed, tokens=MEMORY_TOKENS, label=f"subject {seed}")
            for seed in (21, 22, 23)]


@pytest.fixture
def hidden_inputs():
    """Return x and a (each BATCH x N x C) for one block call."""
    generator = torch.Generator().manual_seed(31)
    x = torch.randn(BATCH, HEIGHT * WIDTH, CHANNELS, generator=generator)
    a = torch.randn(BATCH, HEIGHT * WIDTH, CHANNELS, generator=generator)
    return x, a


def block_extra_options(**overrides) -> dict:
    """Return the extra_options dict ComfyUI passes to the patches of one transformer block call."""
    extra = {"block": BLOCK, "block_index": 0, "n_heads": HEADS, "attn_precision": None,
             "activations_shape": [BATCH, CHANNELS, HEIGHT, WIDTH], "cond_or_uncond": [0, 1],
             "sigmas": torch.full((BATCH,), 3.0)}
    extra.update(overrides)
    return extra


def run_block(patch: DreamCachePatch, x: torch.Tensor, a: torch.Tensor, extra: dict) -> torch.Tensor:
    """Call the two patches in the order BasicTransformerBlock does and return the new hidden state."""
    returned = patch.attn1_output(a, extra)
    assert returned is a
    return patch.middle(x + returned, extra)


def block_parameters(adapter) -> dict:
    for site, module in zip(adapter.sites, adapter.blocks):
        if site.layer.path == LAYER_PATH and site.block_index == 0:
            return reference_block_parameters(module)
    raise AssertionError(f"adapter has no block at {LAYER_PATH}")


def memory_term(adapter, cache, x, a, item: int = 0) -> torch.Tensor:
    """Return linear_cat([a ; m]) - a from the independent computation, in float64 (B x N x C)."""
    memory = cache.memory[LAYER_PATH][item:item + 1]
    released = reference_released_block(x, a, memory, block_parameters(adapter), HEADS)
    return released - x.double() - a.double()


def assert_close(result: torch.Tensor, expected: torch.Tensor):
    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=1e-5)


def test_full_strength_is_released_block(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    patch = DreamCachePatch((Subject(adapter, caches[0]),))
    result = run_block(patch, x, a, block_extra_options())

    expected = reference_released_block(x, a, caches[0].memory[LAYER_PATH], block_parameters(adapter), HEADS)
    assert result.shape == x.shape
    assert result.dtype == torch.float32
    assert_close(result, expected)
    assert (result - (x + a)).abs().max() > 0.1


def test_zero_strength_returns_input(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    patch = DreamCachePatch((Subject(adapter, caches[0], strength=0.0),))
    hidden = x + a
    extra = block_extra_options()

    patch.attn1_output(a, extra)
    result = patch.middle(hidden, extra)
    assert torch.equal(result, hidden)


def test_half_strength_scales_term(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    patch = DreamCachePatch((Subject(adapter, caches[0], strength=0.5),))
    result = run_block(patch, x, a, block_extra_options())

    expected = x.double() + a.double() + 0.5 * memory_term(adapter, caches[0], x, a)
    assert_close(result, expected)


def test_two_subjects_order_independent(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    first = Subject(adapter, caches[0], strength=0.7)
    second = Subject(adapter, caches[1], strength=0.4)

    forward = run_block(DreamCachePatch((first, second)), x, a, block_extra_options())
    backward = run_block(DreamCachePatch((second, first)), x, a, block_extra_options())
    assert torch.equal(forward, backward)

    expected = (x.double() + a.double() + 0.7 * memory_term(adapter, caches[0], x, a)
                + 0.4 * memory_term(adapter, caches[1], x, a))
    assert_close(forward, expected)


def test_with_subject_adds_subject(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    first = Subject(adapter, caches[0])
    second = Subject(adapter, caches[1])
    extended = DreamCachePatch((first,)).with_subject(second)

    assert len(extended.subjects) == 2
    assert torch.equal(run_block(extended, x, a, block_extra_options()),
                       run_block(DreamCachePatch((second, first)), x, a, block_extra_options()))


def test_three_subjects_any_order(adapter, caches, hidden_inputs):
    # With three terms the floating-point sum depends on their order unless the patch fixes it.
    x, a = hidden_inputs
    subjects = [Subject(adapter, cache, strength=strength) for cache, strength in zip(caches, (1.0, 0.6, 0.3))]
    reference = run_block(DreamCachePatch(tuple(subjects)), x, a, block_extra_options())

    for order in itertools.permutations(subjects):
        assert torch.equal(run_block(DreamCachePatch(order), x, a, block_extra_options()), reference)


def test_zero_mask_leaves_hidden(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    patch = DreamCachePatch((Subject(adapter, caches[0], mask=torch.zeros(1, HEIGHT, WIDTH)),))
    hidden = x + a
    extra = block_extra_options()

    patch.attn1_output(a, extra)
    assert torch.equal(patch.middle(hidden, extra), hidden)


def test_partial_mask_weights_tokens(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    # The mask has the token grid's size, so resizing it to the grid leaves it unchanged.
    mask = torch.zeros(1, HEIGHT, WIDTH)
    mask[:, :, :2] = 1.0
    mask[:, 2, 3] = 0.25
    patch = DreamCachePatch((Subject(adapter, caches[0], mask=mask),))
    result = run_block(patch, x, a, block_extra_options())

    token_weight = mask.reshape(1, HEIGHT * WIDTH, 1).double()
    expected = x.double() + a.double() + token_weight * memory_term(adapter, caches[0], x, a)
    assert_close(result, expected)


def test_mask_grid_mismatch_rejected(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    patch = DreamCachePatch((Subject(adapter, caches[0], mask=torch.ones(1, HEIGHT, WIDTH)),))
    extra = block_extra_options(activations_shape=[BATCH, CHANNELS, 2, 2])
    with pytest.raises(DreamCacheMismatchError, match=r"Mask grid 2x2 has 4 tokens but block .* has 12"):
        run_block(patch, x, a, extra)


def test_per_latent_cache_items(adapter, hidden_inputs):
    x, a = hidden_inputs
    cache = random_cache(FINGERPRINT, seed=25, tokens=MEMORY_TOKENS, items=2)
    result = run_block(DreamCachePatch((Subject(adapter, cache),)), x, a, block_extra_options())

    # Chunks are [cond 0, cond 1, uncond 0, uncond 1]: row r uses item r % 2.
    for row in range(BATCH):
        expected = x[row].double() + a[row].double() + memory_term(adapter, cache, x, a, item=row % 2)[row]
        assert_close(result[row], expected)


def test_cache_items_must_match_batch(adapter, hidden_inputs):
    x, a = hidden_inputs
    cache = random_cache(FINGERPRINT, seed=26, tokens=MEMORY_TOKENS, items=3)
    with pytest.raises(DreamCacheMismatchError, match="The cache has 3 items but the latent batch has 2"):
        run_block(DreamCachePatch((Subject(adapter, cache),)), x, a, block_extra_options())


def test_memory_only_for_selected_chunk(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    patch = DreamCachePatch((Subject(adapter, caches[0]),))
    hidden = x + a
    extra = block_extra_options(**{MEMORY_CHUNKS_KEY: {0}})

    patch.attn1_output(a, extra)
    result = patch.middle(hidden, extra)

    assert torch.equal(result[2:], hidden[2:])
    expected = x.double() + a.double() + memory_term(adapter, caches[0], x, a)
    assert_close(result[:2], expected[:2])


def test_no_selected_chunk_leaves_hidden(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    patch = DreamCachePatch((Subject(adapter, caches[0]),))
    hidden = x + a
    extra = block_extra_options(**{MEMORY_CHUNKS_KEY: set()})

    patch.attn1_output(a, extra)
    assert torch.equal(patch.middle(hidden, extra), hidden)


def test_prepared_run_matches_recomputing(adapter, caches, hidden_inputs, monkeypatch):
    x, a = hidden_inputs
    patch = DreamCachePatch((Subject(adapter, caches[0], strength=0.8), Subject(adapter, caches[1])))
    recomputed = run_block(patch, x, a, block_extra_options())

    run = patch.prepare(torch.device("cpu"), torch.float32)

    def fail_if_called(*args, **kwargs):
        raise AssertionError("memory keys and values were recomputed despite a prepared run")

    monkeypatch.setattr(patch_module, "memory_keys_values", fail_if_called)
    extra = block_extra_options(**{RUN_STATE_KEY: RunState({id(patch): run})})
    prepared = run_block(patch, x, a, extra)
    second_call = run_block(patch, x, a, block_extra_options(**{RUN_STATE_KEY: RunState({id(patch): run})}))

    assert torch.equal(prepared, recomputed)
    assert torch.equal(second_call, recomputed)


def test_prepared_sigma_window(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    patch = DreamCachePatch((Subject(adapter, caches[0]),))
    run = patch.prepare(torch.device("cpu"), torch.float32, sigma_windows=((5.0, 1.0),))
    hidden = x + a
    extra = block_extra_options(sigmas=torch.tensor([10.0, 3.0, 10.0, 1.0]),
                                **{RUN_STATE_KEY: RunState({id(patch): run})})

    patch.attn1_output(a, extra)
    result = patch.middle(hidden, extra)

    expected = x.double() + a.double() + memory_term(adapter, caches[0], x, a)
    assert torch.equal(result[0], hidden[0])
    assert torch.equal(result[2], hidden[2])
    assert_close(result[1], expected[1])
    assert_close(result[3], expected[3])


def test_other_blocks_untouched(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    patch = DreamCachePatch((Subject(adapter, caches[0]),))
    hidden = x + a
    for block, block_index in ((("input", 4), 0), (("output", 5), 0), (BLOCK, 1)):
        extra = block_extra_options(block=block, block_index=block_index)
        patch.attn1_output(a, extra)
        assert ATTN1_STASH_KEY not in extra
        assert patch.middle(hidden, extra) is hidden


def test_stash_consumed_by_middle(adapter, caches, hidden_inputs):
    x, a = hidden_inputs
    patch = DreamCachePatch((Subject(adapter, caches[0]),))
    extra = block_extra_options()

    patch.attn1_output(a, extra)
    assert extra[ATTN1_STASH_KEY] is a
    patch.middle(x + a, extra)
    assert ATTN1_STASH_KEY not in extra


def test_patch_shared_on_deepcopy(adapter, caches):
    patch = DreamCachePatch((Subject(adapter, caches[0]),))
    assert copy.deepcopy(patch) is patch


@pytest.mark.parametrize("memory_chunks, cond_or_uncond, expected", [
    (None, [0, 1], None),
    ({0, 1}, [0, 1], None),
    ({0}, [0, 1], [0, 1]),
    ({1}, [0, 1], [2, 3]),
    ({0}, [1, 0], [2, 3]),
    ({2}, [0, 1, 2], [4, 5]),
    (set(), [0, 1], []),
    ({0}, None, None),
])
def test_memory_rows(memory_chunks, cond_or_uncond, expected):
    rows = memory_rows(len(cond_or_uncond or [0, 1, 2]) * 2, cond_or_uncond, memory_chunks)
    if expected is None:
        assert rows is None
    else:
        assert rows.tolist() == expected
        assert rows.dtype == torch.long


def test_select_items_single_item_shared():
    tensor = torch.arange(6.0).reshape(1, 2, 3)
    selected = select_items(tensor, torch.tensor([0, 3, 5]), chunk_size=2, what="cache")
    assert selected.shape == (3, 2, 3)
    for row in range(3):
        assert torch.equal(selected[row], tensor[0])


def test_select_items_per_latent():
    tensor = torch.arange(3.0).reshape(3, 1, 1)
    selected = select_items(tensor, torch.tensor([0, 2, 4, 5]), chunk_size=3, what="cache")
    assert selected.flatten().tolist() == [0.0, 2.0, 1.0, 2.0]


def test_select_items_count_mismatch():
    with pytest.raises(DreamCacheMismatchError) as error_info:
        select_items(torch.zeros(3, 4, 1), torch.tensor([0, 1]), chunk_size=2, what="mask")
    message = str(error_info.value)
    assert "The mask has 3 items" in message
    assert "the latent batch has 2" in message
    assert "a mask with 1 item" in message


def prepared_subject(strength: float, sigma_window) -> PreparedSubject:
    # subject_row_weights reads only the strength and the sigma window.
    empty = torch.zeros(1, 1, 1)
    return PreparedSubject(weights=None, keys=empty, values=empty, strength=strength, sigma_window=sigma_window,
                           mask=None)


def test_row_weights_sigma_window_inclusive():
    subject = prepared_subject(0.8, (5.0, 1.0))
    sigmas = torch.tensor([10.0, 5.0, 3.0, 1.0, 0.5])
    weights = subject_row_weights(subject, 5, None, sigmas, torch.device("cpu"), torch.float32)
    assert weights.tolist() == pytest.approx([0.0, 0.8, 0.8, 0.8, 0.0])


def test_row_weights_single_sigma():
    subject = prepared_subject(1.0, (5.0, 1.0))
    inside = subject_row_weights(subject, 3, None, torch.tensor([2.0]), torch.device("cpu"), torch.float32)
    outside = subject_row_weights(subject, 3, None, torch.tensor(7.0), torch.device("cpu"), torch.float32)
    assert inside.tolist() == [1.0, 1.0, 1.0]
    assert outside is None


def test_row_weights_rows_and_window():
    subject = prepared_subject(0.5, (5.0, 1.0))
    sigmas = torch.tensor([3.0, 9.0, 3.0, 3.0])
    weights = subject_row_weights(subject, 4, torch.tensor([0, 1]), sigmas, torch.device("cpu"), torch.float32)
    assert weights.tolist() == [0.5, 0.0, 0.0, 0.0]


def test_row_weights_no_window_or_sigmas():
    unbounded = subject_row_weights(prepared_subject(0.3, None), 2, None, torch.tensor([99.0, 0.0]),
                                    torch.device("cpu"), torch.float32)
    no_sigmas = subject_row_weights(prepared_subject(0.3, (1.0, 0.5)), 2, None, None, torch.device("cpu"),
                                    torch.float32)
    assert unbounded.tolist() == pytest.approx([0.3, 0.3])
    assert no_sigmas.tolist() == pytest.approx([0.3, 0.3])


def test_row_weights_zero_strength():
    assert subject_row_weights(prepared_subject(0.0, None), 2, None, None, torch.device("cpu"), torch.float32) is None
