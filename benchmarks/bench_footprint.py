"""File sizes, peak memory and per-step copies of DreamCache, in real ComfyUI.

Reports:

* the cache file size per reference (fp16 ``.safetensors``) and the adapter file size;
* peak memory while sampling, unpatched against Apply DreamCache (image_scale 1 and 0.4).
  Each case runs in a fresh child process. On a CUDA device the figure is
  ``torch.cuda.max_memory_allocated`` during sampling. On the CPU a thread reads the resident set
  size from ``/proc/self/statm`` every 2 ms while sampling, and the figure is its peak minus the
  resident size just before sampling;
* per sampling step: calls to ``DreamCachePatch.prepare`` and ``memory_keys_values``, copies of
  cache or adapter tensors, and the batch size of every U-Net call. A TorchDispatchMode counts
  as a copy every ``aten::to``, ``aten::_to_copy`` and ``aten::copy_`` call whose source shares
  storage with a cache or adapter tensor and whose result does not.

Example::

    COMFYUI_PATH=/opt/ComfyUI python benchmarks/bench_footprint.py --model sd21 --size 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading

import bench_common as common

MEMORY_CASES = ("unpatched", "dreamcache", "image_guidance")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, default_repeats=5)
    parser.add_argument("--steps", type=int, default=3, help="sampling steps per run")
    parser.add_argument("--child", choices=MEMORY_CASES, help=argparse.SUPPRESS)
    return parser.parse_args()


def make_guider(model, case: str, adapter=None, cache=None):
    import comfy.samplers
    from dreamcache_core.comfy_patch import apply_dreamcache

    if case == "dreamcache":
        model = apply_dreamcache(model, adapter, cache)
    elif case == "image_guidance":
        model = apply_dreamcache(model, adapter, cache, image_scale=common.IMAGE_SCALE)
    guider = comfy.samplers.CFGGuider(model)
    positive = common.text_conditioning(model, common.SEED + 10)
    guider.set_conds(positive, common.text_conditioning(model, common.SEED + 11))
    guider.set_cfg(common.TEXT_SCALE)
    return guider


def sampling_inputs(model, size: int, steps: int):
    import torch
    import comfy.samplers

    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(common.SEED))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 20)[:steps + 1]
    return noise, latent, comfy.samplers.sampler_object("euler"), sigmas


def resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakResidentSampler:
    """Reads the resident set size every ``interval`` seconds on a thread and keeps the maximum."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = resident_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def child_peak_memory(args) -> None:
    """Sample one case in this fresh process and print its peak memory as one JSON line."""
    import resource
    import torch

    model = common.build_model(args.model)
    adapter = cache = None
    if args.child != "unpatched":
        adapter = common.random_adapter(model)
        cache = common.build_reference_cache(model, 512)
    guider = make_guider(model, args.child, adapter, cache)
    noise, latent, sampler, sigmas = sampling_inputs(model, args.size, args.steps)

    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    with torch.inference_mode():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=common.SEED)
            torch.cuda.synchronize()
            result = {"method": "torch.cuda.max_memory_allocated", "before": before,
                      "peak": torch.cuda.max_memory_allocated()}
        else:
            before = resident_bytes()
            with PeakResidentSampler() as sampler_thread:
                guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=common.SEED)
            result = {"method": "resident set size from /proc/self/statm, polled every 2 ms", "before": before,
                      "peak": sampler_thread.peak}
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result))


def measure_peak_memory(args) -> dict:
    results = {}
    for case in MEMORY_CASES:
        command = [sys.executable, os.path.abspath(__file__), "--child", case, "--model", args.model,
                   "--size", str(args.size), "--threads", str(args.threads), "--steps", str(args.steps)]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            raise RuntimeError(f"Peak-memory child process for {case} failed with exit code "
                               f"{completed.returncode}:\n{completed.stderr[-3000:]}")
        results[case] = json.loads(lines[-1][len("RESULT "):])
    return results


def storage_pointers(tensors) -> set[int]:
    return {tensor.untyped_storage().data_ptr() for tensor in tensors}


def count_step_activity(model, adapter, cache, args) -> list[dict]:
    """Sample with image guidance and return, per step, the pack's calls, cache/adapter copies and U-Net batches."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import dreamcache_core.patch as patch_module

    watched = storage_pointers(list(cache.memory.values()) + list(adapter.parameters()))
    steps = [{"prepare": 0, "memory_keys_values": 0, "copies_of_cache_or_adapter": 0, "unet_batches": []}]

    class CopyCounter(TorchDispatchMode):
        # Under inference_mode the mode receives composite ops such as aten::to before they
        # decompose, so a copy is any to/_to_copy/copy_ whose result storage differs from its source.
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            source = None
            if name in ("to", "_to_copy") and args:
                source = args[0]
            elif name == "copy_" and len(args) > 1:
                source = args[1]
            if (isinstance(source, torch.Tensor) and source.untyped_storage().data_ptr() in watched
                    and result.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()):
                steps[-1]["copies_of_cache_or_adapter"] += 1
            return result

    original_prepare = patch_module.DreamCachePatch.prepare
    original_keys_values = patch_module.memory_keys_values

    def counting_prepare(self, *call_args, **call_kwargs):
        steps[-1]["prepare"] += 1
        return original_prepare(self, *call_args, **call_kwargs)

    def counting_keys_values(*call_args, **call_kwargs):
        steps[-1]["memory_keys_values"] += 1
        return original_keys_values(*call_args, **call_kwargs)

    def on_step(step, denoised, x, total_steps):
        steps.append({"prepare": 0, "memory_keys_values": 0, "copies_of_cache_or_adapter": 0, "unet_batches": []})

    hook = model.model.diffusion_model.register_forward_pre_hook(
        lambda _module, hook_args: steps[-1]["unet_batches"].append(int(hook_args[0].shape[0])))
    patch_module.DreamCachePatch.prepare = counting_prepare
    patch_module.memory_keys_values = counting_keys_values
    try:
        guider = make_guider(model, "image_guidance", adapter, cache)
        noise, latent, sampler, sigmas = sampling_inputs(model, args.size, args.steps)
        with torch.inference_mode(), CopyCounter():
            guider.sample(noise, latent, sampler, sigmas, callback=on_step, disable_pbar=True, seed=common.SEED)
    finally:
        hook.remove()
        patch_module.DreamCachePatch.prepare = original_prepare
        patch_module.memory_keys_values = original_keys_values
    return steps[:-1]


def time_prepare(model, adapter, cache, repeats: int) -> list[tuple[float, float]]:
    """Time ``DreamCachePatch.prepare`` (weight casts, cache casts, key and value projections) for one subject."""
    import torch
    from dreamcache_core.comfy_patch import compute_dtype
    from dreamcache_core.patch import DreamCachePatch, Subject

    patch = DreamCachePatch((Subject(adapter, cache),))
    device, dtype = model.load_device, compute_dtype(model)
    with torch.inference_mode():
        patch.prepare(device, dtype)  # warm-up
        return [sample for _ in range(repeats) for sample in common.timed_call(lambda: patch.prepare(device, dtype))]


def main() -> None:
    args = parse_arguments()
    common.setup_comfy()
    if args.child:
        common.set_threads(args.threads)
        child_peak_memory(args)
        return
    common.print_header(f"DreamCache footprint, {args.model}, {args.size} px", args)

    from dreamcache_core.adapter_io import save_adapter
    from dreamcache_core.cache import save_cache

    model = common.build_model(args.model)
    adapter = common.random_adapter(model)
    cache = common.build_reference_cache(model, 512)

    with tempfile.TemporaryDirectory(prefix="dreamcache-bench-") as folder:
        cache_path = os.path.join(folder, "cache.safetensors")
        adapter_path = os.path.join(folder, "adapter.safetensors")
        save_cache(cache_path, cache)
        save_adapter(adapter_path, adapter)
        cache_bytes = os.path.getsize(cache_path)
        adapter_bytes = os.path.getsize(adapter_path)
    parameters = sum(parameter.numel() for parameter in adapter.parameters())
    adapter_dtype = next(iter(adapter.parameters())).dtype
    print(f"cache file, one reference at 512 px: {cache_bytes:,} bytes ({cache_bytes / 1e6:.2f} MB); "
          f"tensor data {cache.nbytes():,} bytes fp16")
    print(f"adapter file: {adapter_bytes:,} bytes ({adapter_bytes / 1e6:.2f} MB); {parameters:,} parameters "
          f"stored as {adapter_dtype}")

    prepare_seconds = time_prepare(model, adapter, cache, args.repeats)
    print(f"DreamCachePatch.prepare for one subject (5 blocks, 6,464 memory tokens): "
          f"{common.summarize([wall for wall, _ in prepare_seconds])} wall")

    print(f"\nper-step activity with image guidance ({args.steps} steps; step 1 includes the run set-up):")
    for index, step in enumerate(count_step_activity(model, adapter, cache, args), start=1):
        print(f"  step {index}: " + ", ".join(f"{key} {value}" for key, value in step.items()))

    print("\npeak memory while sampling (fresh process per case):")
    results = measure_peak_memory(args)
    unpatched = results["unpatched"]
    for case, result in results.items():
        growth = result["peak"] - result["before"]
        print(f"  {case:<16} before {result['before'] / 2**20:9.1f} MiB  peak {result['peak'] / 2**20:9.1f} MiB "
              f"({result['peak'] / unpatched['peak']:.3f}x unpatched)  growth while sampling {growth / 2**20:8.1f} MiB "
              f"({growth / (unpatched['peak'] - unpatched['before']):.3f}x unpatched); "
              f"ru_maxrss {result['ru_maxrss'] / 2**20:.1f} MiB")
    print(f"  method: {results['unpatched']['method']}")


if __name__ == "__main__":
    main()
