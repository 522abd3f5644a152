"""Two adapters on one layer against PEFT's mixed model (`get_peft_model(..., mixed=True)`): both
active, merged one after the other, unmerged, one deleted; at every step peft_rs's AdaptedLayer
(holding PEFT's tensors) gives PEFT's outputs and weights.

One known difference: a PEFT layer with *any* adapter merged computes only its base layer, so
its unmerged active adapters are dropped (two LoRA adapters on one `lora.Linear`, one merged).
peft_rs keeps them; there its output is checked against the output with every active adapter
merged by PEFT (base + a + b)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from peft.tuners.adalora import AdaLoraLayer
from peft.tuners.lora import LoraLayer
from torch import nn

import peft_rs
from conftest import assert_close, base_state_dict

# Differences beyond this are not rounding.
DIFFERENT = 1e-3


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def lora(**kwargs):
    return LoraConfig(target_modules=["lin"], init_lora_weights=False, **kwargs)


PAIRS = {
    # Both on one lora.Linear: PEFT drops "b" while only "a" is merged.
    "lora+lora": (lora(r=4, lora_alpha=8), lora(r=2, lora_alpha=3, use_rslora=True), True),
    # AdaLoRA wraps the LoRA layer (nested layers merge independently): no dropped adapter.
    "lora+adalora": (
        lora(r=4, lora_alpha=8),
        AdaLoraConfig(target_modules=["lin"], init_r=3, lora_alpha=5, total_step=10, init_lora_weights=False),
        False,
    ),
}


def peft_mixed(first, second):
    torch.manual_seed(0)
    model = One().eval()
    base_sd = base_state_dict(model)
    peft_model = get_peft_model(model, first, adapter_name="a", mixed=True)
    peft_model.add_adapter("b", second)
    peft_model.set_adapter(["a", "b"])
    return peft_model.eval(), base_sd


def peft_tensors(peft_model, name):
    """Adapter `name`'s tensors under the names AdaptedLayer takes (PEFT's, relative to the module)."""
    for module in peft_model.modules():
        if isinstance(module, AdaLoraLayer) and name in module.lora_A:
            return {k: getattr(module, k)[name].detach().clone() for k in ("lora_A", "lora_B", "lora_E")}
        if isinstance(module, LoraLayer) and name in module.lora_A:
            return {
                f"{k}.weight": getattr(module, k)[name].weight.detach().clone() for k in ("lora_A", "lora_B")
            }
    raise KeyError(name)


def rs_layer_like(peft_model, base_sd):
    layer = peft_rs.AdaptedLayer(base_sd["lin.weight"], base_sd["lin.bias"], module_name="lin")
    for name in ("a", "b"):
        config = peft_rs.PeftConfig.from_dict(peft_model.peft_config[name].to_dict())
        layer.add_adapter(name, config, weights=peft_tensors(peft_model, name))
    assert layer.active_adapters == ["a"]  # later adapters are added inactive, as in PEFT
    layer.set_adapter(["a", "b"])
    return layer


def peft_weight(peft_model):
    return peft_model.base_model.model.lin.get_base_layer().weight.detach()


def peft_all_merged(peft_model):
    """A copy of `peft_model` with every active adapter merged by PEFT."""
    merged = copy.deepcopy(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Already following adapters were merged ..."
        merged.base_model.merge_adapter()
    return merged


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_two_adapters_on_one_layer_follow_peft(pair):
    first, second, peft_drops_unmerged = PAIRS[pair]
    peft_model, base_sd = peft_mixed(first, second)
    ours = rs_layer_like(peft_model, base_sd)
    x = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(1))

    def check(merged_adapters, active=("a", "b")):
        assert ours.merged_adapters == merged_adapters
        assert ours.merged == bool(merged_adapters)
        assert ours.active_adapters == list(active) == peft_model.active_adapters
        assert_close(ours.base_weight, peft_weight(peft_model))
        full = peft_all_merged(peft_model)
        if not merged_adapters:  # merged_weight() after a partial merge: see the test below
            assert_close(ours.merged_weight(), peft_weight(full))
        with torch.no_grad():
            want, want_full = peft_model(x), full(x)
        got = ours(x)
        assert_close(got, want_full)  # base + every active adapter
        return got, want

    # Both active, nothing merged; the weight with only "a" merged, computed without writing.
    got, want = check([])
    assert_close(got, want)
    only_a = copy.deepcopy(peft_model)
    only_a.base_model.merge_adapter(["a"])
    assert_close(ours.merged_weight(["a"]), peft_weight(only_a))
    assert_close(ours.base_weight, base_sd["lin.weight"])
    unmerged = got

    # "a" merged, "b" still active and unmerged.
    peft_model.base_model.merge_adapter(["a"])
    ours.merge(["a"])
    got, want = check(["a"])
    if peft_drops_unmerged:
        # PEFT's layer computes its base layer only (base + a): "b" is lost.
        with torch.no_grad():
            assert_close(want, only_a.base_model.model.lin.get_base_layer()(x))
        assert (got - want).abs().max() > DIFFERENT
    else:
        assert_close(got, want)

    # Both merged.
    peft_model.base_model.merge_adapter(["b"])
    ours.merge(["b"])
    got, want = check(["a", "b"])
    assert_close(got, want)
    assert_close(got, unmerged)

    # Unmerged (last merged first): the base weight is back.
    peft_model.base_model.unmerge_adapter()
    ours.unmerge()
    got, want = check([])
    assert_close(got, want)
    assert_close(ours.base_weight, base_sd["lin.weight"])

    # "a" deleted: "b" stays active alone.
    peft_model.delete_adapter("a")
    ours.delete_adapter("a")
    assert ours.adapter_names == ["b"]
    got, want = check([], active=("b",))
    assert_close(got, want)
    assert (got - unmerged).abs().max() > DIFFERENT  # "a" mattered


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_merged_weight_after_a_partial_merge(pair):
    """`merged_weight()` is the weight `merge()` would write: adapters already merged are not
    added again (PEFT's merge skips them)."""
    first, second, _ = PAIRS[pair]
    peft_model, base_sd = peft_mixed(first, second)
    ours = rs_layer_like(peft_model, base_sd)
    peft_model.base_model.merge_adapter(["a"])
    ours.merge(["a"])
    want = peft_weight(peft_all_merged(peft_model))
    assert_close(ours.merged_weight(), want)
    assert_close(ours.merged_weight(["b"]), want)
    ours.merge()
    assert_close(ours.base_weight, want)
