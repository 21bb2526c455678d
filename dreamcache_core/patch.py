"""The DreamCache block patch, as a pair of ComfyUI transformer patches.

ComfyUI's ``BasicTransformerBlock`` computes ``a = attn1(norm1(x))``, passes ``a`` through every
``attn1_output_patch``, adds it to ``x`` and passes the sum through every ``middle_patch``. This
module hooks both lists:

* ``attn1_output`` keeps ``a`` (returned unchanged) in the block call's ``extra_options`` dict,
  which ComfyUI creates fresh for every block call and hands to both patch lists;
* ``middle`` receives ``x + a``, recovers ``x``, and adds for every subject i

      s_i * mask_i * (linear_cat([a ; m_i]) - a),   m_i = attn_mem(norm2_mem(x), M_i)

  so s = 1 with a full mask is the released block, x + linear_cat([a ; m]), and s = 0 leaves
  the stock block untouched. Because the sum is linear in each subject's term, several subjects
  compose per block and their order does not matter.

The patch object is immutable. Everything that depends only on the caches and adapters (device
copies, memory keys and values, resized masks) is built once per sampling run by
:meth:`DreamCachePatch.prepare` and handed to the blocks through ``transformer_options``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import torch
import torch.nn.functional as F

from .adapter import BlockWeights, DreamCacheAdapter, fused_residual_delta, memory_attention_output, memory_keys_values
from .cache import SubjectCache
from .errors import DreamCacheMismatchError

logger = logging.getLogger(__name__)

# transformer_options keys owned by this pack.
RUN_STATE_KEY = "dreamcache_run_state"
MEMORY_CHUNKS_KEY = "dreamcache_memory_chunks"
ATTN1_STASH_KEY = "dreamcache_attn1_output"


@dataclasses.dataclass(frozen=True)
class Subject:
    """One cache applied with one adapter.

    ``start_percent`` and ``end_percent`` bound the part of the schedule where memory acts. The
    sampling wrapper turns them into a (sigma_max, sigma_min) window with the model_sampling that
    samples. ``mask`` is an optional ``M x H x W`` tensor in [0, 1], M = 1 or one per latent.
    """

    adapter: DreamCacheAdapter
    cache: SubjectCache
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    mask: torch.Tensor | None = None

    @property
    def digest(self) -> str:
        """A content digest of the cache, used to order subjects so the sum does not depend on node order."""
        hasher = hashlib.sha256()
        for layer in self.cache.fingerprint.layers:
            hasher.update(self.cache.memory[layer.path].detach().cpu().contiguous().numpy().tobytes())
        hasher.update(repr((self.strength, self.start_percent, self.end_percent)).encode())
        if self.mask is not None:
            hasher.update(self.mask.detach().float().cpu().contiguous().numpy().tobytes())
        return hasher.hexdigest()


@dataclasses.dataclass
class PreparedSubject:
    """One subject's tensors for one block, on the activations' device and dtype."""

    weights: BlockWeights
    keys: torch.Tensor
    values: torch.Tensor
    strength: float
    sigma_window: tuple[float, float] | None
    mask: torch.Tensor | None
    resized_masks: dict = dataclasses.field(default_factory=dict)

    def mask_tokens(self, height: int, width: int) -> torch.Tensor | None:
        """Return the mask resized to an h x w token grid as M x (h*w) x 1, memoised per grid."""
        if self.mask is None:
            return None
        grid = (height, width)
        if grid not in self.resized_masks:
            resized = F.interpolate(self.mask[:, None].float(), size=grid, mode="bilinear", align_corners=False)
            self.resized_masks[grid] = resized.reshape(self.mask.shape[0], height * width, 1).to(self.keys.dtype)
        return self.resized_masks[grid]


class PreparedRun:
    """Per-block prepared subjects for one patch, one device and one dtype (one sampling run)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, blocks: dict):
        self.device = device
        self.dtype = dtype
        self.blocks = blocks

    def __deepcopy__(self, memo):
        return self


class DreamCachePatch:
    """The immutable DreamCache patch of one MODEL: every applied subject, in a fixed order."""

    def __init__(self, subjects: tuple[Subject, ...]):
        self.subjects = tuple(sorted(subjects, key=lambda subject: subject.digest))
        blocks = set()
        for subject in self.subjects:
            for site in subject.adapter.sites:
                blocks.add((site.layer.block, site.block_index))
        self.blocks = frozenset(blocks)

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; the patch is immutable, so share it
        # instead of duplicating every cache tensor.
        return self

    def with_subject(self, subject: Subject) -> "DreamCachePatch":
        return DreamCachePatch(self.subjects + (subject,))

    def prepare(self, device: torch.device, dtype: torch.dtype,
                sigma_windows: tuple[tuple[float, float] | None, ...] | None = None) -> PreparedRun:
        """Move weights and caches to ``device``/``dtype`` and compute each block's memory keys and values.

        ``sigma_windows`` gives one (sigma_max, sigma_min) window or None per subject.
        """
        weights_by_adapter = {}
        blocks: dict = {}
        for index, subject in enumerate(self.subjects):
            adapter_id = id(subject.adapter)
            if adapter_id not in weights_by_adapter:
                weights_by_adapter[adapter_id] = {
                    (site.layer.block, site.block_index): BlockWeights.from_module(module, device, dtype)
                    for site, module in zip(subject.adapter.sites, subject.adapter.blocks)}
            window = sigma_windows[index] if sigma_windows is not None else None
            mask = subject.mask.to(device=device, dtype=torch.float32) if subject.mask is not None else None

            for site in subject.adapter.sites:
                key = (site.layer.block, site.block_index)
                weights = weights_by_adapter[adapter_id][key]
                memory = subject.cache.memory[site.layer.path].to(device=device, dtype=dtype)
                keys, values = memory_keys_values(weights, memory)
                blocks.setdefault(key, []).append(
                    PreparedSubject(weights=weights, keys=keys, values=values, strength=float(subject.strength),
                                    sigma_window=window, mask=mask))
        return PreparedRun(torch.device(device), dtype, blocks)

    def attn1_output(self, attn1_out: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """Keep the self-attention output for :meth:`middle` in this block call's options; return it unchanged."""
        # NOTE: middle() recovers x as (x + a) - a. An attn1_output_patch that another pack adds
        # after this one and that changes a would make that x wrong; none of the common packs do.
        return stash_attn1_output(attn1_out, extra_options, self.blocks, ATTN1_STASH_KEY)

    def middle(self, hidden: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """Add every subject's memory term to ``hidden`` = x + a (B x N x C)."""
        attn1_out = extra_options.pop(ATTN1_STASH_KEY, None)
        if attn1_out is None:
            return hidden
        block = block_key(extra_options)

        run = self._run_for(hidden, extra_options)
        subjects = run.blocks.get(block, ())
        if not subjects:
            return hidden

        rows = memory_rows(hidden.shape[0], extra_options.get("cond_or_uncond"), extra_options.get(MEMORY_CHUNKS_KEY))
        if rows is not None and rows.numel() == 0:
            return hidden

        heads = int(extra_options["n_heads"])
        attn_precision = extra_options.get("attn_precision")
        height, width = extra_options.get("activations_shape", [0, 0, 0, 0])[-2:]
        chunk_count = max(1, len(extra_options.get("cond_or_uncond") or [0]))
        chunk_size = hidden.shape[0] // chunk_count
        sigmas = extra_options.get("sigmas")

        terms = []
        for subject in subjects:
            row_weight = subject_row_weights(subject, hidden.shape[0], rows, sigmas, hidden.device, hidden.dtype)
            if row_weight is None:
                continue
            selection = RowSelection.from_weights(row_weight)
            keys = selection.items(subject.keys, chunk_size, "cache")
            values = selection.items(subject.values, chunk_size, "cache")
            a = selection.take(attn1_out)
            x = selection.take(hidden) - a
            m = memory_attention_output(subject.weights, x, keys, values, heads, attn_precision)
            term = fused_residual_delta(subject.weights, a, m)
            if not selection.unit_weights:
                # Multiplying by a weight of exactly 1 changes nothing, so it is skipped.
                term = term * selection.take(row_weight)[:, None, None]

            mask = subject.mask_tokens(height, width)
            if mask is not None:
                if mask.shape[1] != x.shape[1]:
                    raise DreamCacheMismatchError(
                        f"Mask grid {height}x{width} has {mask.shape[1]} tokens but block {block} has {x.shape[1]}.")
                term = term * selection.items(mask, chunk_size, "mask")
            terms.append((selection, term))
        return add_terms(hidden, terms)

    def _run_for(self, hidden: torch.Tensor, extra_options: dict) -> PreparedRun:
        state = extra_options.get(RUN_STATE_KEY)
        run = state.get(self) if state is not None else None
        if run is not None and run.device == hidden.device and run.dtype == hidden.dtype:
            return run
        # Outside a sampling run (or on an unexpected device) prepare for this call only.
        logger.debug("DreamCache: preparing memory outside a sampling run for %s %s", hidden.device, hidden.dtype)
        return self.prepare(hidden.device, hidden.dtype)


def block_key(extra_options: dict) -> tuple:
    """Return (block, block_index), for example (("output", 4), 0), of the block ComfyUI is running."""
    return (extra_options.get("block"), extra_options.get("block_index", 0))


def stash_attn1_output(attn1_out: torch.Tensor, extra_options: dict, blocks, key: str) -> torch.Tensor:
    """Keep a (B x N x C) under ``key`` in this block call's options when the block is in ``blocks``; return a.

    ComfyUI hands the same ``extra_options`` dict to the block's attn1_output and middle patches
    and makes a new one for every block call, so the value never outlives the call.
    """
    if block_key(extra_options) in blocks:
        extra_options[key] = attn1_out
    return attn1_out


class RunState:
    """Prepared runs of every DreamCache patch of one sampling run, keyed by patch object."""

    def __init__(self, runs: dict):
        self.runs = runs

    def get(self, patch: DreamCachePatch) -> PreparedRun | None:
        return self.runs.get(id(patch))

    def __deepcopy__(self, memo):
        return self


def memory_rows(batch: int, cond_or_uncond: list[int] | None, memory_chunks) -> torch.Tensor | None:
    """Return the batch rows whose chunk gets memory, or None when every row does.

    ComfyUI stacks one equal-sized chunk per entry of ``cond_or_uncond``; ``memory_chunks`` is the
    set of chunk ids that get memory (None: all).
    """
    if memory_chunks is None or not cond_or_uncond:
        return None
    chunk_size = batch // len(cond_or_uncond)
    selected = [index for index, chunk in enumerate(cond_or_uncond) if chunk in memory_chunks]
    if len(selected) == len(cond_or_uncond):
        return None
    rows = [index * chunk_size + offset for index in selected for offset in range(chunk_size)]
    return torch.tensor(rows, dtype=torch.long)


def subject_row_weights(subject: PreparedSubject, batch: int, rows: torch.Tensor | None, sigmas,
                        device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """Return each row's strength (B), zero outside the chunks and the sigma window, or None if all zero."""
    if subject.strength == 0.0:
        return None
    weight = torch.full((batch,), subject.strength, device=device, dtype=dtype)
    if rows is not None:
        selected = torch.zeros(batch, device=device, dtype=dtype)
        selected[rows.to(device)] = 1.0
        weight = weight * selected
    if subject.sigma_window is not None and sigmas is not None:
        sigma_max, sigma_min = subject.sigma_window
        per_row = sigmas.to(device=device, dtype=torch.float32).flatten()
        if per_row.numel() == 1:
            per_row = per_row.expand(batch)
        inside = (per_row <= sigma_max) & (per_row >= sigma_min)
        weight = weight * inside.to(dtype)
    if not bool((weight != 0).any()):
        return None
    return weight


def select_items(tensor: torch.Tensor, rows: torch.Tensor, chunk_size: int, what: str) -> torch.Tensor:
    """Pick the item of ``tensor`` (items x ...) for each batch row: item 0 for all, or item row % chunk_size."""
    items = tensor.shape[0]
    if items == 1:
        return tensor.expand(rows.numel(), *tensor.shape[1:])
    if items != chunk_size:
        raise DreamCacheMismatchError(
            f"The {what} has {items} items but the latent batch has {chunk_size}. Use a {what} with 1 item "
            f"(shared by every latent) or exactly {chunk_size} (one per latent).")
    return tensor[(rows % chunk_size).to(tensor.device)]


class RowSelection:
    """The batch rows one subject acts on: a slice where they are consecutive, else an index tensor.

    A slice picks rows as a view, so the common cases (every row, or one run of chunks) copy
    nothing. An index tensor gathers, which copies. Both give the same values.
    """

    def __init__(self, rows: list[int], batch: int, unit_weights: bool):
        self.rows = rows
        self.batch = batch
        self.unit_weights = unit_weights
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        self.slice = slice(rows[0], rows[0] + len(rows)) if consecutive else None
        self._indices: dict = {}

    @staticmethod
    def from_weights(row_weight: torch.Tensor) -> "RowSelection":
        """Select the rows whose weight in ``row_weight`` (B) is not zero; at least one must be non-zero."""
        weights = row_weight.tolist()
        rows = [row for row, weight in enumerate(weights) if weight != 0.0]
        return RowSelection(rows, len(weights), all(weights[row] == 1.0 for row in rows))

    @property
    def all_rows(self) -> bool:
        return len(self.rows) == self.batch

    def index(self, device: torch.device) -> torch.Tensor:
        """Return the rows as a long tensor on ``device``, made once per device."""
        if device not in self._indices:
            self._indices[device] = torch.tensor(self.rows, dtype=torch.long, device=device)
        return self._indices[device]

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the selected rows of ``tensor`` (B x ...)."""
        if self.all_rows:
            return tensor
        if self.slice is not None:
            return tensor[self.slice]
        return tensor[self.index(tensor.device)]

    def items(self, tensor: torch.Tensor, chunk_size: int, what: str) -> torch.Tensor:
        """Return the cache or mask item of each selected row, as :func:`select_items` does."""
        if tensor.shape[0] == 1:
            return tensor.expand(len(self.rows), *tensor.shape[1:])
        return select_items(tensor, self.index(tensor.device), chunk_size, what)


def add_terms(hidden: torch.Tensor, terms: list[tuple[RowSelection, torch.Tensor]]) -> torch.Tensor:
    """Return ``hidden`` plus every subject's term on that subject's rows.

    The terms are summed first, starting from zero and in subject order, and the sum is then added
    to ``hidden``, so the result does not depend on how many rows each subject covers. One term
    needs no zero-filled buffer: 0 + t is exactly t.
    """
    if not terms:
        return hidden
    if len(terms) == 1:
        selection, term = terms[0]
        if selection.all_rows:
            return hidden + term
        result = hidden.clone()
        if selection.slice is not None:
            result[selection.slice] += term
        else:
            result.index_add_(0, selection.index(hidden.device), term)
        return result

    delta = torch.zeros_like(hidden)
    for selection, term in terms:
        delta.index_add_(0, selection.index(hidden.device), term)
    return hidden + delta
