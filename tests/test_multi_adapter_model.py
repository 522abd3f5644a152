"""Two adapters of different methods on a small model, against PEFT's mixed model
(`get_peft_model(..., mixed=True)`): the adapters target overlapping module sets, both are
active, then merged one after the other, unmerged, and one is deleted. peft_rs holds one
`AdaptedLayer` per targeted module (PEFT's tensors copied in) and runs the model's forward
through them; at every step its outputs and weights equal PEFT's."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

import peft_rs
from conftest import MLP, assert_close, base_state_dict, make_model, model_input

TUNER_PREFIXES = ("lora_", "hada_", "lokr_")

PAIRS = {
    "lora+loha": (
        LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, init_lora_weights=False),
        LoHaConfig(target_modules=["lin1", "classifier"], r=3, alpha=5, init_weights=False),
    ),
    "lokr+lora": (
        LoKrConfig(target_modules=["lin0", "classifier"], r=2, alpha=3, init_weights=False),
        LoraConfig(
            target_modules=["lin0", "lin1"], r=2, lora_alpha=5, use_rslora=True, init_lora_weights=False
        ),
    ),
}


def peft_mixed(first, second):
    model = make_model(MLP)
    base_sd = base_state_dict(model)
    peft_model = get_peft_model(model, first, adapter_name="a", mixed=True)
    peft_model.add_adapter("b", second)
    peft_model.base_model.set_adapter(["a", "b"])
    return peft_model.eval(), base_sd


def adapter_tensors(peft_model, module, adapter):
    """`adapter`'s tensors on `module`, under PEFT's file names relative to the module."""
    wrapped = peft_model.base_model.model.get_submodule(module)
    out = {}
    for name, param in wrapped.named_parameters():
        parts = name.split(".")
        # Nested tuner layers (one per method) hold each other as `base_layer`.
        while parts[0] == "base_layer":
            parts = parts[1:]
        if parts[0].startswith(TUNER_PREFIXES) and adapter in parts:
            parts.remove(adapter)
            out[".".join(parts)] = param.detach().clone()
    return out


class RsMLP:
    """conftest.MLP's forward through peft_rs layers (plain torch for untargeted modules)."""

    def __init__(self, peft_model, base_sd):
        self.layers = {}
        for module in ("lin0", "lin1", "classifier"):
            weight, bias = base_sd[f"{module}.weight"], base_sd.get(f"{module}.bias")
            layer = peft_rs.AdaptedLayer(weight, bias, module_name=module)
            for adapter in ("a", "b"):
                config = peft_model.peft_config[adapter]
                if module in config.target_modules:
                    rs_config = peft_rs.PeftConfig.from_dict(config.to_dict())
                    tensors = adapter_tensors(peft_model, module, adapter)
                    layer.add_adapter(adapter, rs_config, weights=tensors)
            if layer.adapter_names:
                layer.set_adapter([n for n in ("a", "b") if n in layer.adapter_names])
            self.layers[module] = layer

    def __call__(self, x):
        h = torch.relu(self.layers["lin0"](x))
        h = torch.relu(self.layers["lin1"](h))
        return self.layers["classifier"](h)

    def merge(self, names):
        for layer in self.layers.values():
            if layer.adapter_names:
                layer.merge([n for n in names if n in layer.adapter_names])

    def unmerge(self):
        for layer in self.layers.values():
            if layer.merged:
                layer.unmerge()

    def delete(self, name):
        for layer in self.layers.values():
            if name in layer.adapter_names:
                layer.delete_adapter(name)


def assert_same(peft_model, ours, x):
    with torch.no_grad():
        assert_close(ours(x), peft_model(x))
    for module, layer in ours.layers.items():
        peft_weight = peft_model.base_model.model.get_submodule(module).get_base_layer().weight
        assert_close(layer.base_weight, peft_weight.detach(), msg=module)


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_two_methods_on_a_model_follow_peft(pair):
    peft_model, base_sd = peft_mixed(*PAIRS[pair])
    ours = RsMLP(peft_model, base_sd)
    x = model_input(make_model(MLP))
    with torch.no_grad():
        base_out = make_model(MLP)(x)
        # Both adapters change the output, so every step below is a real comparison.
        assert (peft_model(x) - base_out).abs().max() > 1e-2

    assert_same(peft_model, ours, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for names in (["a"], ["b"]):
            peft_model.base_model.merge_adapter(names)
            ours.merge(names)
            assert_same(peft_model, ours, x)
        peft_model.base_model.unmerge_adapter()
        ours.unmerge()
    assert_same(peft_model, ours, x)
    for module, layer in ours.layers.items():
        assert_close(layer.base_weight, base_sd[f"{module}.weight"], msg=module)

    peft_model.delete_adapter("a")
    ours.delete("a")
    assert_same(peft_model, ours, x)
    for module, layer in ours.layers.items():
        peft_layer = peft_model.base_model.model.get_submodule(module)
        if layer.adapter_names:
            assert layer.active_adapters == ["b"], module
            assert "b" in peft_layer.active_adapters, module
