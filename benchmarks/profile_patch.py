"""Profile the DreamCache block patch on the inputs of one real ComfyUI sampling step.

The script samples one step with Apply DreamCache on a full-size random-weight U-Net, records
the time spent in ``DreamCachePatch.middle`` (the only patch that computes anything) against the
whole step, and keeps every ``middle`` call's inputs. It then replays those calls alone under
``torch.profiler`` and prints the operators that cost the most. With ``--save`` it stores the
replayed outputs, and with ``--compare`` it checks them against a file saved by another version
of the code, so a speed change can be shown to leave the results bit-for-bit equal.

Example::

    COMFYUI_PATH=/opt/ComfyUI python benchmarks/profile_patch.py --model sd21 --size 512 --image-scale 0.4
"""

from __future__ import annotations

import argparse

import bench_common as common


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, default_repeats=3)
    parser.add_argument("--image-scale", type=float, default=1.0,
                        help="Apply DreamCache image_scale (1: two predictions per step)")
    parser.add_argument("--save", help="write the replayed middle() outputs to this .pt file")
    parser.add_argument("--compare",
                        help="compare the replayed outputs with this .pt file and report the max difference")
    parser.add_argument("--rows", type=int, default=15, help="operator rows to print")
    return parser.parse_args()


class MiddleRecorder:
    """Wraps ``DreamCachePatch.middle``: while ``active``, times every call and keeps copies of its inputs.

    Apply DreamCache stores bound methods, so the wrapper must be installed before it is called.
    """

    def __init__(self, patch_class, stash_key: str):
        self.patch_class = patch_class
        self.stash_key = stash_key
        self.original = patch_class.middle
        self.calls = []
        self.seconds = 0.0
        self.active = False

    def install(self) -> None:
        recorder = self

        def middle(patch, hidden, extra_options):
            if not recorder.active:
                return recorder.original(patch, hidden, extra_options)
            stash = extra_options.get(recorder.stash_key)
            if stash is not None:
                recorder.calls.append((patch, hidden.clone(), stash.clone(), dict(extra_options)))
            start = common.wall_clock()
            result = recorder.original(patch, hidden, extra_options)
            recorder.seconds += common.wall_clock() - start
            return result

        self.patch_class.middle = middle

    def uninstall(self) -> None:
        self.patch_class.middle = self.original


def replay(original_middle, calls, stash_key: str) -> list:
    """Run every recorded ``middle`` call again on its recorded inputs; return the outputs."""
    outputs = []
    for patch, hidden, stash, extra_options in calls:
        options = dict(extra_options)
        options[stash_key] = stash
        outputs.append(original_middle(patch, hidden, options))
    return outputs


def main() -> None:
    args = parse_arguments()
    common.setup_comfy()
    common.print_header(f"DreamCache patch profile, {args.model}, {args.size} px, image_scale {args.image_scale}", args)

    import torch
    import torch.profiler
    import comfy.samplers
    from dreamcache_core.comfy_patch import apply_dreamcache
    from dreamcache_core.patch import ATTN1_STASH_KEY, DreamCachePatch

    model = common.build_model(args.model)
    adapter = common.random_adapter(model)
    cache = common.build_reference_cache(model, 512)
    recorder = MiddleRecorder(DreamCachePatch, ATTN1_STASH_KEY)
    recorder.install()
    patched = apply_dreamcache(model, adapter, cache, image_scale=args.image_scale)
    guider = comfy.samplers.CFGGuider(patched)
    positive = common.text_conditioning(model, common.SEED + 10)
    guider.set_conds(positive, common.text_conditioning(model, common.SEED + 11))
    guider.set_cfg(common.TEXT_SCALE)

    generator = torch.Generator().manual_seed(common.SEED)
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = torch.randn(latent.shape, generator=generator)
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 20)[:2]

    with torch.inference_mode():
        guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=common.SEED)  # warm-up
        recorder.active = True
        start = common.wall_clock()
        guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=common.SEED)
        step_seconds = common.wall_clock() - start
        recorder.active = False

    batches = sorted({tuple(hidden.shape) for _, hidden, _, _ in recorder.calls})
    print(f"one step: {step_seconds:.3f} s, of which DreamCachePatch.middle {recorder.seconds:.3f} s "
          f"({100 * recorder.seconds / step_seconds:.1f}%) over {len(recorder.calls)} calls; hidden shapes {batches}")

    with torch.inference_mode():
        replay(recorder.original, recorder.calls, ATTN1_STASH_KEY)  # warm-up
        replay_seconds = []
        for _ in range(args.repeats):
            start = common.wall_clock()
            outputs = replay(recorder.original, recorder.calls, ATTN1_STASH_KEY)
            replay_seconds.append(common.wall_clock() - start)
        print(f"replayed middle() calls of one step: {common.summarize(replay_seconds)}")

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            replay(recorder.original, recorder.calls, ATTN1_STASH_KEY)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

    if args.save:
        torch.save([output.cpu() for output in outputs], args.save)
        print(f"saved {len(outputs)} outputs to {args.save}")
    if args.compare:
        reference = torch.load(args.compare, weights_only=True)
        if len(reference) != len(outputs):
            raise SystemExit(f"{args.compare} has {len(reference)} outputs but this run has {len(outputs)}.")
        worst = max(float((output.cpu() - expected).abs().max()) for output, expected in zip(outputs, reference))
        identical = all(torch.equal(output.cpu(), expected) for output, expected in zip(outputs, reference))
        print(f"compared with {args.compare}: bit-identical {identical}, max abs difference {worst:.3e}")


if __name__ == "__main__":
    main()
