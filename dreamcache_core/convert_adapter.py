"""Convert a released ``cross_attention-*.pt`` adapter to the pack's ``.safetensors`` format.

Usage::

    python -m dreamcache_core.convert_adapter cross_attention-199999.pt dreamcache_sd21.safetensors

The released file is a plain dict of 45 tensors with no record of its base model, so
``--family`` and ``--prediction`` name it (SD 2.1-base, epsilon prediction by default). The
output stores that fingerprint, so the loader can reject the adapter on a different model.
"""

from __future__ import annotations

import argparse
import os
import sys

from .adapter_io import load_released_adapter, save_adapter, stock_fingerprint
from .errors import DreamCacheError
from .layers import FAMILIES

PREDICTIONS = ("eps", "v")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dreamcache_core.convert_adapter",
        description="Convert a released DreamCache cross_attention-*.pt adapter (a dict of tensors with keys "
                    "prefixed 'diffusion_model.') to a .safetensors adapter for ComfyUI-DreamCache. "
                    "The input is read with torch.load(weights_only=True), so no pickled code runs.")
    parser.add_argument("input", help="released adapter file, for example cross_attention-199999.pt")
    parser.add_argument("output", help="path of the .safetensors adapter to write")
    parser.add_argument("--family", choices=FAMILIES, default="sd2",
                        help="base U-Net family the adapter was trained on (default: sd2, "
                             "the family of the released SD 2.1-base adapter)")
    parser.add_argument("--prediction", choices=PREDICTIONS, default="eps",
                        help="prediction type of that base model: eps (epsilon) or v (default: eps)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output file if it exists (default: exit with an error)")
    return parser


def convert(input_path: str, output_path: str, family: str = "sd2", prediction: str = "eps",
            overwrite: bool = False) -> str:
    """Convert ``input_path`` to ``output_path`` and return a one-line summary.

    Raises DreamCacheError for an unreadable or misshaped input, FileExistsError when the output
    exists and ``overwrite`` is false, and ValueError when the output does not end in .safetensors.
    """
    if not overwrite and os.path.exists(output_path):
        raise FileExistsError(f"Output {output_path!r} already exists. Pass --overwrite to replace it.")
    if not output_path.lower().endswith(".safetensors"):
        raise ValueError(f"Output {output_path!r} must end in .safetensors, which is what the adapter loader reads.")

    stock_fingerprint(family, prediction)  # reject an unknown family before reading a large file
    adapter = load_released_adapter(input_path, family, prediction)
    save_adapter(output_path, adapter)

    state = adapter.released_state_dict()
    parameters = sum(tensor.numel() for tensor in state.values())
    size = os.path.getsize(output_path)
    return (f"Wrote {output_path}: {len(state)} keys, {parameters:,} parameters, {size:,} bytes, "
            f"for {adapter.fingerprint.describe()}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit status: 0 on success, 1 on a bad input or output."""
    args = build_parser().parse_args(argv)
    try:
        summary = convert(args.input, args.output, args.family, args.prediction, args.overwrite)
    except (DreamCacheError, FileExistsError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
