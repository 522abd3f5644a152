"""PeftModel on a small random LlamaForCausalLM against transformers + the installed `peft`:
adapters PEFT creates (file keys `base_model.model.model.layers...`) give PEFT's logits and greedy
tokens; two adapters decode a mixed batch row by row exactly as each alone; several adapters
active and merged in turn; what peft_rs saves PEFT loads."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoHaConfig, LoraConfig, OFTConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_llama_model import BASE, TOL, make_llama, padded_batch, reference

import peft_rs

TARGETS = ["q_proj", "v_proj", "down_proj"]

METHODS = {
    "lora": lambda: LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=4),
    "loha": lambda: LoHaConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=4),
    "oft": lambda: OFTConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=0, oft_block_size=16),
}


def perturb(peft_model, seed):
    """Adapters start at identity; every adapter tensor then moves by N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama"))


def peft_adapter(llama_dir, tmp_path, method, seed, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(reference(llama_dir), METHODS[method]()).eval()
    perturb(model, seed)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def rs_llama(llama_dir):
    return peft_rs.models.LlamaForCausalLM.from_pretrained(llama_dir)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_same_logits(actual, expected, mask):
    keep = mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], **TOL)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_adapter_gives_peft_logits_and_tokens(method, llama_dir, tmp_path):
    peft_model, path = peft_adapter(llama_dir, tmp_path, method, seed=1, name="adapter")
    keys = load_file(path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    ours = peft_rs.PeftModel.from_pretrained(rs_llama(llama_dir), path)
    ids, mask = padded_batch()
    expected = logits(peft_model, ids, mask)
    assert (expected - logits(reference(llama_dir), ids, mask)).abs().max() > 1e-2
    assert_same_logits(ours(ids, attention_mask=mask), expected, mask)

    # Greedy decoding from left-padded prompts, token for token.
    prompt, prompt_mask = ids[:2, :8].clone(), mask[:2, :8].clone()
    prompt_mask[0, :] = 1
    with torch.no_grad():
        want = peft_model.generate(
            input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=6, do_sample=False
        )
    got = ours.generate(prompt, max_new_tokens=6, attention_mask=prompt_mask)
    assert torch.equal(got, want)


def test_mixed_batch_generation_rows_equal_single_adapters(llama_dir, tmp_path):
    _, lora_dir = peft_adapter(llama_dir, tmp_path, "lora", seed=1, name="lora")
    _, loha_dir = peft_adapter(llama_dir, tmp_path, "loha", seed=2, name="loha")
    ours = peft_rs.PeftModel.from_pretrained(rs_llama(llama_dir), lora_dir, adapter_name="a")
    ours.load_adapter(loha_dir, "b")
    ids, mask = padded_batch()
    rows = ["b", "__base__", "a"]
    mixed = ours(ids, attention_mask=mask, adapter_names=rows)
    generated = ours.generate(ids, max_new_tokens=5, attention_mask=mask, adapter_names=rows)
    for i, name in enumerate(rows):
        if name == "__base__":
            with ours.disable_adapter():
                single = ours(ids, attention_mask=mask)
                tokens = ours.generate(ids, max_new_tokens=5, attention_mask=mask)
        else:
            ours.set_adapter(name)
            single = ours(ids, attention_mask=mask)
            tokens = ours.generate(ids, max_new_tokens=5, attention_mask=mask)
        torch.testing.assert_close(mixed[i], single[i], rtol=1e-5, atol=1e-5)
        assert torch.equal(generated[i], tokens[i]), name

    # PEFT's own mixed batch (LoRA only in PEFT) agrees for the LoRA and base rows.
    theirs = PeftModel.from_pretrained(reference(llama_dir), lora_dir, adapter_name="a").eval()
    rows = ["__base__", "__base__", "a"]
    with torch.no_grad():
        peft_mixed = theirs(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    ours_rows = ours(ids, attention_mask=mask, adapter_names=rows)
    assert_same_logits(ours_rows, peft_mixed, mask)


def test_several_active_merged_in_turn_and_saved_for_peft(llama_dir, tmp_path):
    _, lora_dir = peft_adapter(llama_dir, tmp_path, "lora", seed=1, name="lora")
    _, loha_dir = peft_adapter(llama_dir, tmp_path, "loha", seed=2, name="loha")
    ours = peft_rs.PeftModel.from_pretrained(rs_llama(llama_dir), lora_dir, adapter_name="a")
    ours.load_adapter(loha_dir, "b")
    ours.set_adapter(["a", "b"])
    ids, mask = padded_batch()
    both = ours(ids, attention_mask=mask)

    # PEFT's mixed model with the same two adapters, both active.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = get_peft_model(reference(llama_dir), METHODS["lora"](), adapter_name="a", mixed=True)
        mixed.load_adapter(lora_dir, "a")
        mixed.add_adapter("b", METHODS["loha"]())
        mixed.load_adapter(loha_dir, "b")
    mixed.base_model.set_adapter(["a", "b"])
    mixed.eval()
    assert_same_logits(both, logits(mixed, ids, mask), mask)

    ours.merge_adapter(["a"])
    assert_same_logits(ours(ids, attention_mask=mask), both, mask)  # "b" still applies (PEFT drops it)
    ours.merge_adapter()
    assert_same_logits(ours(ids, attention_mask=mask), both, mask)
    ours.unmerge_adapter()

    ours.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "b" / "adapter_model.safetensors").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(reference(llama_dir), tmp_path / "saved" / "b").eval()
        single_b = peft_rs.PeftModel.from_pretrained(rs_llama(llama_dir), loha_dir)
    assert_same_logits(logits(reloaded, ids, mask), single_b(ids, attention_mask=mask), mask)

    plain = ours.merge_and_unload()
    assert_same_logits(plain(ids, attention_mask=mask), both, mask)
    assert BASE["vocab_size"] == plain(ids, attention_mask=mask).shape[-1]


def test_adapters_on_embedding_layers_with_their_saved_base_weights(llama_dir, tmp_path):
    """PEFT saves the base weights of targeted embedding layers (`...lm_head.base_layer.weight`)
    by default; peft_rs loads them back into the model and writes them the same way."""
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["embed_tokens", "lm_head", "q_proj"], r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(reference(llama_dir), config).eval()
        perturb(peft_model, 3)
        peft_model.save_pretrained(tmp_path / "adapter")
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.base_layer.weight" in keys
    ours = peft_rs.PeftModel.from_pretrained(rs_llama(llama_dir), tmp_path / "adapter")
    ids, mask = padded_batch()
    assert_same_logits(ours(ids, attention_mask=mask), logits(peft_model, ids, mask), mask)
    ours.save_pretrained(tmp_path / "resaved")
    assert set(load_file(tmp_path / "resaved" / "adapter_model.safetensors")) == keys


def test_bf16_model_with_adapter(llama_dir, tmp_path):
    """bf16 base, adapter kept in f32 (PEFT's autocast_adapter_dtype): logits within 4 bf16 steps
    (2⁻⁸ relative each) of the largest logit, the same bound the plain bf16 model meets."""
    _, path = peft_adapter(llama_dir, tmp_path, "lora", seed=1, name="lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(
            reference(llama_dir, dtype=torch.bfloat16, attn_implementation="eager"), path
        ).eval()
    ours = peft_rs.PeftModel.from_pretrained(
        peft_rs.models.LlamaForCausalLM.from_pretrained(llama_dir, dtype="bfloat16"), path
    )
    ids, mask = padded_batch()
    expected = logits(theirs, ids, mask).float()
    found = ours(ids, attention_mask=mask).float()
    keep = mask.bool()
    bound = 4 * 2**-8 * expected[keep].abs().max().item()
    assert (found[keep] - expected[keep]).abs().max().item() <= bound
