"""Bad input raises the specific peft_rs exception (also the matching built-in), never crashes,
and leaves nothing half-written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import peft_rs
from conftest import MLP, ConvModel, make_model
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


def rewrite_weights(path, fn):
    tensors = load_file(path / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


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
    with pytest.raises(errors.MissingKeyError, match=r"base_model\.model\.lin1\.lora_B\.weight") as e:
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)
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
    with pytest.raises(errors.ShapeError, match=r"lin0\.lora_A\.weight.*r=4"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_inconsistent_rank_pattern(adapter_dir):
    rewrite_config(adapter_dir, rank_pattern={"lin1": 2})
    with pytest.raises(errors.ShapeError, match=r"lin1\.lora_A"):
        peft_rs.PeftAdapter.from_pretrained(adapter_dir)


def test_base_shape_disagreeing_with_adapter(adapter_dir):
    adapter = peft_rs.PeftAdapter.from_pretrained(adapter_dir)
    sd = {k: v.detach() for k, v in make_model(MLP).state_dict().items()}
    with pytest.raises(errors.MissingKeyError, match=r"lin1\.weight"):
        adapter.merge_into({k: v for k, v in sd.items() if k != "lin1.weight"})
    sd["lin0.weight"] = torch.zeros(20, 11)
    with pytest.raises(errors.ShapeError, match=r"lin0\.lora_A\.weight"):
        adapter.merge_into(sd)


def test_layer_input_errors():
    layer = peft_rs.LoraLinear(np.zeros((4, 6), np.float32), config=peft_rs.LoraConfig(r=2))
    with pytest.raises(errors.ShapeError, match=r"expected \[3, 6\], found \[3, 5\]"):
        layer.forward(np.zeros((3, 5), np.float32))
    with pytest.raises(errors.DTypeError):
        layer.forward(np.zeros((3, 6), np.float64))
    with pytest.raises(errors.ArgumentTypeError, match=r"numpy\.ndarray or torch\.Tensor") as e:
        layer.forward([[0.0] * 6])
    assert isinstance(e.value, TypeError)
    with pytest.raises(errors.InvalidArgumentError, match="stride"):
        peft_rs.LoraConv2d(np.zeros((2, 3, 3, 3), np.float32), stride=(1, 2))
    with pytest.raises(errors.ShapeError, match="lora_A"):
        peft_rs.LoraLinear(
            np.zeros((4, 6), np.float32),
            lora_A=np.zeros((2, 5), np.float32),
            lora_B=np.zeros((4, 2), np.float32),
            config=peft_rs.LoraConfig(r=2),
        )
    with pytest.raises(errors.MissingKeyError, match="lora_B"):
        peft_rs.LoraLinear(
            np.zeros((4, 6), np.float32), lora_A=np.zeros((2, 6), np.float32), config=peft_rs.LoraConfig(r=2)
        )
    emb = peft_rs.LoraEmbedding(np.zeros((5, 3), np.float32))
    with pytest.raises(errors.PeftError):
        emb.forward(np.array([[1, 7]], dtype=np.int64))  # id out of range


def test_merge_state_errors():
    layer = peft_rs.LoraLinear(np.zeros((4, 6), np.float32), config=peft_rs.LoraConfig(r=2))
    with pytest.raises(errors.InvalidOperationError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(errors.InvalidOperationError, match="already merged"):
        layer.merge()


def test_safe_merge_refuses_non_finite():
    w = np.ones((4, 6), np.float32)
    a = np.full((2, 6), np.inf, np.float32)
    layer = peft_rs.LoraLinear(
        w, lora_A=a, lora_B=np.ones((4, 2), np.float32), config=peft_rs.LoraConfig(r=2)
    )
    with pytest.raises(errors.NonFiniteMergeError):
        layer.merge(safe_merge=True)
    assert not layer.merged
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
    with pytest.raises(errors.ConfigError, match="target_modules"):
        peft_rs.LoraConfig(target_modules="(?<=x)y").to_dict() and peft_rs.PeftAdapter.create(
            peft_rs.LoraConfig(target_modules="(?<=x)y"),
            {"y.weight": np.zeros((2, 2), np.float32)},
            {"y": "linear"},
        )


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
    model = make_model(ConvModel)
    get_peft_model(model, LoraConfig(target_modules=["conv"])).save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    sd = {k: v.detach() for k, v in make_model(ConvModel).state_dict().items()}
    with pytest.raises(errors.InvalidOperationError, match="stride"):
        adapter.forward("conv", torch.zeros(1, 3, 5, 5), sd)
