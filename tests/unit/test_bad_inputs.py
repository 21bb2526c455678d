"""Bad adapter and cache files and mismatched inputs: each error names the value at fault and the fix."""

import json

import pytest
import torch

from dreamcache_core.adapter_io import load_adapter, load_adapter_safetensors, load_released_adapter, save_adapter
from dreamcache_core.cache import SubjectCache, combine_caches, load_cache, save_cache
from dreamcache_core.errors import DreamCacheFileError, DreamCacheMismatchError
from dreamcache_core.layers import check_fingerprint
from dreamcache_core.safetensors_io import read_safetensors, write_safetensors
from reference_math import random_adapter, random_cache, tiny_fingerprint

# Calls made by unpickling RunsCodeOnLoad. The list stays empty as long as no pickled code runs.
EXECUTED_CALLS = []


def record_execution(value):
    EXECUTED_CALLS.append(value)
    return value


class RunsCodeOnLoad:
    """A pickled object whose unpickling calls a function, as a malicious checkpoint would."""

    def __reduce__(self):
        return (record_execution, ("unpickled",))


class PlainObject:
    """A non-tensor object with data and no code of its own."""

    def __init__(self):
        self.weights = [1.0, 2.0]


ADAPTER_KEY = "diffusion_model.output_blocks.4.1.transformer_blocks.0."


def rewrite_file(path, change):
    """Read a .safetensors file, let ``change(tensors, metadata)`` edit it in place, and write it back."""
    tensors, metadata = read_safetensors(str(path), "")
    change(tensors, metadata)
    write_safetensors(str(path), tensors, metadata)


@pytest.fixture
def adapter_file(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_adapter(str(path), random_adapter(tiny_fingerprint("sd2"), seed=1))
    return path


@pytest.fixture
def cache_file(tmp_path):
    path = tmp_path / "subject.safetensors"
    save_cache(str(path), random_cache(tiny_fingerprint("sd2"), seed=2, tokens=6))
    return path


def test_adapter_key_errors_in_one_message(adapter_file):
    def break_keys(tensors, metadata):
        del tensors[ADAPTER_KEY + "attn_mem.to_k.weight"]
        tensors[ADAPTER_KEY + "attn_mem.to_k.bias"] = torch.zeros(32)
        tensors[ADAPTER_KEY + "linear_cat.weight"] = torch.zeros(32, 32)

    rewrite_file(adapter_file, break_keys)
    with pytest.raises(DreamCacheMismatchError) as error_info:
        load_adapter_safetensors(str(adapter_file))

    message = str(error_info.value)
    assert "missing keys (1): " + ADAPTER_KEY + "attn_mem.to_k.weight" in message
    assert "unexpected keys (1): " + ADAPTER_KEY + "attn_mem.to_k.bias" in message
    assert f"{ADAPTER_KEY}linear_cat.weight has shape (32, 32), expected (32, 64)" in message
    assert str(adapter_file) in message
    assert "convert_adapter" in message


def test_adapter_nan_rejected(adapter_file):
    def poison(tensors, metadata):
        tensors[ADAPTER_KEY + "linear_cat.bias"][3] = float("nan")

    rewrite_file(adapter_file, poison)
    with pytest.raises(DreamCacheFileError, match=r"invalid values in .*output_blocks\.4\.1.*linear_cat\.bias"):
        load_adapter_safetensors(str(adapter_file))


def test_adapter_pickle_object_rejected(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({ADAPTER_KEY + "linear_cat.bias": PlainObject()}, path)
    with pytest.raises(DreamCacheFileError, match=r"Cannot read adapter .*object\.pt.* as a weights-only"):
        load_released_adapter(str(path))


def test_adapter_pickle_code_not_run(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({ADAPTER_KEY + "linear_cat.bias": RunsCodeOnLoad()}, path)

    with pytest.raises(DreamCacheFileError, match=r"as a weights-only PyTorch file .*never unpickles") as error:
        load_released_adapter(str(path))
    assert EXECUTED_CALLS == []
    # torch's own text advises weights_only=False, which would run the code; it must not reach users.
    assert "weights_only" not in str(error.value)

    # The file does run code when loaded without weights_only, so the check above is meaningful.
    torch.load(path, weights_only=False)
    assert EXECUTED_CALLS == ["unpickled"]
    EXECUTED_CALLS.clear()


def test_adapter_non_tensor_values_rejected(tmp_path):
    path = tmp_path / "strings.pt"
    torch.save({ADAPTER_KEY + "linear_cat.bias": "not a tensor"}, path)
    with pytest.raises(DreamCacheFileError, match="not a dict of tensors"):
        load_released_adapter(str(path))


def test_adapter_missing_file(tmp_path):
    with pytest.raises(DreamCacheFileError, match=r"Adapter file not found: .*absent\.pt"):
        load_released_adapter(str(tmp_path / "absent.pt"))


def test_adapter_unknown_extension(tmp_path):
    with pytest.raises(DreamCacheFileError, match=r"extension '\.ckpt'; expected \.safetensors"):
        load_adapter(str(tmp_path / "adapter.ckpt"))


def test_cache_loaded_as_adapter(cache_file):
    with pytest.raises(DreamCacheFileError, match=r"not a DreamCache adapter \(metadata format is 'dreamcache.cache'"):
        load_adapter_safetensors(str(cache_file))


def test_sd1_adapter_where_sd2_expected(tmp_path):
    path = tmp_path / "sd1.safetensors"
    save_adapter(str(path), random_adapter(tiny_fingerprint("sd1"), seed=3))
    adapter = load_adapter_safetensors(str(path))

    with pytest.raises(DreamCacheMismatchError) as error_info:
        check_fingerprint(tiny_fingerprint("sd2"), adapter.fingerprint, "DreamCache adapter sd1.safetensors",
                          "Load the adapter trained for this base model.")
    message = str(error_info.value)
    assert "made for sd1 (context 768" in message
    assert "the model is sd2 (context 1024" in message
    assert "family sd1 vs sd2" in message
    assert "context_dim 768 vs 1024" in message
    assert "Load the adapter trained for this base model." in message


def test_cache_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(DreamCacheFileError, match=r"empty\.safetensors' is empty or truncated \(0 bytes\)"):
        load_cache(str(path))


@pytest.mark.parametrize("keep, expected", [
    ("half", r"truncated\.safetensors' is not a valid \.safetensors file or is truncated: its header claims"),
    ("all but 10 bytes", r"truncated\.safetensors' is corrupt or truncated"),
])
def test_cache_truncated_file(cache_file, tmp_path, keep, expected):
    data = cache_file.read_bytes()
    length = len(data) // 2 if keep == "half" else len(data) - 10
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:length])
    with pytest.raises(DreamCacheFileError, match=expected + ".*Build the cache again"):
        load_cache(str(truncated))


def test_cache_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                         dtype=torch.uint8).tolist()))
    with pytest.raises(DreamCacheFileError, match=r"noise\.safetensors' is not a valid \.safetensors file"):
        load_cache(str(path))


def test_cache_corrupt_header(tmp_path):
    path = tmp_path / "header.safetensors"
    header = b"{not json"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(DreamCacheFileError, match="corrupt .safetensors header"):
        load_cache(str(path))


def test_cache_without_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    write_safetensors(str(path), {"middle_block.1": torch.zeros(1, 4, 32)}, {})
    with pytest.raises(DreamCacheFileError, match=r"not a DreamCache cache \(metadata format is None"):
        load_cache(str(path))


def test_cache_token_count_disagrees(cache_file):
    def change_tokens(tensors, metadata):
        layers = json.loads(metadata["layers"])
        layers[2]["tokens"] = 5
        metadata["layers"] = json.dumps(layers)

    rewrite_file(cache_file, change_tokens)
    expected = r"layer output_blocks\.6\.1 has 6 tokens but its metadata declares 5"
    with pytest.raises(DreamCacheFileError, match=expected):
        load_cache(str(cache_file))


def test_cache_with_nan_on_disk(cache_file):
    def poison(tensors, metadata):
        tensors["output_blocks.8.1"][0, 1, 2] = float("nan")

    rewrite_file(cache_file, poison)
    with pytest.raises(DreamCacheFileError, match=r"layer output_blocks\.8\.1 .*non-finite or non-float values"):
        load_cache(str(cache_file))


def test_save_cache_rejects_nan(tmp_path):
    cache = random_cache(tiny_fingerprint("sd2"), seed=4)
    cache.memory["middle_block.1"][0, 0, 0] = float("inf")
    path = tmp_path / "inf.safetensors"
    with pytest.raises(DreamCacheFileError, match=r"layer middle_block\.1 .*non-finite or non-float values"):
        save_cache(str(path), cache)
    assert not path.exists()


def test_cache_missing_layer(cache_file):
    def drop_layer(tensors, metadata):
        del tensors["output_blocks.10.1"]

    rewrite_file(cache_file, drop_layer)
    with pytest.raises(DreamCacheFileError, match=r"missing layers \['output_blocks\.10\.1'\]"):
        load_cache(str(cache_file))


def test_cache_invalid_metadata(cache_file):
    def break_fingerprint(tensors, metadata):
        metadata["fingerprint"] = "{"

    rewrite_file(cache_file, break_fingerprint)
    with pytest.raises(DreamCacheFileError, match="has invalid metadata"):
        load_cache(str(cache_file))


@pytest.mark.parametrize("model_family", ["sd2", "sdxl"])
def test_sd1_cache_on_other_model(tmp_path, model_family):
    path = tmp_path / "sd1_subject.safetensors"
    save_cache(str(path), random_cache(tiny_fingerprint("sd1"), seed=5))
    cache = load_cache(str(path))

    with pytest.raises(DreamCacheMismatchError) as error_info:
        check_fingerprint(tiny_fingerprint(model_family), cache.fingerprint, "DreamCache cache sd1_subject",
                          "Build the cache again with Build DreamCache on this model.")
    message = str(error_info.value)
    assert "made for sd1" in message
    assert f"the model is {model_family}" in message
    assert f"family sd1 vs {model_family}" in message
    assert "Build the cache again" in message


def test_fingerprint_prediction_mismatch():
    with pytest.raises(DreamCacheMismatchError, match="prediction v vs eps"):
        check_fingerprint(tiny_fingerprint("sd2", prediction="eps"), tiny_fingerprint("sd2", prediction="v"),
                          "cache", "Rebuild it.")


def test_combine_different_fingerprints():
    caches = [random_cache(tiny_fingerprint("sd2"), seed=6), random_cache(tiny_fingerprint("sd1"), seed=7)]
    with pytest.raises(DreamCacheMismatchError, match=r"Cache 1 was made for sd1.*cache 0 for sd2.*same base model"):
        combine_caches(caches)


def test_combine_mean_different_token_counts():
    fingerprint = tiny_fingerprint("sd2")
    caches = [random_cache(fingerprint, seed=8, tokens=4), random_cache(fingerprint, seed=9, tokens=6)]
    with pytest.raises(DreamCacheMismatchError, match=r"'mean' needs equal token counts.*\[4, 6\].*mode 'concat'"):
        combine_caches(caches, mode="mean")


def test_combine_rejects_multi_item_cache():
    fingerprint = tiny_fingerprint("sd2")
    caches = [random_cache(fingerprint, seed=10), random_cache(fingerprint, seed=11, items=2)]
    with pytest.raises(DreamCacheMismatchError, match="Cache 1 has 2 per-item subjects"):
        combine_caches(caches)


def test_combine_unknown_mode():
    fingerprint = tiny_fingerprint("sd2")
    with pytest.raises(DreamCacheMismatchError, match="Unknown combine mode 'sum'"):
        combine_caches([random_cache(fingerprint, seed=12)], mode="sum")


def test_combine_concat_and_mean_values():
    fingerprint = tiny_fingerprint("sd2")
    first = random_cache(fingerprint, seed=13, tokens=4)
    second = random_cache(fingerprint, seed=14, tokens=4)

    joined = combine_caches([first, second], mode="concat", label="pair")
    averaged = combine_caches([first, second], mode="mean")

    assert joined.info["reference_count"] == "2"
    assert joined.info["label"] == "pair"
    assert averaged.info["reference_mode"] == "mean"
    for layer in fingerprint.layers:
        expected_joined = torch.cat([first.memory[layer.path], second.memory[layer.path]], dim=1)
        expected_mean = ((first.memory[layer.path].float() + second.memory[layer.path].float()) / 2).half()
        assert torch.equal(joined.memory[layer.path], expected_joined), layer.path
        assert torch.equal(averaged.memory[layer.path], expected_mean), layer.path


def test_subject_cache_shape_checked(tmp_path):
    fingerprint = tiny_fingerprint("sd2")
    memory = dict(random_cache(fingerprint, seed=15).memory)
    memory["output_blocks.4.1"] = torch.zeros(1, 6, 16, dtype=torch.float16)
    expected = r"output_blocks\.4\.1 has shape \(1, 6, 16\); expected \(items, tokens, 32\)"
    with pytest.raises(DreamCacheFileError, match=expected):
        save_cache(str(tmp_path / "bad.safetensors"), SubjectCache(fingerprint, memory, {}))
