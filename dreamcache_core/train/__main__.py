"""Command line: ``python -m dreamcache_core.train --checkpoint CKPT --data DIR --output DIR``.

Run it from the pack folder (the one holding ``dreamcache_core``) with ComfyUI's Python
environment, and point ``--comfyui-path`` or ``COMFYUI_PATH`` at the ComfyUI folder. Under
``torchrun --nproc_per_node N`` each process trains on its own GPU with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from .config import TrainConfig
from .data import LAYOUTS
from .model import MIXED_PRECISION

logger = logging.getLogger("dreamcache_core.train")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainConfig(data="", output="")
    parser = argparse.ArgumentParser(prog="python -m dreamcache_core.train",
                                     description="Train a DreamCache adapter on a frozen SD 1.x, SD 2.x or SDXL "
                                                 "checkpoint.")

    parser.add_argument("--checkpoint", required=True, help="ComfyUI checkpoint file (U-Net, VAE and text encoder).")
    parser.add_argument("--data", required=True, help="Training data folder (released or plain layout).")
    parser.add_argument("--output", required=True,
                        help="Folder for adapter-<step>.safetensors, adapter.safetensors, resume.pt and previews/.")
    parser.add_argument("--comfyui-path", default=os.environ.get("COMFYUI_PATH", ""),
                        help="ComfyUI folder (default: $COMFYUI_PATH).")
    parser.add_argument("--layout", choices=LAYOUTS, default=defaults.layout,
                        help="Data layout; auto picks plain when the folder has captions.jsonl or captions.txt.")

    parser.add_argument("--resolution", type=int, default=defaults.resolution,
                        help="Side of the square target and reference images, in pixels (multiple of 64).")
    parser.add_argument("--batch-size", type=int, default=defaults.micro_batch,
                        help="Samples per forward pass on each process.")
    parser.add_argument("--gradient-accumulation", type=int, default=defaults.accumulation,
                        help="Forward passes per optimizer step; the global batch is batch size x this x processes.")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="Optimizer steps of the whole run.")

    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="AdamW learning rate.")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay.")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="Seed of the adapter init, the data order and every per-sample random draw.")
    parser.add_argument("--caption-dropout", type=float, default=defaults.caption_dropout,
                        help="Probability of training a sample on the empty caption.")

    parser.add_argument("--save-every", type=int, default=defaults.save_every,
                        help="Steps between checkpoints (adapter file and resume.pt); 0 saves only at the end.")
    parser.add_argument("--preview-every", type=int, default=defaults.preview_every,
                        help="Steps between preview PNGs (reference | target | one-step x0 prediction); 0 disables.")
    parser.add_argument("--log-every", type=int, default=defaults.log_every, help="Steps between progress lines.")

    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=defaults.mixed_precision,
                        help="Dtype of the frozen U-Net weights and activations; the adapter's weights stay float32. "
                             "fp16 uses loss scaling and needs CUDA.")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="Recompute middle-block and decoder activations in backward to save memory.")
    parser.add_argument("--all-inner-blocks", action="store_true",
                        help="Give every inner transformer block of a memory layer its own adapter (SDXL has "
                             "10 or 2 per layer); default: the first inner block only.")

    parser.add_argument("--resume", default=defaults.resume,
                        help="auto (continue from OUTPUT/resume.pt if present), never, or a resume file path.")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader worker processes per process.")
    return parser.parse_args(argv)


def config_from_arguments(arguments: argparse.Namespace) -> TrainConfig:
    return TrainConfig(data=arguments.data, output=arguments.output, checkpoint=arguments.checkpoint,
                       layout=arguments.layout, resolution=arguments.resolution, micro_batch=arguments.batch_size,
                       accumulation=arguments.gradient_accumulation, max_steps=arguments.max_steps,
                       learning_rate=arguments.learning_rate, weight_decay=arguments.weight_decay,
                       seed=arguments.seed, caption_dropout=arguments.caption_dropout,
                       save_every=arguments.save_every, preview_every=arguments.preview_every,
                       log_every=arguments.log_every, mixed_precision=arguments.mixed_precision,
                       gradient_checkpointing=arguments.gradient_checkpointing,
                       all_inner_blocks=arguments.all_inner_blocks, resume=arguments.resume,
                       num_workers=arguments.num_workers)


def set_up_comfyui(comfyui_path: str) -> None:
    """Put ComfyUI on sys.path with its argument parsing off, on the CPU when there is no CUDA device.

    Under torchrun the process's GPU is selected first, because ComfyUI picks the current device.
    """
    if not comfyui_path or not os.path.isfile(os.path.join(comfyui_path, "comfy", "model_patcher.py")):
        raise SystemExit(f"ComfyUI not found at {comfyui_path!r}; pass --comfyui-path or set COMFYUI_PATH to the "
                         "ComfyUI folder.")
    path = os.path.abspath(comfyui_path)
    if path not in sys.path:
        sys.path.insert(0, path)

    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        args.cpu = True


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    set_up_comfyui(arguments.comfyui_path)

    from .loop import train

    result = train(config_from_arguments(arguments))
    if result.adapter_path:
        logger.info("Adapter written to %s", result.adapter_path)


if __name__ == "__main__":
    main()
