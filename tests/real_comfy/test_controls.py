"""Apply DreamCache controls inside ComfyUI's sampling code: image guidance, timestep window,
masks, per-item caches, split cond/uncond passes and other packs' patches."""

import copy

import pytest
import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
from comfy_extras.nodes_custom_sampler import Guider_DualCFG
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

from dreamcache_core import patch as patch_module
from dreamcache_core.cache import SubjectCache
from dreamcache_core.comfy_patch import apply_dreamcache
from dreamcache_core.errors import DreamCacheMismatchError
from tiny_models import random_adapter, random_cache, tiny_model

SIGMA = 2.0
# The guidance tests compare denoised latents at a low sigma, where fp32 rounding of the random
# tiny model (outputs of magnitude ~5) stays well below the 1e-4 bound.
GUIDANCE_SIGMA = 0.5


@pytest.fixture(scope="module")
def base():
    return tiny_model("sd2")


@pytest.fixture(scope="module")
def adapter(base):
    return random_adapter(base, std=0.2)


@pytest.fixture(scope="module")
def cache(base):
    return random_cache(base)


def text_cond(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 5, 1024, generator=generator), {}]]


def denoise(model_patcher, x, context, sigma=SIGMA):
    """Return one direct model call's denoised output, with the model's own transformer options."""
    options = copy.copy(model_patcher.model_options.get("transformer_options", {}))
    sigmas = torch.full((x.shape[0],), sigma)
    with torch.no_grad():
        return model_patcher.model.apply_model(x, sigmas, c_crossattn=context.expand(x.shape[0], -1, -1),
                                               transformer_options=options)


def one_step(guider, noise, sigma=SIGMA):
    """Run one Euler step from ``sigma`` and return the guided denoised latent the sampler saw."""
    latent = torch.zeros_like(noise)
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = torch.tensor([sigma, 0.0])
    denoised = []
    guider.sample(noise, latent, sampler, sigmas, seed=0, disable_pbar=True,
                  callback=lambda step, x0, x, total: denoised.append(x0.clone()))
    return denoised[0]


def count_rows(model_patcher):
    """Wrap the U-Net forward to record the batch size of every call; return the list."""
    calls = []
    unet = model_patcher.model.diffusion_model
    original = unet.forward

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)

    unet.forward = counting
    return calls, lambda: setattr(unet, "forward", original)


def three_prediction_formula(base, patched, noise, positive, negative, text_scale, image_scale):
    """Return eps_u + s_T (eps_c - eps_img) + s_I (eps_img - eps_u) from three separate model calls,
    and the largest memory effect |eps_img - eps_u|, all as denoised latents at GUIDANCE_SIGMA."""
    x = noise * GUIDANCE_SIGMA
    eps_c = denoise(patched, x, positive[0][0], sigma=GUIDANCE_SIGMA)
    eps_img = denoise(patched, x, negative[0][0], sigma=GUIDANCE_SIGMA)
    eps_u = denoise(base, x, negative[0][0], sigma=GUIDANCE_SIGMA)
    expected = eps_u + text_scale * (eps_c - eps_img) + image_scale * (eps_img - eps_u)
    return expected, (eps_img - eps_u).abs().max().item()


@pytest.mark.parametrize("text_scale,image_scale", [(7.5, 0.4), (4.0, 3.0), (1.0, 0.5)])
def test_image_guidance_matches_formula(base, adapter, cache, text_scale, image_scale):
    patched = apply_dreamcache(base, adapter, cache, image_scale=image_scale)
    positive, negative = text_cond(10), text_cond(11)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(positive, negative)
    guider.set_cfg(text_scale)
    guided = one_step(guider, noise, sigma=GUIDANCE_SIGMA)
    expected, memory_effect = three_prediction_formula(base, patched, noise, positive, negative, text_scale,
                                                       image_scale)

    assert (guided - expected).abs().max().item() <= 1e-4
    assert memory_effect > 1e-3, "memory had no effect; the test would prove nothing"


def test_image_guidance_batches_three_predictions(base, adapter, cache):
    patched = apply_dreamcache(base, adapter, cache, image_scale=0.4)
    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(text_cond(1), text_cond(2))
    guider.set_cfg(7.5)
    calls, restore = count_rows(patched)
    try:
        one_step(guider, torch.randn(2, 4, 8, 8))
    finally:
        restore()
    assert calls == [6]


@pytest.mark.parametrize("cfg,image_scale,rows", [(1.0, 1.0, [1]), (7.5, 1.0, [2])])
def test_no_extra_model_calls(base, adapter, cache, cfg, image_scale, rows):
    patched = apply_dreamcache(base, adapter, cache, image_scale=image_scale)
    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(text_cond(1), text_cond(2))
    guider.set_cfg(cfg)
    calls, restore = count_rows(patched)
    try:
        one_step(guider, torch.randn(1, 4, 8, 8))
    finally:
        restore()
    assert calls == rows


def test_image_scale_one_removes_guidance(base, adapter, cache):
    guided = apply_dreamcache(base, adapter, cache, image_scale=0.3)
    assert "sampler_calc_cond_batch_function" in guided.model_options
    plain = apply_dreamcache(guided, adapter, cache, image_scale=1.0)
    assert "sampler_calc_cond_batch_function" not in plain.model_options
    assert "disable_cfg1_optimization" not in plain.model_options
    assert "sampler_calc_cond_batch_function" not in base.model_options


def test_dual_cfg_guider_matches_formula(base, adapter, cache):
    text_scale, image_scale = 7.5, 0.4
    patched = apply_dreamcache(base, adapter, cache)
    positive, negative = text_cond(20), text_cond(21)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))

    guider = Guider_DualCFG(patched)
    guider.set_conds(positive, negative, negative)
    guider.set_cfg(text_scale, image_scale)
    guided = one_step(guider, noise, sigma=GUIDANCE_SIGMA)
    expected, _ = three_prediction_formula(base, patched, noise, positive, negative, text_scale, image_scale)
    assert (guided - expected).abs().max().item() <= 1e-4


def test_window_outside_sigma_is_unpatched(base, adapter, cache):
    # At sigma 2.0 (about 60 % through SD's schedule) a window ending at 20 % is inactive.
    windowed = apply_dreamcache(base, adapter, cache, start_percent=0.0, end_percent=0.2)
    positive, negative = text_cond(1), text_cond(2)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    results = []
    for model in (windowed, base, apply_dreamcache(base, adapter, cache)):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(5.0)
        results.append(one_step(guider, noise))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[2], results[1])


def test_window_uses_sampling_model_sampling(base, adapter, cache, monkeypatch):
    patched = apply_dreamcache(base, adapter, cache, start_percent=0.25, end_percent=0.75)
    (resampled,) = ModelSamplingDiscrete().patch(patched, "v_prediction", True)
    recorded = []
    original = patch_module.DreamCachePatch.prepare

    def spy(self, device, dtype, sigma_windows=None):
        recorded.append(sigma_windows)
        return original(self, device, dtype, sigma_windows)

    monkeypatch.setattr(patch_module.DreamCachePatch, "prepare", spy)
    guider = comfy.samplers.CFGGuider(resampled)
    guider.set_conds(text_cond(1), text_cond(2))
    guider.set_cfg(5.0)
    one_step(guider, torch.randn(1, 4, 8, 8), sigma=1.0)

    sampling = resampled.get_model_object("model_sampling")
    expected = (sampling.percent_to_sigma(0.25), sampling.percent_to_sigma(0.75))
    stock = base.get_model_object("model_sampling")
    assert recorded == [((pytest.approx(expected[0]), pytest.approx(expected[1])),)]
    assert abs(stock.percent_to_sigma(0.75) - expected[1]) > 1e-3, "zsnr should move the window"


def test_window_per_sample_sigmas(base, adapter, cache):
    patched = apply_dreamcache(base, adapter, cache, start_percent=0.5, end_percent=1.0)
    sampling = base.get_model_object("model_sampling")
    high, low = sampling.percent_to_sigma(0.2), sampling.percent_to_sigma(0.8)
    windows = ((sampling.percent_to_sigma(0.5), 0.0),)
    (active_patch,) = {p.__self__ for p in patched.model_options["transformer_options"]["patches"]["middle_patch"]}
    state = patch_module.RunState({id(active_patch): active_patch.prepare(torch.device("cpu"), torch.float32, windows)})

    x = torch.randn(2, 4, 8, 8)
    context = text_cond(1)[0][0].expand(2, -1, -1)
    sigmas = torch.tensor([high, low])
    # calc_cond_batch puts the per-sample sigmas in transformer_options; a direct call must too.
    options = dict(patched.model_options["transformer_options"], sigmas=sigmas, **{patch_module.RUN_STATE_KEY: state})
    with torch.no_grad():
        mixed = base.model.apply_model(x, sigmas, c_crossattn=context,
                                       transformer_options=copy.copy(options))
    plain_high = denoise(base, x[:1], context[:1], sigma=high)
    patched_low = denoise(patched, x[1:], context[:1], sigma=low)
    assert (mixed[:1] - plain_high).abs().max().item() <= 1e-5
    assert (mixed[1:] - patched_low).abs().max().item() <= 1e-5


def test_zero_mask_equals_unpatched(base, adapter, cache):
    patched = apply_dreamcache(base, adapter, cache, mask=torch.zeros(1, 40, 30))
    x = torch.randn(1, 4, 8, 8)
    context = text_cond(1)[0][0]
    assert torch.equal(denoise(patched, x, context), denoise(base, x, context))


def test_mask_odd_latent_grid(base, adapter, cache):
    # 520 x 776 px is a 65 x 97 latent: every block's token grid is odd-sized.
    mask = torch.zeros(1, 520, 776)
    mask[:, :, :388] = 1.0
    patched = apply_dreamcache(base, adapter, cache, mask=mask)
    full = apply_dreamcache(base, adapter, cache)
    x = torch.randn(1, 4, 65, 97)
    context = text_cond(1)[0][0]
    masked_out = denoise(patched, x, context)
    assert torch.isfinite(masked_out).all()
    assert not torch.equal(masked_out, denoise(base, x, context))
    assert not torch.equal(masked_out, denoise(full, x, context))


def test_mask_zero_tokens_unchanged_in_block(base, adapter, cache, monkeypatch):
    mask = torch.zeros(1, 65, 97)
    mask[:, :, :40] = 1.0
    patched = apply_dreamcache(base, adapter, cache, mask=mask)
    checked = []
    original = patch_module.DreamCachePatch.middle

    def spy(self, hidden, extra_options):
        out = original(self, hidden, extra_options)
        height, width = extra_options["activations_shape"][-2:]
        grid = torch.nn.functional.interpolate(mask[:, None], size=(height, width), mode="bilinear")
        zero_tokens = grid.reshape(-1) == 0
        memory_block = (extra_options["block"], extra_options["block_index"]) in self.blocks
        if memory_block and zero_tokens.any():
            assert torch.equal(out[:, zero_tokens], hidden[:, zero_tokens])
            checked.append(extra_options["block"])
        return out

    monkeypatch.setattr(patch_module.DreamCachePatch, "middle", spy)
    patched = apply_dreamcache(base, adapter, cache, mask=mask)
    denoise(patched, torch.randn(1, 4, 65, 97), text_cond(1)[0][0])
    assert len(checked) == 5


def test_mask_count_mismatch_names_counts(base, adapter, cache):
    patched = apply_dreamcache(base, adapter, cache, mask=torch.ones(3, 8, 8))
    with pytest.raises(DreamCacheMismatchError, match="mask has 3 items but the latent batch has 2"):
        denoise(patched, torch.randn(2, 4, 8, 8), text_cond(1)[0][0])


def test_per_item_cache_maps_latents(base, adapter):
    first, second = random_cache(base, seed=5), random_cache(base, seed=6)
    pair = SubjectCache(first.fingerprint, {path: torch.cat([first.memory[path], second.memory[path]])
                                            for path in first.memory}, {"label": "pair"})
    x = torch.randn(2, 4, 8, 8)
    context = text_cond(1)[0][0]
    together = denoise(apply_dreamcache(base, adapter, pair), x, context)
    alone_0 = denoise(apply_dreamcache(base, adapter, first), x[:1], context)
    alone_1 = denoise(apply_dreamcache(base, adapter, second), x[1:], context)
    assert (together[:1] - alone_0).abs().max().item() <= 1e-4
    assert (together[1:] - alone_1).abs().max().item() <= 1e-4
    assert (alone_0 - alone_1).abs().max().item() > 1e-2


def test_single_subject_broadcasts_over_batch(base, adapter, cache):
    patched = apply_dreamcache(base, adapter, cache)
    x = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1).contiguous()
    out = denoise(patched, x, text_cond(1)[0][0])
    assert (out[0] - out[2]).abs().max().item() <= 1e-5


def test_split_cond_uncond_passes_match(base, adapter, cache, monkeypatch):
    patched = apply_dreamcache(base, adapter, cache, image_scale=0.5)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))

    def run():
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(text_cond(1), text_cond(2))
        guider.set_cfg(6.0)
        return one_step(guider, noise, sigma=GUIDANCE_SIGMA)

    together = run()
    calls, restore = count_rows(patched)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: 1)
    try:
        split = run()
    finally:
        restore()
    assert len(calls) > 1, f"ComfyUI did not split the batch: {calls}"
    assert (together - split).abs().max().item() <= 1e-4


def half_attention_replace(q, k, v, extra_options):
    """An attn2 replace patch like IP-Adapter-style packs install: attention scaled by 0.5."""
    heads = extra_options["n_heads"]
    batch, tokens, channels = q.shape
    split = [t.reshape(t.shape[0], -1, heads, channels // heads).transpose(1, 2) for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*split)
    return 0.5 * out.transpose(1, 2).reshape(batch, tokens, channels)


def with_attn2_replace(model_patcher, calls):
    patched = model_patcher.clone()

    def replace(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return half_attention_replace(q, k, v, extra_options)

    for block in [("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0)] + \
            [("output", index) for index in range(3, 12)]:
        patched.set_model_attn2_replace(replace, block[0], block[1])
    return patched


def test_lives_beside_attn2_replace_packs(base, adapter, cache):
    calls_other, calls_both_a, calls_both_b = [], [], []
    x = torch.randn(1, 4, 8, 8)
    context = text_cond(1)[0][0]

    other = with_attn2_replace(base, calls_other)
    other_out = denoise(other, x, context)
    other_then_ours = apply_dreamcache(with_attn2_replace(base, calls_both_a), adapter, cache)
    ours_then_other = with_attn2_replace(apply_dreamcache(base, adapter, cache), calls_both_b)
    out_a = denoise(other_then_ours, x, context)
    out_b = denoise(ours_then_other, x, context)
    ours_only = denoise(apply_dreamcache(base, adapter, cache), x, context)

    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, other_out)
    assert not torch.equal(out_a, ours_only)
    assert calls_other == calls_both_a == calls_both_b
    # Bypassing Apply DreamCache gives the other pack's result exactly.
    assert torch.equal(denoise(other, x, context), other_out)


def test_samplers_see_only_their_subject(base, adapter):
    cache_a, cache_b = random_cache(base, seed=30), random_cache(base, seed=31)
    model_a, model_b = apply_dreamcache(base, adapter, cache_a), apply_dreamcache(base, adapter, cache_b)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))

    def sample(model):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(text_cond(1), text_cond(2))
        guider.set_cfg(5.0)
        return one_step(guider, noise)

    solo_a, solo_b, solo_raw = sample(apply_dreamcache(base, adapter, cache_a)), \
        sample(apply_dreamcache(base, adapter, cache_b)), sample(base)
    graph = [sample(model_a), sample(model_b), sample(base)]
    assert torch.equal(graph[0], solo_a)
    assert torch.equal(graph[1], solo_b)
    assert torch.equal(graph[2], solo_raw)
    assert not torch.equal(graph[0], graph[1])
