"""Cache file names and save paths (with a stand-in folder_paths module) and mask normalization."""

import sys
import types

import pytest
import torch

from dreamcache_core import comfy_folders
from dreamcache_core.errors import DreamCacheInputError, DreamCacheMismatchError
from dreamcache_core.masks import normalize_mask


@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "../x", "/abs", "", "   ", ".hidden", "x..y",
                                  "C:\\caches\\dog", ".safetensors"])
def test_cache_name_rejected(name):
    with pytest.raises(DreamCacheInputError, match=r"Cache name .* is invalid.*Example: 'my_dog'"):
        comfy_folders.validate_cache_name(name)


def test_cache_name_too_long_rejected():
    with pytest.raises(DreamCacheInputError, match=r"is invalid: it has 300 characters, the limit is 200"):
        comfy_folders.validate_cache_name("x" * 300)
    assert comfy_folders.validate_cache_name("x" * 200) == "x" * 200


@pytest.mark.parametrize("name, stem", [("my_dog", "my_dog"), ("dog.v2", "dog.v2"), ("my dog-2", "my dog-2"),
                                        ("dog.safetensors", "dog"), (" cat ", "cat")])
def test_cache_name_accepted(name, stem):
    assert comfy_folders.validate_cache_name(name) == stem


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    """Install a stand-in ``folder_paths`` module whose cache folder is a temporary directory."""
    folder = tmp_path / "models" / "dreamcache_caches"
    fake = types.ModuleType("folder_paths")

    def get_folder_paths(name):
        assert name == comfy_folders.CACHE_FOLDER
        return [str(folder), str(tmp_path / "second")]

    fake.get_folder_paths = get_folder_paths
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return folder


def test_save_path_in_first_folder(cache_folder):
    path = comfy_folders.cache_save_path("subject", overwrite=False)
    assert path == str(cache_folder / "subject.safetensors")
    assert cache_folder.is_dir()


def test_save_path_numbered_when_taken(cache_folder):
    cache_folder.mkdir(parents=True)
    (cache_folder / "subject.safetensors").write_bytes(b"x")

    first = comfy_folders.cache_save_path("subject", overwrite=False)
    assert first == str(cache_folder / "subject_00001.safetensors")

    (cache_folder / "subject_00001.safetensors").write_bytes(b"x")
    second = comfy_folders.cache_save_path("subject.safetensors", overwrite=False)
    assert second == str(cache_folder / "subject_00002.safetensors")


def test_save_path_overwrite_reuses_name(cache_folder):
    cache_folder.mkdir(parents=True)
    (cache_folder / "subject.safetensors").write_bytes(b"x")
    assert comfy_folders.cache_save_path("subject", overwrite=True) == str(cache_folder / "subject.safetensors")


def test_save_path_rejects_escape(cache_folder):
    with pytest.raises(DreamCacheInputError, match=r"Cache name '\.\./outside' is invalid"):
        comfy_folders.cache_save_path("../outside", overwrite=False)
    assert not cache_folder.exists()


def test_mask_two_dimensional():
    mask = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    result = normalize_mask(mask)
    assert result.shape == (1, 2, 2)
    assert result.dtype == torch.float32
    assert torch.equal(result[0], mask)


def test_mask_three_dimensional():
    mask = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    result = normalize_mask(mask)
    assert result.shape == (3, 4, 5)
    assert torch.equal(result, mask)


def test_mask_four_dimensional():
    mask = torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(1)).half()
    result = normalize_mask(mask)
    assert result.shape == (2, 4, 5)
    assert result.dtype == torch.float32
    assert torch.equal(result, mask[:, 0].float())


def test_mask_values_clamped():
    result = normalize_mask(torch.tensor([[-0.5, 2.0]]))
    assert result.tolist() == [[[0.0, 1.0]]]


def test_mask_four_dimensional_channels_rejected():
    with pytest.raises(DreamCacheMismatchError, match=r"M x 1 x H x W, got \(1, 3, 4, 4\)"):
        normalize_mask(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("shape", [(4,), (1, 1, 1, 4, 4)])
def test_mask_wrong_dimensions_rejected(shape):
    with pytest.raises(DreamCacheMismatchError, match=rf"Mask has {len(shape)} dimensions"):
        normalize_mask(torch.zeros(shape))


def test_mask_empty_rejected():
    with pytest.raises(DreamCacheMismatchError, match=r"Mask is empty \(shape \(1, 0, 4\)\)"):
        normalize_mask(torch.zeros(0, 4))
