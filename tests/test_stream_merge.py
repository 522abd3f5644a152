"""Streaming merge (`peft_rs.merge_checkpoint`) against the installed `peft`: small sharded Llama
checkpoints written by transformers, adapters created and perturbed by PEFT; the merged directory
equals PEFT's `merge_and_unload()` + `save_pretrained()` tensor by tensor, with the same shards
and index, and loads in transformers with the same logits. Also weights, bf16, dtype conversion,
errors and resume."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

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
from safetensors import safe_open
from test_llama_model import make_llama, padded_batch, reference

import peft_rs
from peft_rs import errors

SHARD = "100KB"  # the tiny Llama (~320 KB in f32) is written as 4 shards
INDEX = "model.safetensors.index.json"
TARGETS = ["q_proj", "v_proj", "down_proj"]
F32_EXACT = {"rtol": 0.0, "atol": 1e-6}

METHODS = {
    # LoRA on an embedding too (PEFT then saves its base weight) and lm_head as modules_to_save.
    "lora": lambda: LoraConfig(
        task_type="CAUSAL_LM",
        target_modules=[*TARGETS, "embed_tokens"],
        r=4,
        lora_alpha=8,
        modules_to_save=["lm_head"],
    ),
    "ia3": lambda: IA3Config(
        task_type="CAUSAL_LM", target_modules=TARGETS, feedforward_modules=["down_proj"]
    ),
    "oft": lambda: OFTConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=0, oft_block_size=16),
    "loha": lambda: LoHaConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=4),
    "lokr": lambda: LoKrConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=4),
    "boft": lambda: BOFTConfig(task_type="CAUSAL_LM", target_modules=TARGETS, boft_block_size=4),
    "vera": lambda: VeraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=8),
    "adalora": lambda: AdaLoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, init_r=4, total_step=10),
    "dora": lambda: LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=4, use_dora=True),
}


def perturb(peft_model, seed):
    """Adapters start at identity; every trainable tensor then moves by N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


def make_adapter(base_dir: Path, path: Path, config, seed: int = 1) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(reference(base_dir), config)
    perturb(model, seed)
    model.save_pretrained(path)
    return path


def peft_merged_dir(base_dir: Path, adapters: list[Path], out: Path, weights=None, dtype=None) -> Path:
    """PEFT's merge: the adapters loaded on the base model (in `dtype`), LoRA updates scaled by
    `weights` (lora_B times w), `merge_and_unload`, `save_pretrained` with the same shard size."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    names = [f"a{i}" for i in range(len(adapters))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(reference(base_dir, **kwargs), adapters[0], adapter_name=names[0])
        for name, path in zip(names[1:], adapters[1:], strict=True):
            model.load_adapter(path, adapter_name=name)
    if weights is not None:
        with torch.no_grad():
            for module in model.modules():
                for name, w in zip(names, weights, strict=True):
                    if hasattr(module, "lora_B") and name in module.lora_B:
                        module.lora_B[name].weight.mul_(w)
    merged = model.merge_and_unload(adapter_names=names)
    merged.save_pretrained(out, max_shard_size=SHARD)
    return out


def tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of a checkpoint directory, by shard file."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out[f.name] = {k: st.get_tensor(k) for k in st.keys()}
    return out


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX).read_text())["weight_map"]


def flat(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in tensors(path).values() for k, v in shard.items()}


def assert_same_checkpoint(ours: Path, expected: Path, layout: Path, tol=F32_EXACT) -> None:
    """`ours` holds `expected`'s tensors, in the shards of `layout` (the input checkpoint: PEFT's
    `save_pretrained` after `merge_and_unload` may order, and so shard, the tensors differently)."""
    assert weight_map(ours) == weight_map(layout)
    for shard, names in tensors(layout).items():
        assert tensors(ours)[shard].keys() == names.keys(), shard
    mine, theirs = flat(ours), flat(expected)
    assert mine.keys() == theirs.keys()
    for name, t in theirs.items():
        assert mine[name].dtype == t.dtype, name
        torch.testing.assert_close(mine[name], t, **tol, msg=name)


def logits(path: Path):
    ids, mask = padded_batch()
    with torch.no_grad():
        return reference(path)(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = make_llama(tmp_path_factory.mktemp("llama"), max_shard_size=SHARD)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    assert len(set(weight_map(path).values())) >= 3
    return path


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {m: make_adapter(llama_dir, root / m, make()) for m, make in METHODS.items()}


def test_same_layout_and_files(llama_dir, adapters, tmp_path):
    out = tmp_path / "merged"
    summary = peft_rs.merge_checkpoint(llama_dir, [adapters["lora"]], out)
    shards = sorted(set(weight_map(llama_dir).values()))
    assert summary["written"] == shards and summary["skipped"] == []
    assert weight_map(out) == weight_map(llama_dir)
    index = json.loads((out / INDEX).read_text())
    sizes = sum(t.numel() * t.element_size() for s in tensors(out).values() for t in s.values())
    assert index["metadata"]["total_size"] == sizes == summary["total_bytes"]
    copied = {p.name for p in llama_dir.iterdir()} - {*shards, INDEX}
    assert copied == {"config.json", "generation_config.json", "tokenizer_config.json"}
    for name in copied:
        assert (out / name).read_bytes() == (llama_dir / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted([*copied, *shards, INDEX])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_equals_peft_merge_and_unload(method, llama_dir, adapters, tmp_path):
    expected = peft_merged_dir(llama_dir, [adapters[method]], tmp_path / "peft")
    out = tmp_path / "ours"
    peft_rs.merge_checkpoint(llama_dir, [adapters[method]], out)
    assert_same_checkpoint(out, expected, llama_dir)
    # The merge changed the model, and transformers loads ours with PEFT's logits.
    base_logits, merged_logits = logits(llama_dir), logits(expected)
    assert (merged_logits - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(logits(out), merged_logits, rtol=1e-5, atol=1e-5)


def test_two_weighted_adapters(llama_dir, adapters, tmp_path):
    second = make_adapter(
        llama_dir,
        tmp_path / "second",
        LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj"], r=2, lora_alpha=3),
        seed=7,
    )
    # `weights` scale each adapter's update; lora (with modules_to_save) must keep weight 1.
    weights = [1.0, -0.6]
    expected = peft_merged_dir(llama_dir, [adapters["lora"], second], tmp_path / "peft", weights)
    out = tmp_path / "ours"
    peft_rs.merge_checkpoint(llama_dir, [adapters["lora"], second], out, weights=weights)
    assert_same_checkpoint(out, expected, llama_dir)

    # A weight on an adapter without replaced tensors: PEFT's merge with lora_B scaled.
    expected = peft_merged_dir(llama_dir, [second], tmp_path / "peft_w", [0.25])
    peft_rs.merge_checkpoint(llama_dir, [second], tmp_path / "ours_w", weights=[0.25])
    assert_same_checkpoint(tmp_path / "ours_w", expected, llama_dir)


def test_bf16_checkpoint(llama_dir, adapters, tmp_path):
    """A bf16 checkpoint merges as PEFT merges a bf16 model (adapters kept in f32, ΔW in f32,
    added in f32 and rounded once): equal to PEFT's bf16 `merge_and_unload` bit for bit, except
    LoRA on an embedding, where PEFT rounds ΔW to bf16 before adding it (two roundings). There
    the difference is at most one bf16 ulp of the tensor's largest value (measured: 0.0156, values
    in [2, 4); about 30% of the elements differ). OFT's merge sums only the block products where
    PEFT multiplies by the formed rotation: the f32 sums come in another order, and 1-2 elements
    in 6144 round to the neighbouring bf16 value."""
    bf16_dir = tmp_path / "bf16"
    reference(llama_dir).to(torch.bfloat16).save_pretrained(bf16_dir, max_shard_size="50KB")
    assert len(set(weight_map(bf16_dir).values())) >= 3
    for method in ("lora", "loha", "oft", "ia3"):
        expected = peft_merged_dir(
            bf16_dir, [adapters[method]], tmp_path / f"peft_{method}", dtype=torch.bfloat16
        )
        out = tmp_path / f"ours_{method}"
        peft_rs.merge_checkpoint(bf16_dir, [adapters[method]], out)
        assert weight_map(out) == weight_map(bf16_dir)
        mine, theirs = flat(out), flat(expected)
        assert mine.keys() == theirs.keys()
        for name, t in theirs.items():
            assert mine[name].dtype == torch.bfloat16
            if name == "model.embed_tokens.weight" and method == "lora":
                largest = t.float().abs().max()
                ulp = 2.0 ** (torch.floor(torch.log2(largest)).item() - 7)  # 8 significant bits
                assert (mine[name].float() - t.float()).abs().max() <= ulp
            elif method == "oft":
                # One bf16 ulp where the f32 sums (another order) fall either side of a rounding
                # boundary; near-cancelling elements (measured: -1.9e-6 in a tensor up to 0.69)
                # carry the f32 sums' absolute error as well.
                diff = (mine[name].float() - t.float()).abs()
                assert (diff <= bf16_ulp(t) + 2.0**-20 * t.float().abs().max()).all(), (method, name)
                assert (diff > 0).float().mean() < 1e-3, (method, name)
            else:
                assert torch.equal(mine[name], t), (method, name)


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at each element of `t` (8 significant bits)."""
    exponent = torch.floor(torch.log2(t.float().abs().clamp_min(2.0**-126)))
    return torch.exp2(exponent - 7)


def test_dtype_conversion_before_merge(llama_dir, adapters, tmp_path):
    """`dtype` converts the checkpoint before merging, as loading the model in that dtype does:
    merging the f32 checkpoint into bf16 equals merging its bf16 copy."""
    bf16_dir = tmp_path / "bf16"
    reference(llama_dir).to(torch.bfloat16).save_pretrained(bf16_dir, max_shard_size=SHARD)
    peft_rs.merge_checkpoint(bf16_dir, [adapters["loha"]], tmp_path / "a")
    peft_rs.merge_checkpoint(llama_dir, [adapters["loha"]], tmp_path / "b", dtype="bfloat16")
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    flat_a = {k: v for s in a.values() for k, v in s.items()}
    flat_b = {k: v for s in b.values() for k, v in s.items()}
    assert flat_a.keys() == flat_b.keys()
    for name, t in flat_a.items():
        assert flat_b[name].dtype == torch.bfloat16
        assert torch.equal(flat_b[name], t), name
    # Same layout as the f32 input (shards are kept, only their bytes shrink).
    assert weight_map(tmp_path / "b") == weight_map(llama_dir)


def test_missing_shard(llama_dir, adapters, tmp_path):
    broken = shutil.copytree(llama_dir, tmp_path / "broken")
    shard = sorted(set(weight_map(broken).values()))[1]
    (broken / shard).unlink()
    with pytest.raises(errors.AdapterFileNotFoundError, match=shard):
        peft_rs.merge_checkpoint(broken, [adapters["lora"]], tmp_path / "out")


def test_truncated_shard(llama_dir, adapters, tmp_path):
    broken = shutil.copytree(llama_dir, tmp_path / "broken")
    shard = sorted(set(weight_map(broken).values()))[2]
    data = (broken / shard).read_bytes()
    (broken / shard).write_bytes(data[: len(data) - 100])
    with pytest.raises(errors.InvalidFileError, match=shard):
        peft_rs.merge_checkpoint(broken, [adapters["lora"]], tmp_path / "out")


def test_adapter_for_another_model(adapters, tmp_path):
    one_layer = make_llama(tmp_path / "one_layer", num_hidden_layers=1)
    with pytest.raises(errors.MissingKeyError, match=r"model\.layers\.1\."):
        peft_rs.merge_checkpoint(one_layer, [adapters["loha"]], tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("method", ["ia3", "oft"])
def test_weight_on_non_additive_method(method, llama_dir, adapters, tmp_path):
    with pytest.raises(errors.InvalidOperationError, match=str(adapters[method])):
        peft_rs.merge_checkpoint(llama_dir, [adapters[method]], tmp_path / "out", weights=[0.5])
    # Replaced tensors (modules_to_save) cannot be scaled either.
    with pytest.raises(errors.InvalidOperationError, match="modules_to_save"):
        peft_rs.merge_checkpoint(llama_dir, [adapters["lora"]], tmp_path / "out", weights=[0.5])


def test_resume_rewrites_only_missing_shard(llama_dir, adapters, tmp_path):
    out = tmp_path / "out"
    peft_rs.merge_checkpoint(llama_dir, [adapters["loha"]], out)
    complete = tensors(out)
    shards = sorted(complete)
    stamps = {s: (out / s).stat().st_mtime_ns for s in shards}
    (out / shards[1]).unlink()
    summary = peft_rs.merge_checkpoint(llama_dir, [adapters["loha"]], out, resume=True)
    assert summary["written"] == [shards[1]]
    assert summary["skipped"] == [s for s in shards if s != shards[1]]
    for s in summary["skipped"]:
        assert (out / s).stat().st_mtime_ns == stamps[s]
    assert weight_map(out) == weight_map(llama_dir)
    resumed = tensors(out)
    for shard, ts in complete.items():
        for name, t in ts.items():
            assert torch.equal(resumed[shard][name], t), name

    # A different merge does not reuse the shards: every one is rewritten.
    summary = peft_rs.merge_checkpoint(llama_dir, [adapters["lora"]], out, resume=True)
    assert summary["written"] == shards and summary["skipped"] == []


def test_interrupted_merge_then_resume(llama_dir, adapters, tmp_path):
    """A merge stopped half-way (the progress callback raises) leaves no index, so the directory
    does not look complete; resume finishes it, equal to an uninterrupted merge."""
    calls = []

    class Stop(Exception):
        pass

    def stop_half_way(done, total):
        calls.append((done, total))
        if done > total // 2:
            raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        peft_rs.merge_checkpoint(llama_dir, [adapters["lora"]], out, progress=stop_half_way)
    assert not (out / INDEX).exists()
    assert not list(out.glob(".*tmp*"))
    written_before = {p.name for p in out.glob("*.safetensors")}
    assert 0 < len(written_before) < len(set(weight_map(llama_dir).values()))

    progress = []
    summary = peft_rs.merge_checkpoint(
        llama_dir, [adapters["lora"]], out, resume=True, progress=lambda d, t: progress.append((d, t))
    )
    assert set(summary["skipped"]) == written_before
    done = [d for d, _ in progress]
    assert done == sorted(done) and progress[-1] == (summary["total_bytes"], summary["total_bytes"])
    peft_rs.merge_checkpoint(llama_dir, [adapters["lora"]], tmp_path / "straight")
    assert_same_checkpoint(out, tmp_path / "straight", llama_dir, tol={"rtol": 0.0, "atol": 0.0})


def test_single_file_checkpoint(adapters, tmp_path):
    single = make_llama(tmp_path / "single")
    assert (single / "model.safetensors").is_file() and not (single / INDEX).exists()
    expected = tmp_path / "peft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(reference(single), adapters["ia3"])
    model.merge_and_unload().save_pretrained(expected)
    out = tmp_path / "ours"
    peft_rs.merge_checkpoint(single, [adapters["ia3"]], out)
    assert not (out / INDEX).exists()
    mine, theirs = tensors(out)["model.safetensors"], tensors(expected)["model.safetensors"]
    assert mine.keys() == theirs.keys()
    for name, t in theirs.items():
        torch.testing.assert_close(mine[name], t, **F32_EXACT, msg=name)


# A merge killed by the system (SIGKILL: no cleanup runs) in the middle of a checkpoint.

TEMP_SHARD = re.compile(r"^\.(?P<shard>.+\.safetensors)\.tmp-\d+$")  # stream_merge.rs's temp names


def merge_command(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "peft_rs.cli", "merge", str(base), str(adapter), "--out", str(out), *extra]


def kill_mid_merge(base: Path, adapter: Path, out: Path, shards: set[str]) -> bool:
    """Starts `peft-rs merge` and SIGKILLs it as soon as one output shard exists under its final
    name. False when the merge finished before it could be killed (the caller retries larger)."""
    proc = subprocess.Popen(
        merge_command(base, adapter, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while proc.poll() is None:
            if out.is_dir() and any(p.name in shards for p in out.iterdir()):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.0005)
    finally:
        proc.kill()
        _, stderr = proc.communicate(timeout=60)
    if proc.returncode != -signal.SIGKILL:
        assert proc.returncode == 0, stderr.decode()
        return False
    return not (out / INDEX).exists()  # killed after the index was written: as good as finished


def test_killed_merge_then_resume(tmp_path):
    """`peft-rs merge` killed with SIGKILL part-way (no Python or Rust cleanup runs) leaves no
    index and no partial shard under a final name; `--resume` keeps the shards that were written,
    writes the rest, and the result equals an uninterrupted merge bit for bit."""
    lora = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], r=4)
    # Many small shards (each one is fsynced) so that the merge lasts long enough to be killed;
    # a machine fast enough to finish first gets a larger checkpoint, and never a vacuous pass.
    for layers in (32, 128, 512):
        root = tmp_path / f"layers{layers}"
        base = make_llama(root / "base", num_hidden_layers=layers, max_shard_size="20KB")
        adapter = make_adapter(base, root / "adapter", lora)
        shards = set(weight_map(base).values())
        out = root / "out"
        if kill_mid_merge(base, adapter, out, shards):
            break
    else:
        pytest.fail("the merge always finished before it could be killed, even with 512 layers")

    # The directory does not look complete, and every shard under its final name is whole.
    assert not (out / INDEX).exists()
    names = {p.name for p in out.iterdir()}
    complete = names & shards
    temps = {n for n in names if TEMP_SHARD.match(n)}
    assert all(TEMP_SHARD.match(n)["shard"] in shards for n in temps)
    assert names - complete - temps <= {"config.json", "generation_config.json"}
    assert 0 < len(complete) < len(shards)
    straight = root / "straight"
    subprocess.run(merge_command(base, adapter, straight), check=True, capture_output=True)
    for shard in complete:
        assert (out / shard).read_bytes() == (straight / shard).read_bytes(), shard
    stamps = {s: ((out / s).stat().st_ino, (out / s).stat().st_mtime_ns) for s in complete}

    subprocess.run(merge_command(base, adapter, out, "--resume"), check=True, capture_output=True)
    # The shards complete before the kill were kept (same file, not rewritten).
    for shard, stamp in stamps.items():
        assert ((out / shard).stat().st_ino, (out / shard).stat().st_mtime_ns) == stamp, shard
    assert weight_map(out) == weight_map(base)
    assert sorted(p.name for p in out.iterdir() if not TEMP_SHARD.match(p.name)) == sorted(
        p.name for p in straight.iterdir()
    )
    resumed, expected = tensors(out), tensors(straight)
    assert resumed.keys() == expected.keys()
    for shard, ts in expected.items():
        assert resumed[shard].keys() == ts.keys(), shard
        for name, t in ts.items():
            assert resumed[shard][name].dtype == t.dtype and torch.equal(resumed[shard][name], t), name
