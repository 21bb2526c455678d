"""Cost of Build DreamCache against one sampling step, a full U-Net pass and an image encoder.

Cases, interleaved over ``--repeats`` rounds in one process:

* ``build_unet``: the pack's ``build_cache`` on one reference at ``--size`` with the VAE encode
  replaced by a fixed latent, so it times the U-Net part (noising, one pass stopped after the
  last memory layer, fp16 copy of the memory).
* ``full_pass``: the same batch-1 U-Net call run to the end, to show what stopping early saves.
* ``unpatched_step``: one unpatched CFG model call (batch 2: prompt and negative).
* ``vae_encode``: ComfyUI's VAE encode of the reference (full-size SD AutoencoderKL).
* ``clip_vision_h``: an IP-Adapter-style reference encoding with ComfyUI's ClipVisionModel and
  the CLIP ViT-H/14 config (632M parameters, 224 px, crop and normalisation included).

Example::

    COMFYUI_PATH=/opt/ComfyUI python benchmarks/bench_build.py --model sd21 --size 512
"""

from __future__ import annotations

import argparse

import bench_common as common


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, default_repeats=4)
    parser.add_argument("--no-clip-vision", action="store_true", help="skip the ViT-H/14 encoder baseline")
    return parser.parse_args()


def blocks_reached(diffusion_model, run) -> list[str]:
    """Run ``run()`` and return the top-level U-Net blocks whose first layer ran, in order.

    ComfyUI's UNetModel calls the layers inside each block directly, never the block's own
    forward, so the hooks sit on every block's first layer.
    """
    reached = []
    handles = []
    named = [("input_blocks", index, module[0]) for index, module in enumerate(diffusion_model.input_blocks)]
    named.append(("middle_block", None, diffusion_model.middle_block[0]))
    named += [("output_blocks", index, module[0]) for index, module in enumerate(diffusion_model.output_blocks)]
    named.append(("out", None, diffusion_model.out))
    for group, index, module in named:
        name = group if index is None else f"{group}.{index}"
        handles.append(module.register_forward_pre_hook(lambda _module, _args, name=name: reached.append(name)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return reached


def main() -> None:
    args = parse_arguments()
    common.setup_comfy()
    common.print_header(f"Build DreamCache cost, {args.model}, reference at {args.size} px", args)

    import torch
    from dreamcache_core.builder import build_cache, caching_sigma

    model = common.build_model(args.model)
    vae = common.build_vae()
    clip_vision = None if args.no_clip_vision else common.build_clip_vision_h()
    print(f"VAE weights {vae.vae_dtype}; U-Net weights {model.model.get_dtype()}")

    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    base_model = model.model
    device = model.load_device
    image = common.reference_image(args.size)
    latent_vae = common.LatentVAE(common.reference_latent(args.size))

    sigma = caching_sigma(model.get_model_object("model_sampling"))
    noisy = base_model.process_latent_in(common.reference_latent(args.size)).to(device)
    context = common.text_conditioning(model, common.SEED + 10)[0][0].to(device)
    step_latent = torch.randn(2, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(7))
    step_context = torch.cat([context, common.text_conditioning(model, common.SEED + 11)[0][0].to(device)])

    def build_unet():
        build_cache(model, latent_vae, image, resolution=args.size, label="benchmark")

    def full_pass():
        base_model.apply_model(noisy, sigma.reshape(1).to(device), c_crossattn=torch.zeros_like(context))

    def unpatched_step():
        base_model.apply_model(step_latent.to(device), torch.full((2,), 5.0, device=device), c_crossattn=step_context)

    def vae_encode():
        vae.encode(image)

    def encode_clip_vision():
        clip_vision.encode_image(image)

    cases = {"build_unet": build_unet, "full_pass": full_pass, "unpatched_step": unpatched_step,
             "vae_encode": vae_encode}
    if clip_vision is not None:
        cases["clip_vision_h"] = encode_clip_vision

    with torch.inference_mode():
        build_path = blocks_reached(base_model.diffusion_model, build_unet)
        full_path = blocks_reached(base_model.diffusion_model, full_pass)
        print(f"Build DreamCache runs {len(build_path)} of the {len(full_path)} top-level U-Net blocks; "
              f"last reached: {build_path[-1]}; skipped: {[name for name in full_path if name not in build_path]}")
        for case in cases.values():
            case()  # warm-up
        samples = common.run_interleaved({name: (lambda case=case: common.timed_call(case))
                                          for name, case in cases.items()}, args.repeats)

    samples["build_unet_plus_vae_encode"] = [[(unet[0][0] + encode[0][0], unet[0][1] + encode[0][1])]
                                             for unet, encode in zip(samples["build_unet"], samples["vae_encode"])]
    print()
    common.print_summary(samples, "per call")
    print()
    for metric in common.METRICS:
        print(common.ratio_line("build_unet / unpatched_step", samples["build_unet"], samples["unpatched_step"],
                                metric))
        print(common.ratio_line("build_unet / full_pass", samples["build_unet"], samples["full_pass"], metric))
        print(common.ratio_line("vae_encode / unpatched_step", samples["vae_encode"], samples["unpatched_step"],
                                metric))
        print(common.ratio_line("build_unet + vae_encode / unpatched_step", samples["build_unet_plus_vae_encode"],
                                samples["unpatched_step"], metric))
        if clip_vision is not None:
            print(common.ratio_line("clip_vision_h / build_unet", samples["clip_vision_h"], samples["build_unet"],
                                    metric))


if __name__ == "__main__":
    main()
