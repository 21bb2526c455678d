"""Per-sampling-step cost of Apply DreamCache against the unpatched model, in real ComfyUI.

Cases, each a full ComfyUI sampling run (CFGGuider, euler, text scale 7.5) of ``--steps`` steps
on one latent, interleaved over ``--repeats`` rounds:

* ``unpatched``: plain two-prediction CFG, one batch-2 U-Net call per step.
* ``dreamcache``: Apply DreamCache with image_scale 1 (memory on both CFG predictions).
* ``image_guidance``: Apply DreamCache with image_scale 0.4, three predictions per step
  (negative without memory, negative with memory, prompt with memory).
* ``reference_only``: the unpatched model plus the reference latent pushed through the U-Net
  at every step (the batch grows by one), the per-step cost that caching avoids. This is a lower
  bound for reference-only methods, because it leaves out their extended self-attention.
* ``dual_cfg`` (only with ``--dual-cfg``): Apply DreamCache under ComfyUI's DualCFGGuider
  (cfg1 = 7.5, cfg2 = 0.4), the other way to get three predictions.

A step's time is the interval between two sampler callbacks, so the first step of a run, which
also prepares the memory keys and values, is reported separately and left out of the ratios.

Example::

    COMFYUI_PATH=/opt/ComfyUI python benchmarks/bench_step.py --model sd21 --size 512
"""

from __future__ import annotations

import argparse

import bench_common as common


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, default_repeats=3)
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per run (the first one is not counted)")
    parser.add_argument("--dual-cfg", action="store_true", help="also time Apply DreamCache under DualCFGGuider")
    return parser.parse_args()


def timed_sampling(guider, noise, latent, sampler, sigmas) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """Run ``guider.sample`` once.

    Returns the first step's (wall, CPU) seconds, which include the run set-up, and the same
    pair for every later step.
    """
    import torch

    stamps = []

    def on_step(step, denoised, x, total_steps):
        stamps.append(common.stamp())

    start = common.stamp()
    with torch.inference_mode():
        output = guider.sample(noise, latent, sampler, sigmas, callback=on_step, disable_pbar=True, seed=common.SEED)
    if not bool(torch.isfinite(output).all()):
        raise RuntimeError("Sampling produced non-finite values; the random weights are badly scaled.")
    later = [common.elapsed(before, after) for before, after in zip(stamps, stamps[1:])]
    return common.elapsed(start, stamps[0]), later


def reference_pass_wrapper(base_model, reference):
    """Return a model_function_wrapper that runs the noised ``reference`` latent with every U-Net call.

    The reference row is appended to the batch and its output dropped, so every step pays for
    one more U-Net pass, as reference-only methods do.
    """
    import torch

    generator = torch.Generator().manual_seed(common.SEED + 6)
    reference = base_model.process_latent_in(reference)
    reference_noise = torch.randn(reference.shape, generator=generator)

    def wrapper(apply_model, options):
        x = options["input"]
        timestep = options["timestep"]
        conditioning = dict(options["c"])
        sigma = timestep[:1].reshape(1, 1, 1, 1).to(x.device, x.dtype)
        noisy_reference = reference.to(x.device, x.dtype) + sigma * reference_noise.to(x.device, x.dtype)
        context = conditioning["c_crossattn"]
        conditioning["c_crossattn"] = torch.cat([context, context[:1]])
        output = apply_model(torch.cat([x, noisy_reference]), torch.cat([timestep, timestep[:1]]), **conditioning)
        return output[:-1]

    return wrapper


def make_guiders(args, model, adapter, cache):
    """Return each case's guider: every case samples the same latent with the same conditioning."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    from dreamcache_core.comfy_patch import apply_dreamcache

    positive = common.text_conditioning(model, common.SEED + 10)
    negative = common.text_conditioning(model, common.SEED + 11)

    def cfg_guider(model_patcher):
        guider = comfy.samplers.CFGGuider(model_patcher)
        guider.set_conds(positive, negative)
        guider.set_cfg(common.TEXT_SCALE)
        return guider

    reference_model = model.clone()
    reference_model.set_model_unet_function_wrapper(
        reference_pass_wrapper(model.model, common.reference_latent(args.size)))

    guiders = {"unpatched": cfg_guider(model),
               "dreamcache": cfg_guider(apply_dreamcache(model, adapter, cache)),
               "image_guidance": cfg_guider(apply_dreamcache(model, adapter, cache, image_scale=common.IMAGE_SCALE)),
               "reference_only": cfg_guider(reference_model)}
    if args.dual_cfg:
        dual = Guider_DualCFG(apply_dreamcache(model, adapter, cache))
        dual.set_conds(positive, negative, negative)
        dual.set_cfg(common.TEXT_SCALE, common.IMAGE_SCALE)
        guiders["dual_cfg"] = dual
    return guiders


def main() -> None:
    args = parse_arguments()
    common.setup_comfy()
    common.print_header(f"per-step cost, {args.model}, {args.size} px, {args.steps} steps per run", args)

    import torch
    import comfy.samplers

    model = common.build_model(args.model)
    adapter = common.random_adapter(model)
    cache = common.build_reference_cache(model, 512)
    print(f"cache: {cache.describe()}")

    generator = torch.Generator().manual_seed(common.SEED)
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = torch.randn(latent.shape, generator=generator)
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 20)[:args.steps + 1]

    guiders = make_guiders(args, model, adapter, cache)
    first_steps = {name: [] for name in guiders}

    def case(name):
        def run():
            first, later = timed_sampling(guiders[name], noise, latent, sampler, sigmas)
            first_steps[name].append([first])
            return later
        return run

    # One untimed run per case loads the model and warms allocator caches.
    for name in guiders:
        timed_sampling(guiders[name], noise, latent, sampler, sigmas[:2])
    samples = common.run_interleaved({name: case(name) for name in guiders}, args.repeats)

    print()
    common.print_summary(samples, "per step, first step of each run excluded")
    common.print_summary(first_steps, "first step of each run (includes preparing memory keys and values)")
    print()
    for metric in common.METRICS:
        print(common.ratio_line("dreamcache / unpatched", samples["dreamcache"], samples["unpatched"], metric))
        print(common.ratio_line("image_guidance / unpatched", samples["image_guidance"], samples["unpatched"], metric))
        print(common.ratio_line("image_guidance / dreamcache", samples["image_guidance"], samples["dreamcache"],
                                metric))
        print(common.ratio_line("reference_only / unpatched", samples["reference_only"], samples["unpatched"], metric))
        if "dual_cfg" in samples:
            print(common.ratio_line("dual_cfg / unpatched", samples["dual_cfg"], samples["unpatched"], metric))


if __name__ == "__main__":
    main()
