"""Bad input raises the specific peft_rs exception (also the matching built-in), never crashes,
and leaves nothing half-written."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import peft_rs
from conftest import MLP, ConvModel, base_state_dict, make_model, rewrite_weights
from peft_rs import errors


@pytest.fixture
def adapter_dir(tmp_path):
    model = make_model(MLP)
    get_peft_model(
        model, LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False)
    ).save_pretrained(tmp_path)
    return tmp_path


def rewrite_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def merge_into_mlp(adapter):
    """Merges `adapter` into the MLP it was made for: errors in its tensors surface here."""
    model = make_model(MLP)
    return adapter.merge_into(base_state_dict(model), peft_rs.module_types(model))


def lora_layer(weights=None):
    layer = peft_rs.AdaptedLayer(np.ones((4, 6), np.float32))
    layer.add_adapter("default", peft_rs.LoraConfig(r=2, init_lora_weights=False), weights=weights)
    return layer


def test_missing_directory(tmp_path):
    with pytest.raises(errors.AdapterFileNotFoundError) as e:
        peft_rs.PeftAdapter.from_pretrained(tmp_path / "nope")
    assert isinstance(e.value, FileNotFoundError)


def test_missing_weights_file(adapter_dir):
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_missing_config_file(adapter_dir):
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(errors.AdapterFileNotFoundError, match=r"adapter_config\.json"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_malformed_json(adapter_dir):
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(errors.InvalidFileError, match=r"adapter_config\.json") as e:
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)
    assert isinstance(e.value, ValueError)


def test_unknown_peft_type(adapter_dir):
    rewrite_config(adapter_dir, peft_type="NOT_A_METHOD")
    with pytest.raises(errors.UnsupportedPeftTypeError, match="NOT_A_METHOD"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_unimplemented_feature_is_rejected(adapter_dir):
    rewrite_config(adapter_dir, use_qalora=True)
    with pytest.raises(errors.ConfigError, match="use_qalora"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_unknown_field_with_value_is_rejected(adapter_dir):
    rewrite_config(adapter_dir, some_future_option=3)
    with pytest.raises(errors.ConfigError, match="some_future_option"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_wrongly_typed_field_names_it(adapter_dir):
    rewrite_config(adapter_dir, r="eight")
    with pytest.raises(errors.ConfigError, match="`r`"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


@pytest.mark.parametrize("keep", [0, 7, 100, -16])
def test_truncated_safetensors(adapter_dir, keep):
    path = adapter_dir / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(errors.InvalidFileError, match=r"adapter_model\.safetensors"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_corrupted_header(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at!"
    path.write_bytes(bytes(data))
    with pytest.raises(errors.InvalidFileError):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_missing_tensor_names_the_key(adapter_dir):
    rewrite_weights(adapter_dir, lambda t: t.pop("base_model.model.lin1.lora_B.weight"))
    adapter = peft_rs.PeftAdapter.from_pretrained(adapter_dir)
    with pytest.raises(errors.MissingKeyError, match=r"base_model\.model\.lin1\.lora_B\.weight") as e:
        merge_into_mlp(adapter)
    assert isinstance(e.value, KeyError)


def test_unexpected_tensor_names_the_key(adapter_dir):
    rewrite_weights(adapter_dir, lambda t: t.update({"base_model.model.lin0.lora_C.weight": torch.zeros(2)}))
    with pytest.raises(errors.UnexpectedKeyError, match=r"lin0\.lora_C\.weight"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_tensor_for_untargeted_module(adapter_dir):
    def add(t):
        t["base_model.model.classifier.lora_A.weight"] = torch.zeros(8, 16)
        t["base_model.model.classifier.lora_B.weight"] = torch.zeros(3, 8)

    rewrite_weights(adapter_dir, add)
    with pytest.raises(errors.UnexpectedKeyError, match="classifier"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_rank_disagreeing_with_config(adapter_dir):
    rewrite_config(adapter_dir, r=4)
    adapter = peft_rs.PeftAdapter.from_pretrained(adapter_dir)
    with pytest.raises(errors.ShapeError, match=r"lin0\.lora_A\.weight.*r=4"):
        merge_into_mlp(adapter)


def test_inconsistent_rank_pattern(adapter_dir):
    rewrite_config(adapter_dir, rank_pattern={"lin1": 2})
    adapter = peft_rs.PeftAdapter.from_pretrained(adapter_dir)
    model = make_model(MLP)
    with pytest.raises(errors.ShapeError, match=r"lin1\.lora_A"):
        adapter.layer("lin1", base_state_dict(model), peft_rs.module_types(model))


def test_base_shape_disagreeing_with_adapter(adapter_dir):
    adapter = peft_rs.PeftAdapter.from_pretrained(adapter_dir)
    model = make_model(MLP)
    sd, types = base_state_dict(model), peft_rs.module_types(model)
    with pytest.raises(errors.MissingKeyError, match=r"lin1\.weight"):
        adapter.merge_into({k: v for k, v in sd.items() if k != "lin1.weight"}, types)
    with pytest.raises(errors.MissingKeyError, match="lin0"):
        adapter.merge_into(sd, {k: v for k, v in types.items() if k != "lin0"})
    with pytest.raises(errors.InvalidArgumentError, match="conv3d"):
        adapter.merge_into(sd, {**types, "lin0": "conv3d"})
    sd["lin0.weight"] = torch.zeros(20, 11)
    with pytest.raises(errors.ShapeError, match=r"lin0\.lora_A\.weight"):
        adapter.merge_into(sd, types)


def test_layer_input_errors():
    layer = lora_layer()
    with pytest.raises(errors.ShapeError, match=r"expected \[3, 6\], found \[3, 5\]"):
        layer.forward(np.zeros((3, 5), np.float32))
    with pytest.raises(errors.DTypeError):
        layer.forward(np.zeros((3, 6), np.float64))
    with pytest.raises(errors.ArgumentTypeError, match=r"numpy\.ndarray or torch\.Tensor") as e:
        layer.forward([[0.0] * 6])
    assert isinstance(e.value, TypeError)
    with pytest.raises(errors.InvalidArgumentError, match="stride"):
        peft_rs.AdaptedLayer(np.zeros((2, 3, 3, 3), np.float32), kind="conv2d", stride=(1, 2))
    with pytest.raises(errors.InvalidArgumentError, match="conv3d"):
        peft_rs.AdaptedLayer(np.zeros((2, 3), np.float32), kind="conv3d")
    with pytest.raises(errors.ShapeError, match="lora_A"):
        lora_layer(
            {"lora_A.weight": np.zeros((2, 5), np.float32), "lora_B.weight": np.zeros((4, 2), np.float32)}
        )
    with pytest.raises(errors.MissingKeyError, match="lora_B"):
        lora_layer({"lora_A.weight": np.zeros((2, 6), np.float32)})
    with pytest.raises(errors.UnexpectedKeyError, match="lora_C"):
        lora_layer(
            {
                "lora_A.weight": np.zeros((2, 6), np.float32),
                "lora_B.weight": np.zeros((4, 2), np.float32),
                "lora_C.weight": np.zeros((4, 2), np.float32),
            }
        )
    emb = peft_rs.AdaptedLayer(np.zeros((5, 3), np.float32), kind="embedding")
    emb.add_adapter("default", peft_rs.LoraConfig())
    with pytest.raises(errors.PeftError):
        emb.forward(np.array([[1, 7]], dtype=np.int64))  # id out of range


def test_adapter_name_errors():
    layer = lora_layer()
    with pytest.raises(errors.PeftError, match="default"):
        layer.add_adapter("default", peft_rs.LoraConfig(r=2))
    with pytest.raises(errors.PeftError, match="nope"):
        layer.set_adapter("nope")
    with pytest.raises(errors.PeftError, match="nope"):
        layer.delete_adapter("nope")
    with pytest.raises(TypeError, match="adapter_names should be a list of strings"):
        layer.merge("default")  # a str, as PEFT refuses it


def peft_lora_layer():
    model = get_peft_model(make_model(MLP), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    return model.base_model.model.lin0


def warning_texts(calls):
    """The warnings each call emits, one list per call."""
    texts = []
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        texts.append([str(w.message) for w in caught])
    return texts


def test_merge_state_warnings_match_peft():
    """Unmerging an unmerged layer and merging a merged one warn with PEFT's words, and change nothing."""
    ours, theirs = lora_layer(), peft_lora_layer()
    steps = ["unmerge", "merge", "merge", "unmerge", "unmerge"]
    got = warning_texts([getattr(ours, step) for step in steps])
    want = warning_texts([getattr(theirs, step) for step in steps])
    assert got == want
    assert got[0] == ["Already unmerged. Nothing to do."]
    assert got[2] == ["All adapters are already merged, nothing to do."]
    assert got[1] == got[3] == []
    assert not ours.merged
    np.testing.assert_allclose(ours.base_weight, np.ones((4, 6), np.float32), rtol=1e-6, atol=1e-6)


def test_safe_merge_refuses_non_finite():
    w = np.ones((4, 6), np.float32)
    layer = peft_rs.AdaptedLayer(w)
    layer.add_adapter(
        "default",
        peft_rs.LoraConfig(r=2),
        weights={
            "lora_A.weight": np.full((2, 6), np.inf, np.float32),
            "lora_B.weight": np.ones((4, 2), np.float32),
        },
    )
    with pytest.raises(errors.NonFiniteMergeError):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert layer.merged_adapters == []
    np.testing.assert_array_equal(layer.base_weight, w)


def test_config_validation():
    with pytest.raises(errors.ConfigError, match="init_lora_weights"):
        peft_rs.LoraConfig(init_lora_weights="pissa")
    with pytest.raises(errors.ConfigError, match="layers_pattern"):
        peft_rs.LoraConfig(target_modules=["q"], layers_pattern="layers")
    with pytest.raises(errors.ConfigError, match="lora_dropout"):
        peft_rs.LoraConfig(lora_dropout=1.5)
    with pytest.raises(errors.ConfigError, match="megatron_config"):
        peft_rs.LoraConfig(megatron_config={"x": 1})
    # A regex the Rust engine cannot compile (look-behind) is refused where the config is made.
    with pytest.raises(errors.ConfigError, match="target_modules"):
        peft_rs.LoraConfig(target_modules="(?<=x)y")


def test_unsupported_regex_in_file_is_refused_at_load(adapter_dir):
    rewrite_config(adapter_dir, target_modules="(?<=x)y")
    with pytest.raises(errors.ConfigError, match=r"(?s)`target_modules`.*look-behind"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_failed_save_leaves_no_partial_files(tmp_path, adapter_dir):
    adapter = peft_rs.PeftAdapter.from_pretrained(adapter_dir)
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(errors.PeftError) as e:
        adapter.save_pretrained(blocker)
    assert isinstance(e.value, OSError)
    # Overwriting an existing adapter goes through a temp file + rename: no temp files remain.
    out = tmp_path / "out"
    adapter.save_pretrained(out)
    adapter.save_pretrained(out)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_conv2d_forward_shorthand_asks_for_hyper_parameters(tmp_path):
    get_peft_model(make_model(ConvModel), LoraConfig(target_modules=["conv"])).save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    model = make_model(ConvModel)
    sd, types = base_state_dict(model), peft_rs.module_types(model)
    with pytest.raises(errors.InvalidOperationError, match="stride"):
        adapter.forward("conv", torch.zeros(1, 3, 5, 5), sd, types)
