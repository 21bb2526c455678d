"""Training checkpoints: adapter files in the pack's format and the resume file.

The resume file (``resume.pt``) contains the step, the adapter and optimizer state, the gradient
scaler, the global RNG states (torch, CUDA, Python ``random``, NumPy) and the data order state.
It contains only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``, and it is written atomically. All sample randomness is derived
from (seed, sample position), so restoring the step restores the data order. The global RNG
states are restored as well, for any code that draws from the global generators.
"""

from __future__ import annotations

import io
import logging
import os
import random

import numpy as np
import torch

from ..adapter import DreamCacheAdapter
from ..adapter_io import save_adapter
from ..safetensors_io import write_atomic

logger = logging.getLogger(__name__)

RESUME_FILE = "resume.pt"
RESUME_FORMAT = "dreamcache.train.resume"
RESUME_FORMAT_VERSION = 1

# Run settings that must match for a resumed run to continue the same run exactly.
RESUME_KEYS = ("seed", "global_batch", "resolution", "fingerprint", "sites", "sample_count", "prediction")


def adapter_checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"adapter-{step:06d}.safetensors")


def capture_rng_state() -> dict:
    """Return the torch, CUDA, Python and NumPy global RNG states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "position": int(numpy_state[2]),
                       "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(int(value) for value in python["internal"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume(path: str, step: int, adapter: DreamCacheAdapter, optimizer: torch.optim.Optimizer,
                scaler, run_info: dict) -> None:
    """Write the resume file for ``step`` completed optimizer steps, atomically."""
    payload = {"format": RESUME_FORMAT, "format_version": RESUME_FORMAT_VERSION, "step": int(step),
               "adapter": {key: tensor.detach().cpu() for key, tensor in adapter.state_dict().items()},
               "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": capture_rng_state(),
               "data": {"seed": run_info["seed"], "samples_seen": int(step) * run_info["global_batch"]},
               "run": dict(run_info)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def load_resume(path: str) -> dict:
    """Read a resume file with ``torch.load(weights_only=True)`` and check its format."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"Resume file not found: {path!r}.") from None
    except Exception as error:  # torch raises several types for truncated or unsafe files
        raise ValueError(f"Cannot read resume file {path!r}: {error}. Resume from an earlier file or start a "
                         "new run in an empty output folder.") from error
    if not isinstance(payload, dict) or payload.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path!r} is not a DreamCache training resume file.")
    if payload.get("format_version") != RESUME_FORMAT_VERSION:
        raise ValueError(f"Resume file {path!r} has format_version {payload.get('format_version')!r}; this "
                         f"trainer reads version {RESUME_FORMAT_VERSION}.")
    return payload


def check_resume_matches(saved: dict, current: dict, path: str) -> None:
    """Raise ValueError naming every run setting that differs between the resume file and this run."""
    differences = [f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}"
                   for key in RESUME_KEYS if saved.get(key) != current.get(key)]
    if differences:
        raise ValueError(
            f"Resume file {path!r} belongs to a different run ({'; '.join(differences)}). Pass the same options "
            "(the global batch is batch size x gradient accumulation x processes), or use a new output folder.")


def restore_training_state(payload: dict, adapter: DreamCacheAdapter, optimizer: torch.optim.Optimizer,
                           scaler) -> int:
    """Load adapter, optimizer, scaler and RNG states from a resume payload; return the completed step."""
    adapter.load_state_dict(payload["adapter"], strict=True)
    optimizer.load_state_dict(payload["optimizer"])
    if payload["scaler"]:
        # An empty state comes from a run without fp16 loss scaling; the scaler then starts fresh.
        scaler.load_state_dict(payload["scaler"])
    restore_rng_state(payload["rng"])
    return int(payload["step"])


def save_checkpoint(output_dir: str, step: int, adapter: DreamCacheAdapter, optimizer: torch.optim.Optimizer,
                    scaler, run_info: dict) -> str:
    """Write ``adapter-<step>.safetensors`` and ``resume.pt`` into ``output_dir``; return the adapter path."""
    os.makedirs(output_dir, exist_ok=True)
    adapter_path = adapter_checkpoint_path(output_dir, step)
    save_adapter(adapter_path, adapter)
    save_resume(os.path.join(output_dir, RESUME_FILE), step, adapter, optimizer, scaler, run_info)
    logger.info("Saved checkpoint at step %d: %s and %s", step, adapter_path, RESUME_FILE)
    return adapter_path
