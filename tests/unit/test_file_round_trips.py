"""Adapter and cache files written and read back, and the atomic write behind both."""

import os

import pytest
import torch

from dreamcache_core.adapter import AdapterSite
from dreamcache_core.adapter_io import load_adapter, load_adapter_safetensors, save_adapter
from dreamcache_core.cache import CACHE_DTYPE, INFO_KEYS, SubjectCache, load_cache, save_cache
from dreamcache_core.safetensors_io import read_safetensors, write_atomic
from reference_math import random_adapter, random_cache, tiny_fingerprint


def leftover_temporary_files(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".part") or name.startswith(".tmp-")]


def test_adapter_round_trip(tmp_path):
    adapter = random_adapter(tiny_fingerprint("sd2"), seed=1)
    path = tmp_path / "adapter.safetensors"

    save_adapter(str(path), adapter)
    loaded = load_adapter_safetensors(str(path))

    assert loaded.fingerprint == adapter.fingerprint
    assert loaded.sites == adapter.sites
    original_state = adapter.released_state_dict()
    loaded_state = loaded.released_state_dict()
    assert sorted(loaded_state) == sorted(original_state)
    for key, tensor in original_state.items():
        assert torch.equal(loaded_state[key], tensor), key
    assert leftover_temporary_files(tmp_path) == []


def test_adapter_round_trip_extra_sites(tmp_path):
    # A layer of depth 2 has an adapter in each inner block; both sites must survive the metadata.
    fingerprint = tiny_fingerprint("sd1")
    sites = (AdapterSite(fingerprint.layers[0], 0), AdapterSite(fingerprint.layers[0], 1),
             AdapterSite(fingerprint.layers[3], 0))
    adapter = random_adapter(fingerprint, seed=2, sites=sites)
    path = tmp_path / "deep.safetensors"

    save_adapter(str(path), adapter)
    loaded = load_adapter(str(path))

    assert loaded.sites == sites
    assert loaded.fingerprint == fingerprint
    assert "diffusion_model.middle_block.1.transformer_blocks.1.linear_cat.weight" in loaded.released_state_dict()
    for key, tensor in adapter.released_state_dict().items():
        assert torch.equal(loaded.released_state_dict()[key], tensor), key


def test_adapter_file_metadata(tmp_path):
    adapter = random_adapter(tiny_fingerprint("sd2"), seed=3)
    path = tmp_path / "adapter.safetensors"
    save_adapter(str(path), adapter)

    _, metadata = read_safetensors(str(path), "")
    assert metadata["format"] == "dreamcache.adapter"
    assert metadata["format_version"] == "1"
    assert metadata["fingerprint"] == adapter.fingerprint.to_json()


def test_cache_round_trip(tmp_path):
    fingerprint = tiny_fingerprint("sd2")
    info = random_cache(fingerprint, seed=4, label="my dog").info
    generator = torch.Generator().manual_seed(4)
    # float32 memory, so saving must round it to fp16
    float_memory = {layer.path: torch.randn(2, 6, layer.channels, generator=generator)
                    for layer in fingerprint.layers}
    cache = SubjectCache(fingerprint=fingerprint, memory=float_memory, info=info)
    path = tmp_path / "dog.safetensors"

    save_cache(str(path), cache)
    loaded = load_cache(str(path))

    assert loaded.fingerprint == fingerprint
    assert loaded.info == cache.info
    assert set(loaded.info) == set(INFO_KEYS)
    assert loaded.items == 2
    assert sorted(loaded.memory) == sorted(layer.path for layer in fingerprint.layers)
    for layer in fingerprint.layers:
        stored = loaded.memory[layer.path]
        assert stored.dtype == CACHE_DTYPE
        assert stored.shape == (2, 6, layer.channels)
        assert torch.equal(stored, float_memory[layer.path].to(CACHE_DTYPE)), layer.path
    assert leftover_temporary_files(tmp_path) == []


def test_cache_metadata_records_tokens(tmp_path):
    fingerprint = tiny_fingerprint("sd1")
    cache = random_cache(fingerprint, seed=5, tokens=9)
    path = tmp_path / "cat.safetensors"
    save_cache(str(path), cache)

    _, metadata = read_safetensors(str(path), "")
    assert metadata["format"] == "dreamcache.cache"
    assert metadata["format_version"] == "1"
    assert '"tokens": 9' in metadata["layers"]
    assert metadata["label"] == "subject"


def test_write_atomic_replaces_file(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    write_atomic(str(path), b"new contents")
    assert path.read_bytes() == b"new contents"
    assert leftover_temporary_files(tmp_path) == []


def test_failed_rename_keeps_old_file(tmp_path, monkeypatch):
    fingerprint = tiny_fingerprint("sd2")
    path = tmp_path / "subject.safetensors"
    save_cache(str(path), random_cache(fingerprint, seed=6))
    old_bytes = path.read_bytes()

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        save_cache(str(path), random_cache(fingerprint, seed=7))
    monkeypatch.undo()

    assert path.read_bytes() == old_bytes
    assert leftover_temporary_files(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["subject.safetensors"]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    # A failure while the bytes are written (a full disk) must not touch the destination either.
    path = tmp_path / "adapter.safetensors"
    save_adapter(str(path), random_adapter(tiny_fingerprint("sd2"), seed=8))
    old_bytes = path.read_bytes()

    def failing_fsync(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(str(path), random_adapter(tiny_fingerprint("sd2"), seed=9))
    monkeypatch.undo()

    assert path.read_bytes() == old_bytes
    assert leftover_temporary_files(tmp_path) == []


def test_write_atomic_creates_folder(tmp_path):
    path = tmp_path / "new" / "folder" / "file.bin"
    write_atomic(str(path), b"payload")
    assert path.read_bytes() == b"payload"
