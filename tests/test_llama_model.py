"""peft_rs's LlamaForCausalLM against transformers' on tiny random Llamas that transformers itself
creates and saves (save_pretrained): logits with padded batches, every rope type, greedy generate
token for token, f16/bf16, module paths and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HfLlama

import peft_rs
from peft_rs.errors import ConfigError, MissingKeyError

# Two layers of float32 accumulation over logits of magnitude ~6 (sdpa and eager also differ
# from each other by ~1e-5 here).
TOL = {"rtol": 1e-4, "atol": 1e-4}

BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    # Large enough weights that attention is peaked, so RoPE changes the logits by O(1).
    "initializer_range": 0.2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def make_llama(path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    """A random LlamaForCausalLM saved by transformers. The same seed gives the same weights
    whatever the RoPE or token settings (they add no parameters)."""
    torch.manual_seed(seed)
    model = HfLlama(LlamaConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # initialised to ones: make loading them matter
                param.copy_(1 + 0.2 * torch.randn_like(param))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def reference(path: Path, **kwargs) -> HfLlama:
    # A fresh transformers model per comparison: dynamic RoPE keeps state across its calls.
    return HfLlama.from_pretrained(path, **kwargs).eval()


def ours(path: Path, dtype: str = "float32"):
    return peft_rs.models.LlamaForCausalLM.from_pretrained(path, dtype=dtype)


def edit_config(path: Path, **changes) -> Path:
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))
    return path


def padded_batch(seq: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: full, left-padded by 3, right-padded by 2 (pad id 0)."""
    torch.manual_seed(seed)
    ids = torch.randint(3, BASE["vocab_size"], (3, seq))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, -2:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hf_logits(model: HfLlama, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def assert_logits_match(path: Path, ids: torch.Tensor, mask: torch.Tensor | None, **hf_kwargs):
    expected = hf_logits(reference(path, **hf_kwargs), ids, mask)
    found = ours(path)(ids, attention_mask=mask)
    assert found.shape == expected.shape
    assert found.dtype == torch.float32
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    # Only real tokens: on fully masked query rows sdpa returns 0 and eager the mean of V.
    torch.testing.assert_close(found[real], expected[real], **TOL)
    return expected


# ------------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_padded_batch(tmp_path, attn):
    path = make_llama(tmp_path / "llama")
    ids, mask = padded_batch()
    assert_logits_match(path, ids, mask, attn_implementation=attn)
    assert_logits_match(path, ids, None, attn_implementation=attn)


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
        {"head_dim": 32},  # q/o projections not square: 4 heads of 32 on hidden 64
        {"num_key_value_heads": 4},  # multi-head
        {"num_key_value_heads": 1},  # multi-query
        {"rms_norm_eps": 0.5},
        {"hidden_act": "gelu"},
        {"hidden_act": "gelu_pytorch_tanh"},
        {"hidden_act": "relu"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_logits_config_variants(tmp_path, overrides):
    path = make_llama(tmp_path / "llama", **overrides)
    if overrides.get("tie_word_embeddings"):
        assert "lm_head.weight" not in _checkpoint_keys(path)
    ids, mask = padded_batch()
    assert_logits_match(path, ids, mask)


def _checkpoint_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys.update(f.keys())
    return keys


def test_tied_checkpoint_with_its_own_lm_head(tmp_path):
    """A tied config whose file nevertheless holds a different lm_head: transformers unties."""
    path = make_llama(tmp_path / "llama")
    edit_config(path, tie_word_embeddings=True)
    ids, mask = padded_batch()
    assert_logits_match(path, ids, mask)


def test_sharded_checkpoint(tmp_path):
    path = make_llama(tmp_path / "llama", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    ids, mask = padded_batch()
    assert_logits_match(path, ids, mask)


# --------------------------------------------------------------------------------------- RoPE

LONG = [1.0 + 0.25 * i for i in range(8)]  # head_dim 16 -> 8 frequencies
SHORT = [1.0 + 0.05 * i for i in range(8)]
ROPES = {
    "theta500": {"rope_type": "default", "rope_theta": 500.0},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn-options": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "attention_factor": 0.8,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
    },
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "mscale": 0.7,
        "mscale_all_dim": 1.3,
        "truncate": False,
    },
    "yarn-no-factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 8},
    "longrope": {
        "rope_type": "longrope",
        "short_factor": SHORT,
        "long_factor": LONG,
        "original_max_position_embeddings": 16,
    },
    "longrope-factors": {
        "rope_type": "longrope",
        "short_factor": SHORT,
        "long_factor": LONG,
        "original_max_position_embeddings": 16,
        "factor": 3.0,
        "attention_factor": 1.3,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "proportional": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 2.0},
}


@pytest.mark.parametrize("seq", [12, 40], ids=["short", "beyond-max-positions"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_types(tmp_path, rope, seq):
    """seq 40 > max_position_embeddings 32 and > every original_max_position_embeddings: dynamic
    recomputes its frequencies and longrope switches to its long factors."""
    params = {"rope_theta": 10000.0, **ROPES[rope]}
    path = make_llama(tmp_path / "llama", rope_parameters=params)
    ids, mask = padded_batch(seq)
    expected = assert_logits_match(path, ids, mask)
    if rope == "dynamic" and seq <= BASE["max_position_embeddings"]:
        return  # dynamic RoPE equals the default one within max_position_embeddings
    # The case is one the test can see: RoPE moves these logits far beyond the tolerance.
    default = hf_logits(reference(make_llama(tmp_path / "default")), ids, mask)
    assert (expected - default)[mask.bool()].abs().max() > 1e-2


def test_legacy_rope_scaling_and_rope_theta(tmp_path):
    """Older config.json files: top-level rope_theta and rope_scaling with `type`."""
    path = make_llama(tmp_path / "llama")
    edit_config(path, rope_parameters=None, rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert reference(path).config.rope_parameters["rope_type"] == "linear"
    ids, mask = padded_batch()
    assert_logits_match(path, ids, mask)


def test_top_level_original_max_position_embeddings_wins(tmp_path):
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1e4}
    path = make_llama(tmp_path / "llama", rope_parameters=params)
    edit_config(path, original_max_position_embeddings=8)
    ids, mask = padded_batch()
    assert_logits_match(path, ids, mask)


# ----------------------------------------------------------------------------------- generate


def hf_generate(path: Path, ids: torch.Tensor, mask: torch.Tensor | None, new: int, **kwargs):
    return reference(path, **kwargs).generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)


def left_padded(seq: int = 8, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    ids = torch.randint(3, BASE["vocab_size"], (3, seq))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("case", ["single-row", "batch-no-padding", "left-padded", "left-padded-no-mask"])
def test_generate_matches_transformers(tmp_path, case):
    path = make_llama(tmp_path / "llama")
    ids, mask = left_padded()
    if case == "single-row":
        ids, mask = ids[:1], None
    elif case == "batch-no-padding":
        mask = None
    elif case == "left-padded-no-mask":
        mask = None  # both infer the mask from pad_token_id occurring in the prompt
        assert (ids == BASE["pad_token_id"]).any()
    expected = hf_generate(path, ids, mask, 12)
    found = ours(path).generate(ids, 12, attention_mask=mask)
    assert found.dtype == torch.int64
    assert torch.equal(found, expected)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 3.0},
        {
            "rope_type": "longrope",
            "short_factor": SHORT,
            "long_factor": LONG,
            "original_max_position_embeddings": 28,
        },
    ],
    ids=["dynamic", "longrope"],
)
def test_generate_across_the_rope_threshold(tmp_path, rope):
    """The prompt fits max_position_embeddings (32) / the original length (28), the generated
    tokens go beyond it: new keys are rotated with the new frequencies, cached ones keep theirs."""
    path = make_llama(tmp_path / "llama", rope_parameters={"rope_theta": 10000.0, **rope})
    ids, mask = left_padded(seq=24)
    expected = hf_generate(path, ids, mask, 16)
    assert torch.equal(ours(path).generate(ids, 16, attention_mask=mask), expected)


def _greedy_tokens(tmp_path: Path, ids, mask, new: int) -> torch.Tensor:
    path = make_llama(tmp_path / "no-eos", eos_token_id=None)
    return hf_generate(path, ids, mask, new)[:, ids.shape[1] :]


@pytest.mark.parametrize("pad", [0, None], ids=["pad-id", "pad-is-eos"])
def test_generate_stops_rows_at_eos(tmp_path, pad):
    """Each row stops at its own eos (later tokens are the pad id), decoding stops once all have."""
    ids, mask = left_padded()
    free = _greedy_tokens(tmp_path, ids, mask, 12)
    # eos ids that the rows produce at different steps: row 0's 3rd token and row 1's 6th.
    eos = [int(free[0, 2]), int(free[1, 5])]
    path = make_llama(tmp_path / "llama", eos_token_id=eos, pad_token_id=pad)
    expected = hf_generate(path, ids, mask, 12)
    found = ours(path).generate(ids, 12, attention_mask=mask)
    assert torch.equal(found, expected)
    generated = expected[:, ids.shape[1] :]
    fill = eos[0] if pad is None else pad
    assert generated[0, 3:].eq(fill).all() and generated[0, 2] == eos[0]  # stopped and padded


def test_generate_single_eos_id_stops_early(tmp_path):
    ids, mask = left_padded()
    ids, mask = ids[:1], mask[:1]
    free = _greedy_tokens(tmp_path, ids, mask, 12)
    eos = int(free[0, 4])
    path = make_llama(tmp_path / "llama", eos_token_id=eos)
    expected = hf_generate(path, ids, mask, 12)
    assert expected.shape[1] < ids.shape[1] + 12  # the whole batch finished early
    assert torch.equal(ours(path).generate(ids, 12, attention_mask=mask), expected)


def test_generation_config_overrides_config(tmp_path):
    """generate reads eos/pad from generation_config.json, as transformers does."""
    ids, mask = left_padded()
    free = _greedy_tokens(tmp_path, ids, mask, 12)
    path = make_llama(tmp_path / "llama")  # config.json: eos 2
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = int(free[0, 3])
    (path / "generation_config.json").write_text(json.dumps(generation))
    expected = hf_generate(path, ids, mask, 12)
    assert expected[0, ids.shape[1] + 4 :].eq(BASE["pad_token_id"]).all()
    assert torch.equal(ours(path).generate(ids, 12, attention_mask=mask), expected)


def test_generate_rejects_zero_new_tokens(tmp_path):
    path = make_llama(tmp_path / "llama")
    ids, _ = left_padded()
    with pytest.raises(ValueError, match="must be greater than 0"):
        hf_generate(path, ids, None, 0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        ours(path).generate(ids, 0)


# -------------------------------------------------------------------------------- f16 / bf16

# Against transformers' eager attention (same operation order): within 4 units of the dtype's
# precision at the largest logit (bf16 matched bit for bit on the development machine, f16 within
# 2 ulps: CPU gemm kernels accumulate in different orders).
EPS = {"bfloat16": 2.0**-7, "float16": 2.0**-10}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits(tmp_path, dtype):
    path = make_llama(tmp_path / "llama")
    ids, mask = padded_batch(seq=20)
    real = mask.bool()
    torch_dtype = getattr(torch, dtype)
    found = ours(path, dtype)(ids, attention_mask=mask)
    assert found.dtype == torch_dtype
    eager = hf_logits(reference(path, dtype=torch_dtype, attn_implementation="eager"), ids, mask)
    atol = 4 * EPS[dtype] * eager[real].abs().max().item()
    torch.testing.assert_close(found[real].float(), eager[real].float(), rtol=0, atol=atol)
    # And no less accurate than transformers' default (sdpa) run in the same dtype.
    f32 = hf_logits(reference(path), ids, mask)[real]
    sdpa = hf_logits(reference(path, dtype=torch_dtype), ids, mask)[real].float()
    assert (found[real].float() - f32).abs().max() <= 1.5 * (sdpa - f32).abs().max()


# ---------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_module_names_are_transformers_paths(tmp_path, tied):
    path = make_llama(tmp_path / "llama", tie_word_embeddings=tied)
    expected = [
        name
        for name, module in reference(path).named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
    ]
    model = ours(path)
    assert model.module_names() == expected
    assert model.architecture == "LlamaForCausalLM"
    assert "LlamaForCausalLM" in peft_rs.models.ARCHITECTURES


def test_untied_checkpoint_without_lm_head(tmp_path):
    """transformers would initialise a missing lm_head randomly; peft_rs refuses."""
    path = make_llama(tmp_path / "llama", tie_word_embeddings=True)
    edit_config(path, tie_word_embeddings=False)
    with pytest.raises(MissingKeyError, match=r"lm_head\.weight"):
        ours(path)


def test_token_type_ids_rejected(tmp_path):
    path = make_llama(tmp_path / "llama")
    ids, mask = padded_batch()
    with pytest.raises(peft_rs.PeftError, match="token_type_ids"):
        ours(path)(ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


def test_attention_mask_shape_checked(tmp_path):
    path = make_llama(tmp_path / "llama")
    ids, mask = padded_batch()
    with pytest.raises(peft_rs.PeftError, match="attention_mask"):
        ours(path)(ids, attention_mask=mask[:, :-1])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"hidden_act": "swiglu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "foo", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope_parameters.factor"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 0.0}}, "rope_parameters.factor"),
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
            "rope_parameters.high_freq_factor",
        ),
        (
            {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": LONG}},
            "rope_parameters.short_factor",
        ),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
            "rope_parameters.partial_rotary_factor",
        ),
        ({"rope_scaling": {"type": "dynamic", "factor": "2"}}, "rope_scaling.factor"),
        ({"eos_token_id": "</s>"}, "eos_token_id"),
        ({"rms_norm_eps": "small"}, "rms_norm_eps"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_config_names_the_field(tmp_path, changes, field):
    path = make_llama(tmp_path / "llama")
    edit_config(path, **changes)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ours(path)
