"""Training data: the two folder layouts, sample loading with bad-file skipping, and the sample order.

Layouts:

* ``released``: ``root/<object>/<stem>_generation.png`` with ``<stem>_caption.txt`` and
  ``<stem>_mask.png`` (single channel, 0 = background) beside it, as the DreamCache training set.
* ``plain``: images in ``root`` with a captions file and optional ``root/masks/<image stem>.png``.
  The captions file is ``captions.jsonl``, one ``{"file": ..., "caption": ...}`` object a line
  (``file_name``/``image`` and ``text`` are accepted too), or ``captions.txt`` with
  ``filename<TAB>caption`` a line.

Every sample has a global position p (optimizer step, micro-step, rank and row give it; see
:func:`rank_positions`). Position p reads record ``permutation(epoch)[p mod N]`` with
epoch = p div N, and all its random draws come from generators seeded by (seed, p). A sample
therefore does not depend on the number of ranks, the DataLoader workers or an earlier resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..image import pil_to_image_tensor
from .augment import ReferenceAugmentation, process_reference, process_target, sample_generator, sample_seed, uniform

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "released", "plain")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GENERATION_SUFFIX = "_generation.png"
CAPTION_FILES = ("captions.jsonl", "captions.txt")


class DataError(ValueError):
    """A sample that cannot be used (missing, corrupt or inconsistent file)."""


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """One training image: its name (for messages), files and caption.

    Exactly one of ``caption`` (plain layout) and ``caption_path`` (released layout) is set.
    """

    name: str
    image_path: str
    mask_path: str | None
    caption: str | None = None
    caption_path: str | None = None


def detect_layout(root: str) -> str:
    """Return ``plain`` when ``root`` has a captions file, else ``released``."""
    if any(os.path.isfile(os.path.join(root, name)) for name in CAPTION_FILES):
        return "plain"
    return "released"


def discover_samples(root: str, layout: str = "auto") -> list[SampleRecord]:
    """List the samples under ``root`` in sorted order, logging and skipping incomplete ones."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown data layout {layout!r}; use one of {LAYOUTS}.")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Training data folder not found: {root!r}.")
    if layout == "auto":
        layout = detect_layout(root)
    records = discover_released(root) if layout == "released" else discover_plain(root)
    if not records:
        raise ValueError(
            f"No usable training samples in {root!r} ({layout} layout). Expected "
            + ("<object>/<stem>_generation.png with _caption.txt and _mask.png beside it."
               if layout == "released" else "images with captions.jsonl or captions.txt (filename<TAB>caption)."))
    logger.info("Found %d training samples in %s (%s layout)", len(records), root, layout)
    return records


def discover_released(root: str) -> list[SampleRecord]:
    records = []
    for object_dir in sorted(entry.name for entry in os.scandir(root) if entry.is_dir()):
        folder = os.path.join(root, object_dir)
        names = set(os.listdir(folder))
        for file_name in sorted(name for name in names if name.endswith(GENERATION_SUFFIX)):
            stem = file_name[:-len(GENERATION_SUFFIX)]
            sample_name = f"{object_dir}/{file_name}"
            missing = [name for name in (f"{stem}_caption.txt", f"{stem}_mask.png") if name not in names]
            if missing:
                logger.warning("Skipping training sample %s: missing %s", sample_name, ", ".join(missing))
                continue
            records.append(SampleRecord(name=sample_name, image_path=os.path.join(folder, file_name),
                                        mask_path=os.path.join(folder, f"{stem}_mask.png"),
                                        caption_path=os.path.join(folder, f"{stem}_caption.txt")))
    return records


def read_caption_file(root: str) -> dict[str, str]:
    """Read ``captions.jsonl`` or ``captions.txt`` in ``root`` as {file name: caption}."""
    captions: dict[str, str] = {}
    jsonl = os.path.join(root, "captions.jsonl")
    if os.path.isfile(jsonl):
        with open(jsonl, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    file_name = item.get("file", item.get("file_name", item.get("image")))
                    caption = item.get("caption", item.get("text"))
                except (json.JSONDecodeError, AttributeError) as error:
                    logger.warning("Skipping line %d of %s: invalid JSON (%s)", number, jsonl, error)
                    continue
                if not isinstance(file_name, str) or not isinstance(caption, str):
                    logger.warning("Skipping line %d of %s: expected string keys 'file' and 'caption'", number, jsonl)
                    continue
                captions[file_name] = caption
        return captions

    text = os.path.join(root, "captions.txt")
    with open(text, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if "\t" not in line:
                logger.warning("Skipping line %d of %s: expected filename<TAB>caption", number, text)
                continue
            file_name, caption = line.split("\t", 1)
            captions[file_name.strip()] = caption.strip()
    return captions


def discover_plain(root: str) -> list[SampleRecord]:
    captions = read_caption_file(root)
    images = sorted(name for name in os.listdir(root)
                    if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, name)))
    mask_folder = os.path.join(root, "masks")
    records = []
    for file_name in images:
        if file_name not in captions:
            logger.warning("Skipping training sample %s: missing caption in the captions file", file_name)
            continue
        mask_path = os.path.join(mask_folder, os.path.splitext(file_name)[0] + ".png")
        records.append(SampleRecord(name=file_name, image_path=os.path.join(root, file_name),
                                    mask_path=mask_path if os.path.isfile(mask_path) else None,
                                    caption=captions[file_name]))
    for file_name in sorted(set(captions) - set(images)):
        logger.warning("Caption for %s has no image file in %s", file_name, root)
    return records


def load_image(path: str) -> torch.Tensor:
    """Read any image as 3 x H x W float in [0, 1] (alpha composited on white)."""
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_image_tensor(image)[0].permute(2, 0, 1).contiguous()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None


def load_mask(path: str, size: tuple[int, int]) -> torch.Tensor:
    """Read a mask as an H x W boolean foreground (value > 0); ``size`` is the image's (width, height)."""
    try:
        with Image.open(path) as mask:
            mask.load()
            mask_size = mask.size
            array = np.asarray(mask.convert("L"))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read mask {path}: {error}") from None
    if mask_size != size:
        raise DataError(f"mask {path} is {mask_size[0]}x{mask_size[1]} but its image is {size[0]}x{size[1]}")
    foreground = torch.from_numpy(array > 0)
    if not bool(foreground.any()):
        raise DataError(f"mask {path} has no foreground pixel")
    return foreground


def read_caption(record: SampleRecord) -> str:
    if record.caption is not None:
        return record.caption
    try:
        with open(record.caption_path, encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read caption {record.caption_path}: {error}") from None


class TrainingSamples(torch.utils.data.Dataset):
    """Map a global sample position to a processed sample: target, reference and caption.

    A sample whose files fail to load is reported once per process and replaced by the next
    record in list order, so the replacement is the same on every run.
    """

    def __init__(self, records: list[SampleRecord], seed: int, augmentation: ReferenceAugmentation,
                 caption_dropout: float = 0.07):
        if not records:
            raise ValueError("TrainingSamples needs at least one record.")
        self.records = list(records)
        self.seed = int(seed)
        self.augmentation = augmentation
        self.caption_dropout = float(caption_dropout)
        self.reported: set[str] = set()
        self._permutation_epoch = -1
        self._permutation = None

    def __len__(self) -> int:
        return len(self.records)

    def record_index(self, position: int) -> int:
        """Return the record that global sample ``position`` reads (one shuffled pass per epoch)."""
        epoch, offset = divmod(position, len(self.records))
        if epoch != self._permutation_epoch:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, "epoch", epoch))
            self._permutation = torch.randperm(len(self.records), generator=generator)
            self._permutation_epoch = epoch
        return int(self._permutation[offset])

    def __getitem__(self, position: int) -> dict:
        index = self.record_index(int(position))
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                return self.load(record, int(position))
            except DataError as error:
                if record.name not in self.reported:
                    self.reported.add(record.name)
                    logger.warning("Skipping training sample %s: %s", record.name, error)
        raise DataError(f"All {len(self.records)} training samples failed to load; see the warnings above.")

    def load(self, record: SampleRecord, position: int) -> dict:
        image = load_image(record.image_path)
        mask = None
        if record.mask_path is not None:
            mask = load_mask(record.mask_path, (image.shape[2], image.shape[1]))
        caption = read_caption(record)

        generator = sample_generator(self.seed, "augment", position)
        if uniform(generator) < self.caption_dropout:
            caption = ""
        reference = process_reference(image, mask, self.augmentation, generator)
        target = process_target(image, self.augmentation.resolution) * 2.0 - 1.0
        return {"target": target, "reference": reference, "caption": caption, "position": position,
                "name": record.name}


def rank_positions(step: int, micro_step: int, rank: int, world_size: int, micro_batch: int,
                   accumulation: int) -> list[int]:
    """Return the global sample positions of one micro-batch.

    The global batch of an optimizer step has micro_batch x accumulation x world_size samples, and
    micro-step k of rank r takes rows [(k * world_size + r) * micro_batch, ... + micro_batch).
    """
    global_batch = micro_batch * accumulation * world_size
    first = step * global_batch + (micro_step * world_size + rank) * micro_batch
    return list(range(first, first + micro_batch))


class PositionSampler(torch.utils.data.Sampler):
    """Yield this rank's sample positions for optimizer steps [start_step, max_steps), in order."""

    def __init__(self, start_step: int, max_steps: int, rank: int, world_size: int, micro_batch: int,
                 accumulation: int):
        self.start_step = start_step
        self.max_steps = max_steps
        self.rank = rank
        self.world_size = world_size
        self.micro_batch = micro_batch
        self.accumulation = accumulation

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.accumulation * self.micro_batch

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            for micro_step in range(self.accumulation):
                yield from rank_positions(step, micro_step, self.rank, self.world_size, self.micro_batch,
                                          self.accumulation)
