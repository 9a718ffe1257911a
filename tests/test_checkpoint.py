"""Released-format loading (strict, mapped) and our safetensors format."""

from __future__ import annotations

import json

import pytest
import torch

from s4fusion import S4Fusion, S4FusionConfig
from s4fusion.checkpoint import CheckpointError, ours_to_released, released_to_ours

SMALL = S4FusionConfig(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), cmsa_depth=1)


@pytest.fixture(scope="module")
def released_state(released_path):
    return torch.load(released_path, map_location="cpu", weights_only=True)["model"]


def test_key_map_covers_every_released_key_both_ways(golden_dir, released_state):
    keys = [ln.split("\t")[0] for ln in (golden_dir / "released_keys.txt").read_text().splitlines() if ln[:1] != "#"]
    assert set(keys) == set(released_state)
    ours = [released_to_ours(k) for k in keys]
    assert len(set(ours)) == len(keys) == 304
    assert set(ours) == set(S4Fusion().state_dict())
    assert [ours_to_released(k) for k in ours] == keys


def test_released_load_keeps_every_value(released_path, released_state):
    model = S4Fusion.from_released_checkpoint(released_path)
    exported = model.released_state_dict()
    assert set(exported) == set(released_state)
    for k, v in released_state.items():
        assert torch.equal(exported[k], v), k


def _write_released(tmp_path, state, name="model.pkl"):
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


def test_missing_key_is_named(tmp_path, released_state):
    state = dict(released_state)
    del state["vmunet.layers_up.1.blocks.0.self_attention.Ds"]
    with pytest.raises(CheckpointError, match=r"missing keys.*decoder\.1\.blocks\.0\.ss2d\.Ds"):
        S4Fusion.from_released_checkpoint(_write_released(tmp_path, state))


def test_unexpected_key_is_named(tmp_path, released_state):
    state = dict(released_state)
    state["vmunet.layers_up.1.blocks.0.self_attention.extra"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*ss2d\.extra"):
        S4Fusion.from_released_checkpoint(_write_released(tmp_path, state))
    state = dict(released_state)
    state["vmunet.something_else.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"vmunet\.something_else\.weight"):
        S4Fusion.from_released_checkpoint(_write_released(tmp_path, state))


def test_shape_mismatch_is_named(tmp_path, released_state):
    state = dict(released_state)
    state["vmunet.final_conv.weight"] = torch.zeros(1, 12, 3, 3)
    with pytest.raises(CheckpointError, match=r"head\.out_conv\.weight: checkpoint \(1, 12, 3, 3\)"):
        S4Fusion.from_released_checkpoint(_write_released(tmp_path, state))


def test_non_finite_weights_are_rejected(tmp_path, released_state):
    state = dict(released_state)
    state["vmunet.final_conv.bias"] = torch.tensor([float("nan")])
    with pytest.raises(CheckpointError, match=r"non-finite.*head\.out_conv\.bias"):
        S4Fusion.from_released_checkpoint(_write_released(tmp_path, state))


def test_corrupt_and_missing_files(tmp_path, released_path):
    bad = tmp_path / "truncated.pkl"
    bad.write_bytes(released_path.read_bytes()[:10_000])
    with pytest.raises(CheckpointError, match=r"cannot read released checkpoint .*truncated\.pkl"):
        S4Fusion.from_released_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        S4Fusion.from_released_checkpoint(tmp_path / "nope.pkl")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"cannot read S4Fusion weights .*junk\.safetensors"):
        S4Fusion.from_pretrained(junk)


@pytest.mark.parametrize("target", ["weights.safetensors", "run_dir"])
def test_save_load_round_trip_is_bit_exact(tmp_path, target):
    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig(**{**SMALL.to_dict(), "topology": "paper"}))
    path = model.save_pretrained(tmp_path / target)
    loaded = S4Fusion.from_pretrained(tmp_path / target)
    assert loaded.config == model.config and loaded.config.topology == "paper"
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ir, vi = torch.rand(1, 1, 20, 21), torch.rand(1, 1, 20, 21)
    with torch.no_grad():
        assert torch.equal(model(ir, vi), loaded(ir, vi))
    if target == "run_dir":
        assert json.loads((tmp_path / target / "config.json").read_text())["topology"] == "paper"
    assert not [p for p in (tmp_path).rglob("*.tmp")]  # atomic writes leave no temporaries
    assert str(path).endswith(".safetensors")


def test_mismatched_config_is_named(tmp_path):
    path = S4Fusion(SMALL).save_pretrained(tmp_path / "small.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["s4fusion_config"])
    cfg["dims"] = [16, 32, 64]
    meta["s4fusion_config"] = json.dumps(cfg)
    save_file(tensors, str(tmp_path / "lies.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"shape mismatches: embed_ir\.proj\.weight"):
        S4Fusion.from_pretrained(tmp_path / "lies.safetensors")
    cfg["bogus"] = 1
    meta["s4fusion_config"] = json.dumps(cfg)
    save_file(tensors, str(tmp_path / "bogus.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"unknown S4FusionConfig keys: \['bogus'\]"):
        S4Fusion.from_pretrained(tmp_path / "bogus.safetensors")
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match="no S4Fusion config"):
        S4Fusion.from_pretrained(tmp_path / "bare.safetensors")
