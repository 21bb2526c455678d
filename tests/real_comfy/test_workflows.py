"""The shipped workflows, run by ComfyUI's own PromptExecutor on a full-size SD 2.1-base layout.

The checkpoint and adapter are random-weight files from ``checkpoint_factory``, built once per
machine (about 2.7 GB on disk). They are linked into a temporary ComfyUI models tree under the
names the workflows use, so each API workflow runs as shipped except for its size. The test runs
64x64-pixel images (8x8 latents), 2 steps and 64-pixel references. Only the save-then-load graph
keeps its 512-pixel reference, to check the size of a full cache. The UI-format files are checked
against their API copies with the nodes' own INPUT_TYPES. The ComfyUI nodes that the workflows use
from ``comfy_extras`` (custom sampling, masks) are loaded as ComfyUI loads them at start-up.
"""

import asyncio
import contextlib
import copy
import gc
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

import comfy.model_management
import execution
import folder_paths
import nodes

import checkpoint_factory
from dreamcache_core.adapter_io import load_adapter
from dreamcache_core.cache import load_cache
from dreamcache_core.comfy_folders import ADAPTER_EXTENSIONS, ADAPTER_FOLDER, CACHE_EXTENSIONS, CACHE_FOLDER
from dreamcache_core.comfy_patch import ImageGuidance, find_patch

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOW_DIR = REPO_ROOT / "workflows"
EXAMPLES_DIR = REPO_ROOT / "examples"
PACK_MODULE_NAME = "ComfyUI-DreamCache"

# File names the shipped workflows load. The test tree links the generated assets under them.
CHECKPOINT_NAME = "v2-1_512-ema-pruned.safetensors"
ADAPTER_NAME = "dreamcache_sd21.safetensors"
REFERENCE_NAMES = ("dog_reference.jpg", "dog_reference_2.jpg", "cat_reference.jpg")
# ComfyUI's own node files, from comfy_extras, that define the custom-sampling and mask nodes.
EXTRA_NODE_FILES = ("nodes_custom_sampler.py", "nodes_mask.py")
# Node types that only the frontend defines. They are saved in the UI format and left out of the API format.
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}

# Each workflow and the test that runs it. A new workflow file fails test_every_workflow_is_run.
RUN_BY = {"dreamcache_basic": "test_basic_workflow_writes_image",
          "dreamcache_side_by_side": "test_side_by_side_images_differ",
          "dreamcache_save_then_load": "test_saved_cache_of_512_reference",
          "dreamcache_load_cache": "test_load_cache_round_trips",
          "dreamcache_image_guidance": "test_image_guidance_sets_scale",
          "dreamcache_dual_cfg": "test_dual_cfg_guider_runs",
          "dreamcache_two_subjects_masks": "test_two_subjects_use_masks",
          "dreamcache_multi_reference": "test_multi_reference_concat_tokens"}

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# Widgets the frontend adds after an INT seed and after an image-upload combo. The API format omits them.
FRONTEND_ONLY_WIDGETS = {"control_after_generate", "upload"}

TEST_LATENT_PIXELS = 64
TEST_STEPS = 2
TEST_REFERENCE_RESOLUTION = 64

# Memory tokens of a 512x512 reference on the SD 2.1-base U-Net: the latent is 64x64 and the
# memory layers run at 1/8 (middle), 1/4 (output 4), 1/2 (outputs 6, 8) and 1/1 of it.
FULL_SIZE_TOKENS = {"middle_block.1": 64, "output_blocks.4.1": 256, "output_blocks.6.1": 1024,
                    "output_blocks.8.1": 1024, "output_blocks.10.1": 4096}
FULL_SIZE_CHANNELS = {"middle_block.1": 1280, "output_blocks.4.1": 1280, "output_blocks.6.1": 640,
                      "output_blocks.8.1": 640, "output_blocks.10.1": 320}
FULL_SIZE_CACHE_BYTES = 6_062_080
# Memory tokens per layer of one 64-pixel reference (an 8x8 latent) in FULL_SIZE_TOKENS order.
TEST_REFERENCE_TOKENS = [1, 4, 16, 16, 64]


class RecordingServer:
    """Stand-in for the parts of ComfyUI's PromptServer that PromptExecutor uses, recording every message."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def workflow_names() -> list[str]:
    return sorted(path.name[: -len(".api.json")] for path in WORKFLOW_DIR.glob("*.api.json"))


def read_json(path: pathlib.Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def input_specs(node_class) -> list[tuple[str, object, dict]]:
    """Return ``(name, type, options)`` of every input in INPUT_TYPES order, required before optional."""
    types = node_class.INPUT_TYPES()
    specs = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            specs.append((name, spec[0], options))
    return specs


def is_widget(kind, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def ui_widget_names(node_class) -> list[str]:
    """Return the names behind a UI node's ``widgets_values``, in the order the frontend saves them.

    The frontend puts a ``control_after_generate`` combo after an INT named seed or noise_seed (or
    one with the ``control_after_generate`` option) and an ``upload`` button after an image-upload combo.
    """
    names = []
    for name, kind, options in input_specs(node_class):
        if not is_widget(kind, options):
            continue
        names.append(name)
        if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
            names.append("control_after_generate")
        if options.get("image_upload"):
            names.append("upload")
    return names


def import_pack():
    """Import the pack from the repository root as ComfyUI imports a custom node folder."""
    if PACK_MODULE_NAME in sys.modules:
        return sys.modules[PACK_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(PACK_MODULE_NAME, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


def load_extra_nodes() -> None:
    """Register ComfyUI's ``comfy_extras`` node files in EXTRA_NODE_FILES, as ComfyUI does at start-up."""
    extras_dir = pathlib.Path(nodes.__file__).resolve().parent / "comfy_extras"
    for file_name in EXTRA_NODE_FILES:
        loaded = asyncio.run(nodes.load_custom_node(str(extras_dir / file_name), module_parent="comfy_extras"))
        assert loaded, f"ComfyUI failed to load comfy_extras/{file_name}"


@pytest.fixture(scope="module")
def pack():
    """The imported pack and ComfyUI's extra nodes, registered in NODE_CLASS_MAPPINGS for this module."""
    saved_folders = copy.deepcopy(folder_paths.folder_names_and_paths)
    saved_classes = dict(nodes.NODE_CLASS_MAPPINGS)
    saved_names = dict(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    load_extra_nodes()
    module = import_pack()
    nodes.NODE_CLASS_MAPPINGS.update(module.NODE_CLASS_MAPPINGS)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.update(module.NODE_DISPLAY_NAME_MAPPINGS)
    yield module
    nodes.NODE_CLASS_MAPPINGS.clear()
    nodes.NODE_CLASS_MAPPINGS.update(saved_classes)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.clear()
    nodes.NODE_DISPLAY_NAME_MAPPINGS.update(saved_names)
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved_folders)


@pytest.fixture(scope="module")
def comfy_tree(tmp_path_factory, pack):
    """A ComfyUI models/input/output tree with the generated checkpoint, adapter and reference images."""
    root = tmp_path_factory.mktemp("comfy")
    folders = {name: root / "models" / name for name in ("checkpoints", ADAPTER_FOLDER, CACHE_FOLDER)}
    for folder in list(folders.values()) + [root / "input", root / "output"]:
        folder.mkdir(parents=True)
    (folders["checkpoints"] / CHECKPOINT_NAME).symlink_to(checkpoint_factory.ensure_sd21_checkpoint())
    (folders[ADAPTER_FOLDER] / ADAPTER_NAME).symlink_to(checkpoint_factory.ensure_sd2_adapter())
    for image_name in REFERENCE_NAMES:
        shutil.copyfile(EXAMPLES_DIR / image_name, root / "input" / image_name)

    saved_folders = copy.deepcopy(folder_paths.folder_names_and_paths)
    saved_input, saved_output = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(folders["checkpoints"])],
                                                          set(folder_paths.supported_pt_extensions))
    folder_paths.folder_names_and_paths[ADAPTER_FOLDER] = ([str(folders[ADAPTER_FOLDER])], set(ADAPTER_EXTENSIONS))
    folder_paths.folder_names_and_paths[CACHE_FOLDER] = ([str(folders[CACHE_FOLDER])], set(CACHE_EXTENSIONS))
    folder_paths.set_input_directory(str(root / "input"))
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.filename_list_cache.clear()
    yield root
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved_folders)
    folder_paths.set_input_directory(saved_input)
    folder_paths.set_output_directory(saved_output)
    folder_paths.filename_list_cache.clear()


@contextlib.contextmanager
def fresh_executor():
    """Yield a PromptExecutor with empty caches, as in a newly started ComfyUI, and free its models afterwards."""
    prompt_executor = execution.PromptExecutor(RecordingServer())
    try:
        yield prompt_executor
    finally:
        prompt_executor.reset()
        gc.collect()
        comfy.model_management.cleanup_models()
        comfy.model_management.soft_empty_cache()


@pytest.fixture
def executor(comfy_tree):
    """A fresh PromptExecutor per test, so every node of a workflow runs instead of coming from a cache."""
    with fresh_executor() as prompt_executor:
        yield prompt_executor


def shrunk(prompt: dict, reference_resolution: int | None = TEST_REFERENCE_RESOLUTION) -> dict:
    """Return a copy of an API prompt with test-sized latents, steps and (unless None) references."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = TEST_LATENT_PIXELS
        elif node["class_type"] in ("KSampler", "BasicScheduler"):
            inputs["steps"] = TEST_STEPS
        elif node["class_type"] == "DreamCacheBuild" and reference_resolution is not None:
            inputs["resolution"] = reference_resolution
    return prompt


def run_prompt(prompt_executor, prompt: dict) -> tuple[list[str], dict]:
    """Validate and execute ``prompt`` as ComfyUI's prompt worker does, and return its output node ids and history."""
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, f"validation failed: {error} {node_errors}"

    prompt_executor.server.messages.clear()
    prompt_executor.execute(prompt, prompt_id, {"client_id": "dreamcache-test"}, outputs)
    errors = [data for event, data in prompt_executor.status_messages if event == "execution_error"]
    assert prompt_executor.success, f"execution failed: {errors}"
    assert ("execution_success", prompt_id) in [(event, data.get("prompt_id"))
                                                for event, data in prompt_executor.status_messages]

    messages = prompt_executor.server.messages
    started = {data["node"] for event, data in messages if event == "executing" and data.get("node") is not None}
    assert started == set(prompt), f"nodes {sorted(set(prompt) - started)} did not run"
    executed = {data["node"] for event, data in messages if event == "executed"}
    assert executed == set(outputs), f"output nodes {sorted(outputs)} but executed {sorted(executed)}"
    return outputs, prompt_executor.history_result


def node_output(prompt_executor, node_id: str, slot: int = 0):
    """Return output ``slot`` of node ``node_id`` from the executor's output cache (first batch entry)."""
    cached = prompt_executor.caches.outputs.get(node_id)
    assert cached is not None, f"node {node_id} has no cached output"
    outputs = getattr(cached, "outputs", cached)
    return outputs[slot][0]


def saved_images(history: dict, node_id: str, output_dir: pathlib.Path) -> list[np.ndarray]:
    """Read the images SaveImage ``node_id`` reported, as H x W x 3 float arrays in [0, 1]."""
    images = []
    for item in history["outputs"][node_id]["images"]:
        assert item["type"] == "output"
        path = output_dir / item["subfolder"] / item["filename"]
        assert path.is_file(), f"{path} was reported but not written"
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    assert images, f"node {node_id} saved no image"
    return images


def check_decoded_image(prompt_executor, vae_decode_id: str) -> None:
    image = node_output(prompt_executor, vae_decode_id)
    assert image.shape == (1, TEST_LATENT_PIXELS, TEST_LATENT_PIXELS, 3)
    assert torch.isfinite(image).all()
    assert float(image.std()) > 0.01, "decoded image is constant"


def node_ids_of(prompt: dict, class_type: str) -> list[str]:
    return sorted((node_id for node_id, node in prompt.items() if node["class_type"] == class_type), key=int)


def assert_same_cache(found, expected) -> None:
    assert found.fingerprint == expected.fingerprint
    assert sorted(found.memory) == sorted(expected.memory)
    for path, tensor in expected.memory.items():
        assert found.memory[path].dtype == torch.float16
        assert torch.equal(found.memory[path], tensor.to(torch.float16)), f"layer {path} differs"


# --- workflow files --------------------------------------------------------------------------


def test_every_workflow_is_run():
    assert workflow_names() == sorted(RUN_BY)
    ui_files = sorted(path.name[: -len(".json")] for path in WORKFLOW_DIR.glob("*.json")
                      if not path.name.endswith(".api.json"))
    assert ui_files == sorted(RUN_BY)


@pytest.mark.parametrize("name", sorted(RUN_BY))
def test_ui_workflow_matches_api_copy(name, pack):
    ui = read_json(WORKFLOW_DIR / f"{name}.json")
    api = read_json(WORKFLOW_DIR / f"{name}.api.json")
    assert ui["version"] == 0.4
    graph_nodes = [node for node in ui["nodes"] if node["type"] not in FRONTEND_ONLY_NODES]
    assert {str(node["id"]) for node in graph_nodes} == set(api)

    links = {link[0]: link for link in ui["links"]}
    for node in graph_nodes:
        node_id = str(node["id"])
        assert node["type"] == api[node_id]["class_type"], f"node {node_id}"
        node_class = nodes.NODE_CLASS_MAPPINGS[node["type"]]
        api_inputs = api[node_id]["inputs"]

        names = ui_widget_names(node_class)
        assert len(node["widgets_values"]) == len(names), f"node {node_id} {node['type']} widgets {names}"
        for widget_name, value in zip(names, node["widgets_values"]):
            if widget_name in FRONTEND_ONLY_WIDGETS:
                assert widget_name not in api_inputs
            else:
                assert api_inputs[widget_name] == value, f"node {node_id} {node['type']}.{widget_name}"

        sockets = [name for name, kind, options in input_specs(node_class) if not is_widget(kind, options)]
        assert [entry["name"] for entry in node["inputs"]] == sockets, f"node {node_id} {node['type']}"
        for slot, entry in enumerate(node["inputs"]):
            if entry["link"] is None:
                assert entry["name"] not in api_inputs, f"node {node_id}.{entry['name']} is linked in the API copy"
                continue
            _, source, source_slot, target, target_slot, link_type = links[entry["link"]]
            assert (target, target_slot) == (node["id"], slot)
            assert api_inputs[entry["name"]] == [str(source), source_slot], f"node {node_id}.{entry['name']}"
            source_class = nodes.NODE_CLASS_MAPPINGS[api[str(source)]["class_type"]]
            assert source_class.RETURN_TYPES[source_slot] == link_type == entry["type"]

        api_names = set(names) - FRONTEND_ONLY_WIDGETS | {entry["name"] for entry in node["inputs"] if entry["link"]}
        assert set(api_inputs) == api_names, f"node {node_id} {node['type']}"


@pytest.mark.parametrize("name", sorted(RUN_BY))
def test_workflow_node_types_exist(name, pack):
    comfy_types = set(nodes.NODE_CLASS_MAPPINGS) - set(pack.NODE_CLASS_MAPPINGS)
    api = read_json(WORKFLOW_DIR / f"{name}.api.json")
    ui = read_json(WORKFLOW_DIR / f"{name}.json")
    used = {node["class_type"] for node in api.values()} | {node["type"] for node in ui["nodes"]}
    used -= FRONTEND_ONLY_NODES
    assert {node_type for node_type in used if not node_type.startswith("DreamCache")} <= comfy_types
    assert {node_type for node_type in used if node_type.startswith("DreamCache")} <= set(pack.NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("name", sorted(RUN_BY))
def test_shipped_workflow_defaults(name):
    api = read_json(WORKFLOW_DIR / f"{name}.api.json")
    for node_id in node_ids_of(api, "EmptyLatentImage"):
        assert (api[node_id]["inputs"]["width"], api[node_id]["inputs"]["height"]) == (512, 512)
    for node_id in node_ids_of(api, "KSampler"):
        assert api[node_id]["inputs"]["steps"] == 30
        assert api[node_id]["inputs"]["cfg"] == 7.5
    for node_id in node_ids_of(api, "BasicScheduler"):
        assert api[node_id]["inputs"]["steps"] == 30
    for node_id in node_ids_of(api, "DualCFGGuider"):
        assert api[node_id]["inputs"]["cfg_conds"] == 7.5
    for node_id in node_ids_of(api, "DreamCacheBuild"):
        assert api[node_id]["inputs"]["resolution"] == 512


# --- the generated assets --------------------------------------------------------------------


def test_generated_checkpoint_is_sd2_eps():
    import comfy.model_base
    import comfy.model_detection
    import comfy.supported_models
    from safetensors import safe_open

    path = checkpoint_factory.ensure_sd21_checkpoint()
    norm_key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    with safe_open(path, framework="pt") as handle:
        keys = set(handle.keys())
        state = {key: handle.get_slice(key) for key in keys}
        norm_bias = handle.get_tensor(norm_key)
        token_embedding = handle.get_tensor("cond_stage_model.model.token_embedding.weight")

    assert keys == set(checkpoint_factory.checkpoint_layout())
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "cond_stage_model"}

    shapes = {key: torch.empty(state[key].get_shape(), device="meta") for key in keys}
    config = comfy.model_detection.model_config_from_unet(shapes, "model.diffusion_model.")
    assert type(config) is comfy.supported_models.SD20
    for key, value in checkpoint_factory.SD21_BASE_UNET_CONFIG.items():
        if key in config.unet_config:
            assert config.unet_config[key] == value, f"detected {key}"
    assert float(norm_bias.float().std(unbiased=False)) < 0.09
    assert config.model_type({norm_key: norm_bias.float()}, "model.diffusion_model.") == comfy.model_base.ModelType.EPS

    # Each tensor depends only on the seed and its key, so one can be recomputed on its own.
    expected = checkpoint_factory.random_checkpoint_tensor("cond_stage_model.model.token_embedding.weight",
                                                           tuple(token_embedding.shape))
    assert torch.equal(token_embedding, expected)


def test_generated_adapter_fits_sd2():
    adapter = load_adapter(checkpoint_factory.ensure_sd2_adapter())
    assert adapter.fingerprint.family == "sd2"
    assert adapter.fingerprint.prediction == "eps"
    assert [layer.channels for layer in adapter.fingerprint.layers] == [1280, 1280, 640, 640, 320]
    expected = checkpoint_factory.random_sd2_adapter()
    for key, tensor in expected.released_state_dict().items():
        assert torch.equal(adapter.released_state_dict()[key], tensor), key


# --- running the workflows -------------------------------------------------------------------


def test_basic_workflow_writes_image(executor, comfy_tree):
    prompt = shrunk(read_json(WORKFLOW_DIR / "dreamcache_basic.api.json"))
    outputs, history = run_prompt(executor, prompt)

    (save_id,) = node_ids_of(prompt, "SaveImage")
    assert outputs == [save_id]
    (image,) = saved_images(history, save_id, comfy_tree / "output")
    assert image.shape == (TEST_LATENT_PIXELS, TEST_LATENT_PIXELS, 3)
    assert image.std() > 0.01
    check_decoded_image(executor, node_ids_of(prompt, "VAEDecode")[0])

    cache = node_output(executor, node_ids_of(prompt, "DreamCacheBuild")[0])
    assert [cache.tokens(path) for path in FULL_SIZE_TOKENS] == TEST_REFERENCE_TOKENS


def test_side_by_side_images_differ(executor, comfy_tree):
    prompt = shrunk(read_json(WORKFLOW_DIR / "dreamcache_side_by_side.api.json"))
    samplers = node_ids_of(prompt, "KSampler")
    assert len({prompt[node_id]["inputs"]["seed"] for node_id in samplers}) == 1
    outputs, history = run_prompt(executor, prompt)

    images = {}
    for save_id in node_ids_of(prompt, "SaveImage"):
        (images[prompt[save_id]["inputs"]["filename_prefix"]],) = saved_images(history, save_id,
                                                                                comfy_tree / "output")
    assert sorted(images) == ["DreamCache/personalized", "DreamCache/plain"]
    for image in images.values():
        assert image.std() > 0.01
    for vae_decode_id in node_ids_of(prompt, "VAEDecode"):
        check_decoded_image(executor, vae_decode_id)

    difference = np.abs(images["DreamCache/personalized"] - images["DreamCache/plain"]).mean()
    assert difference > 1.0 / 255.0, f"personalized and plain images differ by only {difference:.5f}"


@pytest.fixture(scope="module")
def saved_cache_run(comfy_tree):
    """Run dreamcache_save_then_load with its shipped 512-pixel reference and return (built cache, saved path)."""
    prompt = shrunk(read_json(WORKFLOW_DIR / "dreamcache_save_then_load.api.json"), reference_resolution=None)
    (build_id,) = node_ids_of(prompt, "DreamCacheBuild")
    assert prompt[build_id]["inputs"]["resolution"] == 512
    with fresh_executor() as prompt_executor:
        outputs, history = run_prompt(prompt_executor, prompt)
        built = node_output(prompt_executor, build_id)

    (save_id,) = node_ids_of(prompt, "DreamCacheSave")
    assert outputs == [save_id]
    (file_name,) = history["outputs"][save_id]["text"]
    return built, comfy_tree / "models" / CACHE_FOLDER / file_name


def test_saved_cache_of_512_reference(saved_cache_run):
    built, path = saved_cache_run
    assert path.name == "dog.safetensors"
    assert built.items == 1
    assert {path: tuple(tensor.shape) for path, tensor in built.memory.items()} == {
        path: (1, FULL_SIZE_TOKENS[path], FULL_SIZE_CHANNELS[path]) for path in FULL_SIZE_TOKENS}
    assert built.nbytes() == FULL_SIZE_CACHE_BYTES
    assert built.info["reference_resolution"] == "512x512"

    saved = load_cache(str(path))
    assert_same_cache(saved, built)
    assert saved.nbytes() == FULL_SIZE_CACHE_BYTES
    assert saved.info["label"] == "dog"
    assert os.path.getsize(path) > FULL_SIZE_CACHE_BYTES


def test_load_cache_round_trips(saved_cache_run, executor, comfy_tree):
    built, path = saved_cache_run
    prompt = shrunk(read_json(WORKFLOW_DIR / "dreamcache_load_cache.api.json"))
    (load_id,) = node_ids_of(prompt, "DreamCacheLoad")
    assert prompt[load_id]["inputs"]["cache_name"] == path.name
    outputs, history = run_prompt(executor, prompt)

    assert_same_cache(node_output(executor, load_id), built)
    (save_id,) = node_ids_of(prompt, "SaveImage")
    (image,) = saved_images(history, save_id, comfy_tree / "output")
    assert image.std() > 0.01
    check_decoded_image(executor, node_ids_of(prompt, "VAEDecode")[0])


def upstream_prompt(prompt: dict, output_id: str) -> dict:
    """Return the nodes of ``prompt`` that ``output_id`` depends on, itself included."""
    kept, pending = {}, [output_id]
    while pending:
        node_id = pending.pop()
        if node_id in kept:
            continue
        kept[node_id] = prompt[node_id]
        pending.extend(value[0] for value in prompt[node_id]["inputs"].values() if isinstance(value, list))
    return kept


def run_single_image(prompt_executor, prompt: dict, output_dir: pathlib.Path) -> np.ndarray:
    """Run a prompt with one SaveImage and one VAEDecode, check the decoded image and return the saved one."""
    outputs, history = run_prompt(prompt_executor, prompt)
    (save_id,) = node_ids_of(prompt, "SaveImage")
    assert outputs == [save_id]
    (image,) = saved_images(history, save_id, output_dir)
    assert image.std() > 0.01
    check_decoded_image(prompt_executor, node_ids_of(prompt, "VAEDecode")[0])
    return image


def test_image_guidance_sets_scale(executor, comfy_tree):
    prompt = shrunk(read_json(WORKFLOW_DIR / "dreamcache_image_guidance.api.json"))
    (apply_id,) = node_ids_of(prompt, "DreamCacheApply")
    (sampler_id,) = node_ids_of(prompt, "KSampler")
    assert prompt[apply_id]["inputs"]["image_scale"] == 0.4
    assert prompt[sampler_id]["inputs"]["cfg"] == 7.5
    run_single_image(executor, prompt, comfy_tree / "output")

    model = node_output(executor, apply_id)
    guidance = model.model_options.get("sampler_calc_cond_batch_function")
    assert isinstance(guidance, ImageGuidance)
    assert guidance.image_scale == pytest.approx(0.4)


def test_dual_cfg_guider_runs(executor, comfy_tree):
    prompt = shrunk(read_json(WORKFLOW_DIR / "dreamcache_dual_cfg.api.json"))
    (apply_id,) = node_ids_of(prompt, "DreamCacheApply")
    (guider_id,) = node_ids_of(prompt, "DualCFGGuider")
    guider_inputs = prompt[guider_id]["inputs"]
    assert guider_inputs["model"] == [apply_id, 0]
    assert guider_inputs["cond2"] == guider_inputs["negative"]
    assert guider_inputs["cond1"] != guider_inputs["cond2"]
    run_single_image(executor, prompt, comfy_tree / "output")

    # image_scale 1 leaves ComfyUI's batching alone, so the guider's cfg_cond2_negative is the image scale.
    model = node_output(executor, apply_id)
    assert "sampler_calc_cond_batch_function" not in model.model_options
    assert len(find_patch(model).subjects) == 1
    guider = node_output(executor, guider_id)
    assert type(guider).__name__ == "Guider_DualCFG"
    assert (guider.cfg1, guider.cfg2, guider.nested) == (7.5, 0.4, False)


def test_two_subjects_use_masks(executor, comfy_tree):
    prompt = shrunk(read_json(WORKFLOW_DIR / "dreamcache_two_subjects_masks.api.json"))
    applies = node_ids_of(prompt, "DreamCacheApply")
    assert len(applies) == 2
    assert prompt[applies[1]]["inputs"]["model"] == [applies[0], 0]
    personalized = run_single_image(executor, prompt, comfy_tree / "output")

    builds = node_ids_of(prompt, "DreamCacheBuild")
    assert sorted(node_output(executor, build_id).info["label"] for build_id in builds) == ["cat", "dog"]
    assert len(find_patch(node_output(executor, applies[1])).subjects) == 2

    halves = []
    for apply_id in applies:
        mask_id = prompt[apply_id]["inputs"]["attn_mask"][0]
        mask = node_output(executor, mask_id)
        assert tuple(mask.shape[-2:]) == (512, 512)
        halves.append((float(mask[..., :256].mean()), float(mask[..., 256:].mean())))
    assert halves == [(1.0, 0.0), (0.0, 1.0)]

    # The same graph with the KSampler on the checkpoint's MODEL, keeping only the nodes it needs.
    (sampler_id,) = node_ids_of(prompt, "KSampler")
    checkpoint_id = prompt[applies[0]]["inputs"]["model"][0]
    plain = copy.deepcopy(prompt)
    plain[sampler_id]["inputs"]["model"] = [checkpoint_id, 0]
    plain = upstream_prompt(plain, node_ids_of(prompt, "SaveImage")[0])
    assert not node_ids_of(plain, "DreamCacheApply")
    with fresh_executor() as plain_executor:
        unpatched = run_single_image(plain_executor, plain, comfy_tree / "output")

    difference = np.abs(personalized - unpatched).mean()
    assert difference > 1.0 / 255.0, f"two-subject and plain images differ by only {difference:.5f}"


def test_multi_reference_concat_tokens(executor, comfy_tree):
    prompt = shrunk(read_json(WORKFLOW_DIR / "dreamcache_multi_reference.api.json"))
    (build_id,) = node_ids_of(prompt, "DreamCacheBuild")
    (batch_id,) = node_ids_of(prompt, "ImageBatch")
    assert prompt[build_id]["inputs"]["reference_mode"] == "concat"
    assert prompt[build_id]["inputs"]["image"] == [batch_id, 0]
    run_single_image(executor, prompt, comfy_tree / "output")

    assert node_output(executor, batch_id).shape == (2, 512, 512, 3)
    cache = node_output(executor, build_id)
    assert cache.items == 1
    assert [cache.tokens(path) for path in FULL_SIZE_TOKENS] == [2 * tokens for tokens in TEST_REFERENCE_TOKENS]
