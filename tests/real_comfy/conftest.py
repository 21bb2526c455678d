"""Bootstrap of the real-ComfyUI suite: import ComfyUI from COMFYUI_PATH, on the CPU."""

import os
import sys

COMFYUI_PATH = os.path.abspath(os.environ["COMFYUI_PATH"])
if COMFYUI_PATH not in sys.path:
    sys.path.insert(0, COMFYUI_PATH)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)

from comfy.cli_args import args  # noqa: E402

# Tests run on the CPU with PyTorch's own attention, whatever hardware the machine has.
args.cpu = True
args.use_pytorch_cross_attention = True
