"""`peft-rs inspect` finds shape mismatches without a model: adapters written by PEFT for every
method inspect clean, and each file rewritten with one inconsistent tensor (ranks of A and B, a
rank that differs from the config's, a LoKr factor, an OFT packed size, an IA³ orientation, a VeRA
lambda size...) is reported with its module and key, exit status 1, in the table and `--json`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import (
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    VeraConfig,
    get_peft_model,
)

import peft_rs
from conftest import MLP, ConvModel, EmbedModel, GPT2Like, make_model, rewrite_weights

PREFIX = "base_model.model."

CASES = {
    "lora": (MLP, lambda: LoraConfig(r=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2})),
    "lora-dora": (MLP, lambda: LoraConfig(r=4, target_modules=["lin0", "lin1"], use_dora=True)),
    "lora-bias": (MLP, lambda: LoraConfig(r=4, target_modules=["lin0"], lora_bias=True)),
    "lora-embedding": (EmbedModel, lambda: LoraConfig(r=4, target_modules=["emb", "lin0"])),
    "lora-conv": (ConvModel, lambda: LoraConfig(r=4, target_modules=["conv", "pw", "conv_s2"])),
    "lora-conv1d": (GPT2Like, lambda: LoraConfig(r=4, target_modules=["c_attn", "c_proj"])),
    "ia3": (MLP, lambda: IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])),
    "ia3-conv": (ConvModel, lambda: IA3Config(target_modules=["conv", "pw"], feedforward_modules=["pw"])),
    "vera": (MLP, lambda: VeraConfig(r=6, target_modules=["lin0", "lin1"], save_projection=True)),
    "vera-no-projection": (
        MLP, lambda: VeraConfig(r=6, target_modules=["lin0", "lin1"], save_projection=False)
    ),
    "loha": (MLP, lambda: LoHaConfig(r=3, target_modules=["lin0", "lin1"])),
    "loha-conv": (
        ConvModel, lambda: LoHaConfig(r=2, target_modules=["conv", "pw"], use_effective_conv2d=True)
    ),
    "lokr": (MLP, lambda: LoKrConfig(r=1, target_modules=["lin0", "lin1"])),
    "lokr-decompose-both": (
        MLP, lambda: LoKrConfig(r=1, target_modules=["lin0", "lin1"], decompose_both=True)
    ),
    "lokr-conv": (ConvModel, lambda: LoKrConfig(r=1, target_modules=["conv", "pw", "conv_s2"])),
    "oft": (MLP, lambda: OFTConfig(r=0, oft_block_size=5, target_modules=["lin0", "lin1"])),
    "oft-r": (MLP, lambda: OFTConfig(r=2, oft_block_size=0, target_modules=["lin0", "lin1"])),
    "oft-conv": (ConvModel, lambda: OFTConfig(r=3, oft_block_size=0, target_modules=["conv"])),
    "boft": (MLP, lambda: BOFTConfig(boft_block_size=2, target_modules=["lin0", "lin1"])),
    "boft-conv": (ConvModel, lambda: BOFTConfig(boft_block_size=3, target_modules=["conv"])),
}  # fmt: skip

# (case, module, {tensor: new shape}, the key the report must name)
BAD = [
    ("lora", "lin0", {"lora_B.weight": (20, 3)}, "lora_B.weight"),  # rank of A vs B
    ("lora", "lin0", {"lora_A.weight": (2, 10), "lora_B.weight": (20, 2)}, "lora_A.weight"),  # vs r
    # vs rank_pattern
    ("lora", "lin1", {"lora_A.weight": (4, 20), "lora_B.weight": (16, 4)}, "lora_A.weight"),
    ("lora-dora", "lin1", {"lora_magnitude_vector": (15,)}, "lora_magnitude_vector"),
    ("lora-bias", "lin0", {"lora_B.bias": (21,)}, "lora_B.bias"),
    ("lora-embedding", "emb", {"lora_embedding_B": (12, 3)}, "lora_embedding_B"),
    ("lora-conv", "conv", {"lora_B.weight": (8, 4, 3, 3)}, "lora_B.weight"),
    ("lora-conv", "pw", {"lora_A.weight": (3, 8, 1, 1)}, "lora_A.weight"),
    ("lora-conv1d", "c_attn", {"lora_B.weight": (24, 5)}, "lora_B.weight"),
    ("ia3", "lin0", {"ia3_l": (1, 20)}, "ia3_l"),  # output scaling stored as an input one
    ("ia3", "lin1", {"ia3_l": (20, 1)}, "ia3_l"),  # feed-forward (input) scaling transposed
    ("ia3-conv", "conv", {"ia3_l": (8, 1, 1, 1)}, "ia3_l"),
    ("vera", "lin0", {"vera_lambda_d": (5,)}, "vera_lambda_d"),
    ("vera-no-projection", "lin1", {"vera_lambda_d": (7,)}, "vera_lambda_d"),
    ("loha", "lin0", {"hada_w2_a": (20, 2)}, "hada_w2_a"),
    ("loha", "lin1", {"hada_w1_b": (2, 20)}, "hada_w1_b"),
    ("loha-conv", "conv", {"hada_t2": (2, 2, 1, 1)}, "hada_t2"),
    ("lokr", "lin0", {"lokr_w1": (8, 2)}, "lokr_w1"),  # out 8·5 = 40 would factor as 5·8
    ("lokr", "lin0", {"lokr_w2_b": (2, 5)}, "lokr_w2_b"),  # rank of w2_a vs w2_b
    ("lokr-conv", "conv", {"lokr_w2_b": (2, 27)}, "lokr_w2_b"),
    ("oft", "lin0", {"oft_R.weight": (2, 9)}, "oft_R.weight"),  # 9 is no b(b-1)/2
    ("oft-r", "lin0", {"oft_R.weight": (3, 10)}, "oft_R.weight"),  # 3 blocks, r=2
    ("boft", "lin0", {"boft_R": (1, 5, 2, 3)}, "boft_R"),
    ("boft", "lin1", {"boft_R": (2, 10, 2, 2)}, "boft_R"),  # butterfly factors vs the config
]


def cli(*args) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "peft_rs.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def save_case(name: str, path):
    cls, config = CASES[name]
    torch.manual_seed(0)
    model = get_peft_model(make_model(cls), config())
    # Non-identity weights, as after training.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, save_embedding_layers=False)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_peft_adapter_inspects_clean(tmp_path, name):
    path = save_case(name, tmp_path / name)
    assert peft_rs.PeftAdapter.from_pretrained(path).check() == []
    proc = cli("inspect", path, "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert json.loads(proc.stdout)["problems"] == []


def test_pruned_adalora_inspects_clean_and_rank_mismatch_is_found(tmp_path):
    from test_adalora_parity import train_with_peft

    peft_model, _ = train_with_peft(MLP, ["lin0", "lin1", "classifier"])
    peft_model.save_pretrained(tmp_path)
    report = json.loads(cli("inspect", tmp_path, "--json").stdout)
    assert report["problems"] == []
    ranks = {m["name"]: m["rank"] for m in report["modules"]}
    module = max(ranks, key=ranks.get)  # a module that keeps at least one rank

    def grow(t):  # one rank more in lora_E than rank_pattern keeps
        t[f"{PREFIX}{module}.lora_E"] = torch.zeros(ranks[module] + 1, 1)

    rewrite_weights(tmp_path, grow)
    proc = cli("inspect", tmp_path, "--json")
    assert proc.returncode == 1
    problems = json.loads(proc.stdout)["problems"]
    assert len(problems) == 1 and problems[0].startswith(f"shape mismatch in {module}: "), problems
    assert f"{PREFIX}{module}.lora_E" in problems[0], problems


@pytest.mark.parametrize("name,module,shapes,key", BAD, ids=[f"{b[0]}-{b[1]}-{'+'.join(b[2])}" for b in BAD])
def test_shape_mismatch_is_reported(tmp_path, name, module, shapes, key):
    path = save_case(name, tmp_path / name)

    def rewrite(tensors):
        for tensor, shape in shapes.items():
            full = f"{PREFIX}{module}.{tensor}"
            assert full in tensors, sorted(tensors)
            tensors[full] = torch.randn(shape)

    rewrite_weights(path, rewrite)
    problems = peft_rs.PeftAdapter.from_pretrained(path).check()
    assert [m for m, _ in problems] == [module], problems
    assert f"{PREFIX}{module}.{key}" in problems[0][1], problems

    proc = cli("inspect", path, "--json")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    reported = json.loads(proc.stdout)["problems"]
    assert reported == [f"shape mismatch in {module}: {problems[0][1]}"], reported


def test_table_shows_shape_mismatch(tmp_path):
    path = save_case("lora", tmp_path / "lora")
    rewrite_weights(path, lambda t: t.update({f"{PREFIX}lin0.lora_B.weight": torch.zeros(20, 3)}))
    proc = cli("inspect", path)
    assert proc.returncode == 1
    assert "problems (1)" in proc.stdout
    line = next(s for s in proc.stdout.splitlines() if "shape mismatch in lin0" in s)
    assert f"{PREFIX}lin0.lora_B.weight" in line and "[20, 4]" in line and "[20, 3]" in line, line
