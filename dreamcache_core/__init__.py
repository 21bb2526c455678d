"""DreamCache for ComfyUI: subject caches, adapters and the U-Net patch.

Only ``builder``, ``comfy_patch`` and ``comfy_folders`` talk to ComfyUI; every other module is plain
PyTorch.
"""

__version__ = "0.1.0"
