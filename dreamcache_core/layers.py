"""Memory-layer maps and the base-model fingerprint.

DreamCache gives memory to the middle-block transformer and to every second decoder
transformer. For the SD 1.x / SD 2.x U-Net that is ``middle_block.1`` and
``output_blocks.{4,6,8,10}.1``; the same rule on the SDXL U-Net gives ``middle_block.1`` and
``output_blocks.{1,3,5}.1``. Only the first inner transformer block of each layer
(``transformer_index`` 0 inside the layer) carries an adapter unless stated otherwise.
"""

from __future__ import annotations

import dataclasses
import json

from .errors import DreamCacheMismatchError


@dataclasses.dataclass(frozen=True)
class MemoryLayer:
    """One memory layer: where it sits in the U-Net and its width.

    ``block`` is the key ComfyUI puts in ``transformer_options["block"]`` while that layer runs,
    for example ``("output", 4)``; ``path`` is the module path under ``diffusion_model``.
    """

    block: tuple[str, int]
    path: str
    channels: int

    def to_json(self) -> dict:
        return {"block": list(self.block), "path": self.path, "channels": self.channels}

    @staticmethod
    def from_json(data: dict) -> "MemoryLayer":
        return MemoryLayer(block=(str(data["block"][0]), int(data["block"][1])), path=str(data["path"]),
                           channels=int(data["channels"]))


# (block key, module path, channel multiplier index into the model's channel_mult)
_SD_LAYOUT = ((("middle", 0), "middle_block.1", -1),
              (("output", 4), "output_blocks.4.1", 2),
              (("output", 6), "output_blocks.6.1", 1),
              (("output", 8), "output_blocks.8.1", 1),
              (("output", 10), "output_blocks.10.1", 0))

_SDXL_LAYOUT = ((("middle", 0), "middle_block.1", -1),
                (("output", 1), "output_blocks.1.1", 2),
                (("output", 3), "output_blocks.3.1", 1),
                (("output", 5), "output_blocks.5.1", 1))

FAMILIES = ("sd1", "sd2", "sdxl")


def memory_layers(family: str, model_channels: int, channel_mult: tuple[int, ...]) -> tuple[MemoryLayer, ...]:
    """Return the memory layers of a U-Net of ``family`` with the given base width and multipliers.

    The decoder block at ``output_blocks.i`` runs at the multiplier of encoder level
    ``len(channel_mult) - 1 - i // (num_res_blocks + 1)``. The stock layouts have two res blocks per
    level, so three decoder blocks per level, which gives the levels in the tables above.
    """
    if family in ("sd1", "sd2"):
        layout = _SD_LAYOUT
        expected_levels = 4
    elif family == "sdxl":
        layout = _SDXL_LAYOUT
        expected_levels = 3
    else:
        raise DreamCacheMismatchError(
            f"Unsupported model family {family!r}. DreamCache supports {', '.join(FAMILIES)} U-Nets.")

    if len(channel_mult) != expected_levels:
        raise DreamCacheMismatchError(
            f"A {family} U-Net has {expected_levels} channel levels but this model has channel_mult "
            f"{tuple(channel_mult)}. Use an SD 1.x, SD 2.x or SDXL checkpoint with the stock layout.")

    layers = []
    for block, path, level in layout:
        layers.append(MemoryLayer(block=block, path=path, channels=model_channels * channel_mult[level]))
    return tuple(layers)


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Base model a cache or an adapter was made for, checked before either is used on a model.

    SD 1.5 and SD 2.1 have identical memory-layer widths, so the family, the text-context width
    and the prediction type are part of the fingerprint as well as the layer channels.
    """

    family: str
    context_dim: int
    prediction: str
    layers: tuple[MemoryLayer, ...]

    @property
    def layer_channels(self) -> tuple[int, ...]:
        return tuple(layer.channels for layer in self.layers)

    def describe(self) -> str:
        return (f"{self.family} (context {self.context_dim}, {self.prediction}-prediction, "
                f"layer channels {list(self.layer_channels)})")

    def to_json(self) -> str:
        return json.dumps({"family": self.family, "context_dim": self.context_dim,
                           "prediction": self.prediction,
                           "layers": [layer.to_json() for layer in self.layers]}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Fingerprint":
        data = json.loads(text)
        return Fingerprint(family=str(data["family"]), context_dim=int(data["context_dim"]),
                           prediction=str(data["prediction"]),
                           layers=tuple(MemoryLayer.from_json(item) for item in data["layers"]))


def family_from_config(context_dim: int, adm_in_channels: int | None) -> str:
    """Name the U-Net family from its text-context width, as ComfyUI's model detection does."""
    if context_dim == 768:
        return "sd1"
    if context_dim == 1024 and not adm_in_channels:
        return "sd2"
    if context_dim == 2048:
        return "sdxl"
    raise DreamCacheMismatchError(
        f"Unsupported U-Net: context_dim {context_dim}, adm_in_channels {adm_in_channels}. "
        "DreamCache supports SD 1.x (768), SD 2.x (1024) and SDXL (2048) U-Nets.")


def check_fingerprint(expected: Fingerprint, found: Fingerprint, what: str, fix: str) -> None:
    """Raise DreamCacheMismatchError naming both fingerprints when ``found`` does not fit ``expected``.

    ``what`` names the object that was checked (for example ``cache 'dog'``) and ``fix`` is the
    instruction appended to the message.
    """
    problems = []
    if found.family != expected.family:
        problems.append(f"family {found.family} vs {expected.family}")
    if found.context_dim != expected.context_dim:
        problems.append(f"context_dim {found.context_dim} vs {expected.context_dim}")
    if found.prediction != expected.prediction:
        problems.append(f"prediction {found.prediction} vs {expected.prediction}")
    if [(layer.path, layer.channels) for layer in found.layers] != \
            [(layer.path, layer.channels) for layer in expected.layers]:
        problems.append(f"layers {[(layer.path, layer.channels) for layer in found.layers]} vs "
                        f"{[(layer.path, layer.channels) for layer in expected.layers]}")
    if problems:
        raise DreamCacheMismatchError(
            f"The {what} was made for {found.describe()} but the model is {expected.describe()} "
            f"({'; '.join(problems)}). {fix}")
