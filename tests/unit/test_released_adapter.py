"""The released SD 2.1-base adapter layout, loading a released .pt file and the conversion command.

The full-size file is about 100 MB of float32 zeros and constants; one copy is shared by the module
and deleted at its end.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dreamcache_core.adapter_io as adapter_io
from dreamcache_core.adapter import DreamCacheAdapter
from dreamcache_core.adapter_io import load_adapter_safetensors, load_released_adapter, stock_fingerprint
from dreamcache_core.convert_adapter import main as convert_main
from dreamcache_core.errors import DreamCacheFileError
from reference_math import BLOCK_SUFFIXES

REPOSITORY = Path(__file__).resolve().parents[2]

RELEASED_LAYERS = (("middle_block.1", 1280), ("output_blocks.4.1", 1280), ("output_blocks.6.1", 640),
                   ("output_blocks.8.1", 640), ("output_blocks.10.1", 320))
RELEASED_PARAMETERS = 25_207_040


def released_shapes() -> dict[str, tuple[int, ...]]:
    """Return the 45 keys and shapes of the released SD 2.1-base adapter."""
    shapes = {}
    for path, channels in RELEASED_LAYERS:
        per_suffix = {"attn_mem.to_q.weight": (channels, channels), "attn_mem.to_k.weight": (channels, channels),
                      "attn_mem.to_v.weight": (channels, channels), "attn_mem.to_out.0.weight": (channels, channels),
                      "attn_mem.to_out.0.bias": (channels,), "linear_cat.weight": (channels, 2 * channels),
                      "linear_cat.bias": (channels,), "norm2_mem.weight": (channels,), "norm2_mem.bias": (channels,)}
        assert tuple(per_suffix) == BLOCK_SUFFIXES
        for suffix, shape in per_suffix.items():
            shapes[f"diffusion_model.{path}.transformer_blocks.0.{suffix}"] = shape
    return shapes


def released_fill_values() -> dict[str, float]:
    """Return a distinct constant per released key, so a swapped tensor shows up in a comparison."""
    return {key: float(index) for index, key in enumerate(released_shapes())}


def released_state() -> dict[str, torch.Tensor]:
    """Return a released-layout state dict of constant tensors (cheap to build)."""
    fill_values = released_fill_values()
    return {key: torch.full(shape, fill_values[key]) for key, shape in released_shapes().items()}


@pytest.fixture(scope="module")
def released_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("released")
    path = folder / "cross_attention-199999.pt"
    torch.save(released_state(), path)
    yield path
    for item in folder.iterdir():
        item.unlink()


def test_stock_sd2_layout_matches_release():
    adapter = DreamCacheAdapter(stock_fingerprint("sd2"))
    expected = released_shapes()

    assert len(expected) == 45
    assert adapter.expected_shapes() == expected
    assert sum(torch.Size(shape).numel() for shape in expected.values()) == RELEASED_PARAMETERS
    assert sum(parameter.numel() for parameter in adapter.parameters()) == RELEASED_PARAMETERS


def test_stock_sd2_fingerprint_layers():
    fingerprint = stock_fingerprint("sd2")
    assert fingerprint.family == "sd2"
    assert fingerprint.context_dim == 1024
    assert fingerprint.prediction == "eps"
    assert [(layer.path, layer.channels) for layer in fingerprint.layers] == list(RELEASED_LAYERS)
    assert [layer.block for layer in fingerprint.layers] == [("middle", 0), ("output", 4), ("output", 6),
                                                             ("output", 8), ("output", 10)]


def test_stock_sd1_same_keys_other_fingerprint():
    sd1 = stock_fingerprint("sd1")
    sd2 = stock_fingerprint("sd2")

    assert DreamCacheAdapter(sd1).expected_shapes() == released_shapes()
    assert sd1 != sd2
    assert sd1.to_json() != sd2.to_json()
    assert sd1.context_dim == 768


def test_released_pt_loads_weights_only(released_file, monkeypatch):
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(adapter_io.torch, "load", recording_load)
    adapter = load_released_adapter(str(released_file))

    assert len(calls) == 1
    assert calls[0].get("weights_only") is True
    assert adapter.fingerprint == stock_fingerprint("sd2")
    loaded = adapter.released_state_dict()
    assert sorted(loaded) == sorted(released_shapes())
    for key, value in released_fill_values().items():
        assert loaded[key].dtype == torch.float32, key
        assert torch.all(loaded[key] == value), key


def test_convert_writes_loadable_adapter(released_file, tmp_path, capsys):
    output = tmp_path / "dreamcache_sd21.safetensors"
    status = convert_main([str(released_file), str(output)])
    summary = capsys.readouterr().out.strip()

    assert status == 0
    assert len(summary.splitlines()) == 1
    assert "45 keys" in summary
    assert "25,207,040 parameters" in summary
    assert f"{output.stat().st_size:,} bytes" in summary

    adapter = load_adapter_safetensors(str(output))
    assert adapter.fingerprint == stock_fingerprint("sd2")
    loaded = adapter.released_state_dict()
    for key, value in released_fill_values().items():
        assert torch.all(loaded[key] == value), key
    output.unlink()


def test_convert_rejects_existing_output(released_file, tmp_path, capsys):
    output = tmp_path / "taken.safetensors"
    output.write_bytes(b"an earlier file")

    status = convert_main([str(released_file), str(output)])
    message = capsys.readouterr().err

    assert status != 0
    assert "already exists" in message
    assert "--overwrite" in message
    assert output.read_bytes() == b"an earlier file"


def test_convert_overwrite_and_family(released_file, tmp_path, capsys):
    output = tmp_path / "taken.safetensors"
    output.write_bytes(b"an earlier file")

    status = convert_main([str(released_file), str(output), "--overwrite", "--family", "sd1",
                           "--prediction", "v"])
    capsys.readouterr()

    assert status == 0
    adapter = load_adapter_safetensors(str(output))
    assert adapter.fingerprint == stock_fingerprint("sd1", "v")
    output.unlink()


def test_convert_reports_bad_adapter(tmp_path, capsys):
    state = released_state()
    del state["diffusion_model.output_blocks.6.1.transformer_blocks.0.linear_cat.bias"]
    state["diffusion_model.output_blocks.6.1.transformer_blocks.0.extra.weight"] = torch.zeros(2)
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    output = tmp_path / "out.safetensors"

    status = convert_main([str(broken), str(output)])
    message = capsys.readouterr().err

    assert status == 1
    assert "missing keys (1)" in message
    assert "output_blocks.6.1.transformer_blocks.0.linear_cat.bias" in message
    assert "unexpected keys (1)" in message
    assert not output.exists()
    broken.unlink()


def test_convert_rejects_non_safetensors_output(tmp_path, capsys):
    status = convert_main([str(tmp_path / "in.pt"), str(tmp_path / "out.pt")])
    message = capsys.readouterr().err
    assert status == 1
    assert "must end in .safetensors" in message


def test_convert_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for option in ("--family", "--prediction", "--overwrite"):
        assert option in help_text


def test_convert_module_exit_status(tmp_path):
    missing = tmp_path / "missing.pt"
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    completed = subprocess.run([sys.executable, "-m", "dreamcache_core.convert_adapter", str(missing),
                                str(tmp_path / "out.safetensors")],
                               cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert "not found" in completed.stderr
    assert str(missing) in completed.stderr


def test_released_loader_rejects_non_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(DreamCacheFileError, match="not a dict of tensors"):
        load_released_adapter(str(path))
