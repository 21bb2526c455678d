"""The training loop: setup, optimizer steps with gradient accumulation, progress, previews and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from ..adapter import DreamCacheAdapter
from ..adapter_io import save_adapter
from ..comfy_patch import model_fingerprint
from . import distributed
from .augment import ReferenceAugmentation
from .checkpoint import RESUME_FILE, check_resume_matches, load_resume, restore_training_state, save_checkpoint
from .config import TrainConfig
from .data import PositionSampler, TrainingSamples, discover_samples
from .model import FrozenBase, TextConditioner, adapter_sites, decoder_gradient_checkpointing
from .model import load_checkpoint_components, new_adapter
from .objective import AdapterObjective, prepare_batch

logger = logging.getLogger(__name__)

FINAL_ADAPTER_FILE = "adapter.safetensors"


@dataclasses.dataclass
class TrainResult:
    """Outcome of one :func:`train` call.

    ``losses`` has the loss of each optimizer step run in this call, averaged over the global
    batch. ``samples_per_second`` counts global samples from the end of the first step to the end
    of the last, so model loading and the first step's warm-up are left out.
    """

    adapter: DreamCacheAdapter
    step: int
    losses: list[float]
    samples_per_second: float
    adapter_path: str | None


class ProgressLog:
    """Report progress: a bar redrawn every step on a terminal, and a log line every ``every`` steps.

    Both show the step, the mean loss since the last log line, samples/s and the ETA. The bar is
    drawn only when ``bar_stream`` is given (the CLI passes stderr when it is a terminal), so
    log files stay free of carriage returns.
    """

    def __init__(self, start_step: int, max_steps: int, global_batch: int, every: int, bar_stream=None):
        self.start_step = start_step
        self.max_steps = max_steps
        self.global_batch = global_batch
        self.every = every
        self.bar_stream = bar_stream
        self.window: list[float] = []
        self.start_time = self.last_time = time.perf_counter()
        self.last_step = start_step

    def update(self, step: int, loss: float) -> None:
        self.window.append(loss)
        if self.bar_stream is not None:
            elapsed = max(time.perf_counter() - self.start_time, 1e-9)
            rate = (step - self.start_step) * self.global_batch / elapsed
            remaining = (self.max_steps - step) * self.global_batch / max(rate, 1e-9)
            line = progress_bar_line(step, self.max_steps, sum(self.window) / len(self.window), rate, remaining)
            self.bar_stream.write("\r" + line + ("\n" if step == self.max_steps else ""))
            self.bar_stream.flush()
        if not self.every or (step % self.every != 0 and step != self.max_steps):
            return
        now = time.perf_counter()
        rate = (step - self.last_step) * self.global_batch / max(now - self.last_time, 1e-9)
        remaining = (self.max_steps - step) * self.global_batch / max(rate, 1e-9)
        logger.info("step %d/%d  loss %.5f  %.2f samples/s  ETA %s", step, self.max_steps,
                    sum(self.window) / len(self.window), rate, format_duration(remaining))
        self.window.clear()
        self.last_time = now
        self.last_step = step


def progress_bar_line(step: int, max_steps: int, loss: float, rate: float, remaining: float, width: int = 30) -> str:
    """Return one progress-bar line, for example ``[######------] 120/200 loss 0.10231 3.20 samples/s ETA 0:00:25``."""
    filled = width * step // max(max_steps, 1)
    return (f"[{'#' * filled}{'-' * (width - filled)}] {step}/{max_steps} loss {loss:.5f} "
            f"{rate:.2f} samples/s ETA {format_duration(remaining)}")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def save_preview(path: str, base: FrozenBase, batch: dict, denoised: torch.Tensor) -> None:
    """Save [reference | target | one-step x0 prediction] of the batch's first sample as a PNG."""
    reference = ((batch["reference"][0] + 1.0) / 2.0).movedim(0, -1)
    target = ((batch["target"][0] + 1.0) / 2.0).movedim(0, -1)
    predicted = base.decode_latents(denoised[:1])[0]
    if predicted.shape[:2] != target.shape[:2]:
        predicted = torch.nn.functional.interpolate(predicted.movedim(-1, 0)[None], size=target.shape[:2],
                                                    mode="bilinear", align_corners=False)[0].movedim(0, -1)
    row = torch.cat([reference, target, predicted.clamp(0.0, 1.0)], dim=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((row.numpy() * 255.0).round().astype(np.uint8)).save(path)


def resume_path_for(config: TrainConfig) -> str | None:
    default = os.path.join(config.output, RESUME_FILE)
    if config.resume == "auto":
        return default if os.path.isfile(default) else None
    if config.resume == "never":
        if os.path.isfile(default):
            logger.warning("Starting a new run: %s will be overwritten at the first checkpoint", default)
        return None
    return config.resume


def train(config: TrainConfig, model_patcher=None, vae=None, clip=None) -> TrainResult:
    """Train a DreamCache adapter; load the base model from ``config.checkpoint`` unless it is passed in.

    Under torchrun every process calls this; rank 0 writes the files.
    """
    config.validate()
    if model_patcher is None:
        if not config.checkpoint:
            raise ValueError("No base model: pass a checkpoint path or a ModelPatcher, VAE and CLIP.")
        model_patcher, vae, clip = load_checkpoint_components(config.checkpoint, config.mixed_precision)
    if vae is None or clip is None:
        raise ValueError("Training needs the VAE and the text encoder (CLIP) of the base model.")

    fingerprint = model_fingerprint(model_patcher)
    base = FrozenBase(model_patcher, vae, fingerprint)
    if base.dtype == torch.float16 and base.device.type == "cpu":
        raise ValueError("fp16 training needs a CUDA device; on the CPU use --mixed-precision no or bf16.")

    group = distributed.start(base.device)
    try:
        return run_training(config, base, TextConditioner(clip, base.base_model, fingerprint, config.resolution),
                            group)
    finally:
        distributed.stop(group)


def run_training(config: TrainConfig, base: FrozenBase, text: TextConditioner,
                 group: distributed.ProcessGroup) -> TrainResult:
    records = discover_samples(config.data, config.layout)
    sites = adapter_sites(base.fingerprint, base.diffusion_model, config.all_inner_blocks)
    adapter = new_adapter(base.fingerprint, sites, config.seed).to(base.device)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(base.device.type, enabled=base.dtype == torch.float16)
    global_batch = config.micro_batch * config.accumulation * group.world_size
    run_info = {"seed": config.seed, "global_batch": global_batch, "resolution": config.resolution,
                "fingerprint": base.fingerprint.to_json(), "prediction": base.fingerprint.prediction,
                "sites": json.dumps([[site.layer.path, site.block_index] for site in sites]),
                "sample_count": len(records)}

    start_step = 0
    resume_path = resume_path_for(config)
    if resume_path is not None:
        payload = load_resume(resume_path)
        check_resume_matches(payload["run"], run_info, resume_path)
        start_step = restore_training_state(payload, adapter, optimizer, scaler)
        logger.info("Resuming from %s at step %d", resume_path, start_step)
        if start_step >= config.max_steps:
            logger.info("The run already reached step %d of %d; raise max_steps to train further", start_step,
                        config.max_steps)

    parameters = sum(parameter.numel() for parameter in adapter.parameters())
    logger.info("Training a DreamCache adapter for %s: %d blocks, %d parameters, global batch %d (%d x %d x %d "
                "processes), steps %d-%d, lr %g, U-Net %s on %s", base.fingerprint.describe(), len(sites), parameters,
                global_batch, config.micro_batch, config.accumulation, group.world_size, start_step, config.max_steps,
                config.learning_rate, base.dtype, base.device)

    dataset = TrainingSamples(records, config.seed, ReferenceAugmentation(resolution=config.resolution),
                              config.caption_dropout)
    sampler = PositionSampler(start_step, config.max_steps, group.rank, group.world_size, config.micro_batch,
                              config.accumulation)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.micro_batch, sampler=sampler,
                                         num_workers=config.num_workers)
    objective = distributed.wrap(AdapterObjective(adapter, base), group, base.device)
    bar_stream = sys.stderr if group.is_main and sys.stderr.isatty() else None
    progress = ProgressLog(start_step, config.max_steps, global_batch, config.log_every if group.is_main else 0,
                           bar_stream)

    losses: list[float] = []
    adapter_path = None
    first_step_end = None
    batches = iter(loader)
    with decoder_gradient_checkpointing(base.diffusion_model, config.gradient_checkpointing):
        for step in range(start_step, config.max_steps):
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=base.device)
            for micro_step in range(config.accumulation):
                batch = next(batches)
                prepared = prepare_batch(base, text, batch, config.seed)
                with distributed.no_sync(objective, micro_step < config.accumulation - 1):
                    loss, denoised = objective(prepared)
                    scaler.scale(loss / config.accumulation).backward()
                step_loss += loss.detach() / config.accumulation
            scaler.step(optimizer)
            scaler.update()

            done = step + 1
            losses.append(float(distributed.mean_across_ranks(step_loss, group)))
            progress.update(done, losses[-1])
            if first_step_end is None:
                first_step_end = time.perf_counter()
            if group.is_main and config.preview_every and done % config.preview_every == 0:
                save_preview(os.path.join(config.output, "previews", f"step-{done:06d}.png"), base, batch, denoised)
            if (config.save_every and done % config.save_every == 0) or done == config.max_steps:
                if group.is_main:
                    adapter_path = save_checkpoint(config.output, done, adapter, optimizer, scaler, run_info)
                distributed.barrier(group)

    if group.is_main and start_step < config.max_steps:
        adapter_path = os.path.join(config.output, FINAL_ADAPTER_FILE)
        save_adapter(adapter_path, adapter)
        logger.info("Training finished at step %d: %s", config.max_steps, adapter_path)

    steps_timed = max(0, len(losses) - 1)
    elapsed = time.perf_counter() - first_step_end if first_step_end is not None else 0.0
    rate = steps_timed * global_batch / elapsed if steps_timed and elapsed > 0 else 0.0
    return TrainResult(adapter=adapter, step=max(start_step, config.max_steps), losses=losses,
                       samples_per_second=rate, adapter_path=adapter_path)
