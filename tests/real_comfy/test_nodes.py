"""The node pack as ComfyUI loads it: registration, model folders, tooltips and the node functions."""

import asyncio
import copy
import math
import os
import types

import pytest
import torch

import folder_paths

from dreamcache_core.cache import load_cache
from dreamcache_core.comfy_patch import find_patch
from dreamcache_core.errors import DreamCacheInputError, DreamCacheMismatchError
from tiny_models import (max_abs_difference, model_inputs, random_adapter, random_cache, run_unet, tiny_model,
                         tiny_vae)

PACK_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NODE_IDS = ("DreamCacheAdapterLoader", "DreamCacheBuild", "DreamCacheSave", "DreamCacheLoad", "DreamCacheApply",
            "DreamCacheCombine")
PACK_FOLDERS = ("dreamcache", "dreamcache_caches")


def isolate_registries(tmp_path, monkeypatch):
    """Point ComfyUI's models folder at ``tmp_path/models`` and give it fresh folder and node registries.

    Returns ComfyUI's ``nodes`` module; monkeypatch restores everything after the test.
    """
    import nodes as comfy_nodes

    assert os.path.samefile(os.path.dirname(comfy_nodes.__file__), os.environ["COMFYUI_PATH"])
    folders = {name: copy.deepcopy(entry) for name, entry in folder_paths.folder_names_and_paths.items()
               if name not in PACK_FOLDERS}
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", folders)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(comfy_nodes, "NODE_CLASS_MAPPINGS", dict(comfy_nodes.NODE_CLASS_MAPPINGS))
    monkeypatch.setattr(comfy_nodes, "NODE_DISPLAY_NAME_MAPPINGS", dict(comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS))
    return comfy_nodes


@pytest.fixture
def pack(tmp_path, monkeypatch):
    """Load the pack with ComfyUI's custom-node loader, with ComfyUI's models folder under ``tmp_path``.

    An extra adapter folder is registered before the pack loads, as extra_model_paths.yaml does
    when ComfyUI starts. ComfyUI's folder and node registries are restored afterwards.
    """
    comfy_nodes = isolate_registries(tmp_path, monkeypatch)
    extra_adapters = tmp_path / "extra" / "dreamcache"
    extra_adapters.mkdir(parents=True)
    folder_paths.add_model_folder_path("dreamcache", str(extra_adapters))

    assert asyncio.run(comfy_nodes.load_custom_node(PACK_DIR))
    return types.SimpleNamespace(classes=comfy_nodes.NODE_CLASS_MAPPINGS,
                                 display_names=comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                                 adapters_dir=tmp_path / "models" / "dreamcache",
                                 caches_dir=tmp_path / "models" / "dreamcache_caches",
                                 extra_adapters=extra_adapters, root=tmp_path)


def test_pack_registers_six_nodes(pack):
    for node_id in NODE_IDS:
        node_class = pack.classes[node_id]
        assert node_class.CATEGORY == "DreamCache", node_id
        assert pack.display_names[node_id].strip(), node_id
        assert callable(getattr(node_class, node_class.FUNCTION)), node_id


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_inputs_and_outputs_have_tooltips(pack, node_id):
    node_class = pack.classes[node_id]
    inputs = node_class.INPUT_TYPES()

    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            assert len(spec) == 2, f"{node_id}.{name} has no options dict"
            assert spec[1].get("tooltip", "").strip(), f"{node_id}.{name} has no tooltip"
    tooltips = getattr(node_class, "OUTPUT_TOOLTIPS", ())
    assert len(tooltips) == len(node_class.RETURN_TYPES)
    assert all(tooltip.strip() for tooltip in tooltips)


def test_folders_keep_extra_path_and_list_files(pack):
    for name in ("a.safetensors", "b.pt", "notes.txt"):
        (pack.extra_adapters / name).write_bytes(b"0")
    pack.caches_dir.mkdir(parents=True)
    for name in ("dog.safetensors", "old.pt"):
        (pack.caches_dir / name).write_bytes(b"0")

    # A folder from extra_model_paths.yaml comes before the pack's default.
    adapter_folders = folder_paths.get_folder_paths("dreamcache")
    assert adapter_folders == [str(pack.extra_adapters), str(pack.adapters_dir)]
    assert folder_paths.get_folder_paths("dreamcache_caches")[0] == str(pack.caches_dir)

    adapters = folder_paths.get_filename_list("dreamcache")
    assert sorted(adapters) == ["a.safetensors", "b.pt"]
    assert pack.classes["DreamCacheAdapterLoader"].INPUT_TYPES()["required"]["adapter_name"][0] == adapters
    assert folder_paths.get_filename_list("dreamcache_caches") == ["dog.safetensors"]


def widget_defaults(node_class) -> dict:
    """Return the default of every required input that has one, as the ComfyUI front end fills them in."""
    return {name: spec[1]["default"] for name, spec in node_class.INPUT_TYPES()["required"].items()
            if len(spec) > 1 and "default" in spec[1]}


def run_node(node_class, **inputs):
    """Call a node's FUNCTION with its widget defaults overridden by ``inputs``."""
    return getattr(node_class(), node_class.FUNCTION)(**{**widget_defaults(node_class), **inputs})


def assert_same_cache(actual, expected):
    assert actual.fingerprint == expected.fingerprint
    assert set(actual.memory) == set(expected.memory)
    for path, tensor in expected.memory.items():
        assert torch.equal(actual.memory[path], tensor), path


def test_save_never_overwrites_silently(pack):
    model = tiny_model()
    first, second = random_cache(model, seed=2, label="first"), random_cache(model, seed=3, label="second")
    save = pack.classes["DreamCacheSave"]()

    assert save.save(first, "subject", False) == {"ui": {"text": ["subject.safetensors"]}}
    assert save.save(second, "subject", False) == {"ui": {"text": ["subject_00001.safetensors"]}}
    assert sorted(os.listdir(pack.caches_dir)) == ["subject.safetensors", "subject_00001.safetensors"]
    assert_same_cache(load_cache(str(pack.caches_dir / "subject.safetensors")), first)
    assert_same_cache(load_cache(str(pack.caches_dir / "subject_00001.safetensors")), second)

    save.save(second, "subject", True)
    assert sorted(os.listdir(pack.caches_dir)) == ["subject.safetensors", "subject_00001.safetensors"]
    assert_same_cache(load_cache(str(pack.caches_dir / "subject.safetensors")), second)


@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "../escape", "sub/../escape", "/tmp/escape"])
def test_save_rejects_path_names(pack, name):
    cache = random_cache(tiny_model())

    with pytest.raises(DreamCacheInputError, match=r"Cache name .* is invalid: .*no path separators and no '\.\.'"):
        pack.classes["DreamCacheSave"]().save(cache, name, False)
    written = [os.path.join(folder, file) for folder, _, files in os.walk(pack.root) for file in files]
    assert written == []


def test_load_round_trips_save(pack):
    cache = random_cache(tiny_model(), tokens=12, label="teapot")
    pack.classes["DreamCacheSave"]().save(cache, "teapot", False)
    load = pack.classes["DreamCacheLoad"]

    assert load.INPUT_TYPES()["required"]["cache_name"][0] == ["teapot.safetensors"]
    (loaded,) = load().load("teapot.safetensors")
    assert_same_cache(loaded, cache)
    assert loaded.info["label"] == "teapot"


def test_load_is_changed_on_rewrite(pack):
    model = tiny_model()
    save = pack.classes["DreamCacheSave"]()
    load = pack.classes["DreamCacheLoad"]
    save.save(random_cache(model, tokens=12), "subject", False)
    path = pack.caches_dir / "subject.safetensors"

    first = load.IS_CHANGED("subject.safetensors")
    assert load.IS_CHANGED("subject.safetensors") == first

    save.save(random_cache(model, tokens=20), "subject", True)
    resized = load.IS_CHANGED("subject.safetensors")
    assert resized != first

    # A same-size rewrite changes only the modification time.
    save.save(random_cache(model, tokens=20, seed=9), "subject", True)
    status = os.stat(path)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    assert load.IS_CHANGED("subject.safetensors") != resized

    assert math.isnan(load.IS_CHANGED("missing.safetensors"))


def test_adapter_loader_rereads_rewritten_file(pack):
    from dreamcache_core.adapter_io import save_adapter

    model = tiny_model()
    loader = pack.classes["DreamCacheAdapterLoader"]
    pack.adapters_dir.mkdir(parents=True, exist_ok=True)
    path = pack.adapters_dir / "tiny.safetensors"
    save_adapter(str(path), random_adapter(model, seed=1))
    first = loader.IS_CHANGED("tiny.safetensors")
    assert loader.IS_CHANGED("tiny.safetensors") == first

    replacement = random_adapter(model, seed=2)
    save_adapter(str(path), replacement)
    status = os.stat(path)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    assert loader.IS_CHANGED("tiny.safetensors") != first

    (loaded,) = loader().load("tiny.safetensors")
    expected = replacement.released_state_dict()
    for key, tensor in loaded.released_state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    assert math.isnan(loader.IS_CHANGED("missing.safetensors"))


def test_apply_node_with_masks(pack):
    model = tiny_model()
    adapter, cache = random_adapter(model), random_cache(model)
    latent, sigma, context, _ = model_inputs(model)

    def run_with(mask):
        (patched,) = run_node(pack.classes["DreamCacheApply"], model=model, adapter=adapter, cache=cache,
                              attn_mask=mask)
        return run_unet(patched, latent, sigma, context)

    base = run_unet(model, latent, sigma, context)
    unmasked = run_with(None)
    half = torch.zeros(40, 72)
    half[:, :36] = 1.0

    assert max_abs_difference(unmasked, base) > 1e-3
    assert torch.allclose(run_with(torch.ones(latent.shape[-2] * 8, latent.shape[-1] * 8)), unmasked, atol=1e-5)
    assert torch.allclose(run_with(torch.ones(40, 72)), unmasked, atol=1e-5)
    assert torch.equal(run_with(torch.zeros(40, 72)), base)
    with_half = run_with(half)
    assert max_abs_difference(with_half, base) > 1e-3
    assert max_abs_difference(with_half, unmasked) > 1e-3
    assert find_patch(model) is None


def test_build_save_load_apply_chain(pack):
    model = tiny_model()
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (built,) = run_node(pack.classes["DreamCacheBuild"], model=model, vae=tiny_vae(), image=image, resolution=64,
                        label="chain")
    run_node(pack.classes["DreamCacheSave"], cache=built, name="chain")
    (loaded,) = run_node(pack.classes["DreamCacheLoad"], cache_name="chain.safetensors")
    (patched,) = run_node(pack.classes["DreamCacheApply"], model=model, adapter=random_adapter(model), cache=loaded)

    assert_same_cache(loaded, built)
    assert loaded.info["label"] == "chain"
    latent, sigma, context, _ = model_inputs(model)
    result = run_unet(patched, latent, sigma, context)
    assert torch.isfinite(result).all()
    assert max_abs_difference(result, run_unet(model, latent, sigma, context)) > 1e-3


def test_save_uses_configured_cache_folder(tmp_path, monkeypatch):
    """A dreamcache_caches folder from extra_model_paths.yaml is where Save DreamCache writes."""
    comfy_nodes = isolate_registries(tmp_path, monkeypatch)
    secure = tmp_path / "secure" / "caches"
    secure.mkdir(parents=True)
    folder_paths.add_model_folder_path("dreamcache_caches", str(secure), is_default=True)
    assert asyncio.run(comfy_nodes.load_custom_node(PACK_DIR))

    save = comfy_nodes.NODE_CLASS_MAPPINGS["DreamCacheSave"]()
    save.save(random_cache(tiny_model(), tokens=12), "private", False)
    assert (secure / "private.safetensors").is_file()
    assert not (tmp_path / "models" / "dreamcache_caches" / "private.safetensors").exists()


@pytest.mark.parametrize("language", ["en", "ja"])
def test_locale_files_cover_every_input(pack, language):
    """Every node, input and output has an entry in locales/<language>/nodeDefs.json."""
    import json

    with open(os.path.join(PACK_DIR, "locales", language, "nodeDefs.json"), encoding="utf-8") as handle:
        definitions = json.load(handle)
    for node_id in NODE_IDS:
        node_class = pack.classes[node_id]
        entry = definitions[node_id]
        assert entry["display_name"].strip(), node_id
        names = [name for section in ("required", "optional") for name in node_class.INPUT_TYPES().get(section, {})]
        assert sorted(entry["inputs"]) == sorted(names), node_id
        assert sorted(entry.get("outputs", {})) == [str(index) for index in range(len(node_class.RETURN_TYPES))]


def test_english_locale_matches_code_tooltips(pack):
    """The front end prefers locale text, so the English locale must repeat the tooltips in the code."""
    import json

    with open(os.path.join(PACK_DIR, "locales", "en", "nodeDefs.json"), encoding="utf-8") as handle:
        definitions = json.load(handle)
    for node_id in NODE_IDS:
        node_class = pack.classes[node_id]
        entry = definitions[node_id]
        assert entry["description"] == node_class.DESCRIPTION, node_id
        for section in ("required", "optional"):
            for name, spec in node_class.INPUT_TYPES().get(section, {}).items():
                assert entry["inputs"][name]["tooltip"] == spec[1]["tooltip"], f"{node_id}.{name}"
        for index, tooltip in enumerate(getattr(node_class, "OUTPUT_TOOLTIPS", ())):
            assert entry["outputs"][str(index)]["tooltip"] == tooltip, f"{node_id} output {index}"
