"""Training of DreamCache adapters for SD 1.x, SD 2.x and SDXL checkpoints.

Only the adapter trains; the U-Net, VAE and text encoder stay frozen. The training forward pass
uses the same adapter math as inference (see :mod:`.live_patch`). Run it with
``python -m dreamcache_core.train`` or call :func:`train` with a :class:`TrainConfig`.
"""

from .config import TrainConfig
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
