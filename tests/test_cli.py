"""The `peft-rs` command line, run as a subprocess on adapters written by PEFT: `inspect` values
checked against the files and PEFT's own model, `convert` outputs loaded back in PEFT, `--help`
for every subcommand, and one-line errors with exit status 2 (never a traceback)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoHaConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import peft_rs
from conftest import MLP, make_model, model_input
from peft_rs import cli as peft_rs_cli
from peft_rs.cli import Progress

SUBCOMMANDS = ("inspect", "convert", "merge", "combine", "finetune")
CONFIGS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False),
    "lora-patterns": LoraConfig(
        r=4,
        target_modules=["lin0", "lin1", "classifier"],
        rank_pattern={"lin1": 2},
        init_lora_weights=False,
    ),
    "lora-modules-to-save": LoraConfig(
        r=3, target_modules=["lin0"], modules_to_save=["classifier"], init_lora_weights=False
    ),
    "loha": LoHaConfig(r=3, alpha=6, target_modules=["lin0", "lin1"], init_weights=False),
    "vera": VeraConfig(r=6, target_modules=["lin0", "lin1"], save_projection=True, init_weights=False),
}


def cli(*args: str, check_clean: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "peft_rs.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check_clean:
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("peft-rs: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def peft_model(name: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(1)
    model = make_model(MLP).to(dtype)
    model.name_or_path = "example/mlp"
    # PEFT upcasts bf16/f16 adapters to f32 unless told not to.
    return get_peft_model(model, CONFIGS[name], autocast_adapter_dtype=False)


def save(model, path, safe: bool = True):
    # save_embedding_layers=False: no Hub lookup of the (made-up) base model name.
    model.save_pretrained(path, safe_serialization=safe, save_embedding_layers=False)
    return path


def file_tensors(path) -> dict[str, torch.Tensor]:
    if (path / "adapter_model.safetensors").is_file():
        return load_file(path / "adapter_model.safetensors")
    return torch.load(path / "adapter_model.bin", weights_only=True)


def peft_ranks(model) -> dict[str, int]:
    """Each adapted module's rank as PEFT's layer holds it."""
    return {
        name.removeprefix("base_model.model."): module.r["default"]
        for name, module in model.named_modules()
        if hasattr(module, "r") and isinstance(module.r, dict)
    }


# ------------------------------------------------------------------------------ inspect


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_inspect_json_matches_files_and_peft(tmp_path, name, safe):
    model = peft_model(name)
    path = save(model, tmp_path / name, safe)
    proc = cli("inspect", path, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)

    tensors = file_tensors(path)
    config = json.loads((path / "adapter_config.json").read_text())
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert report["weights_file"] == weights
    assert report["file_size"] == os.path.getsize(path / weights)
    assert report["peft_type"] == config["peft_type"]
    assert report["peft_version"] == config["peft_version"]
    assert report["base_model_name_or_path"] == config["base_model_name_or_path"] == "example/mlp"
    assert sorted(report["target_modules"]) == sorted(config["target_modules"])
    assert report["problems"] == []
    assert report["dtypes"] == ["float32"]
    assert report["trainable_parameters"] == model.get_nb_trainable_parameters()[0]
    assert report["total_parameters"] == sum(t.numel() for t in tensors.values())

    ranks = peft_ranks(model)
    assert {m["name"]: m["rank"] for m in report["modules"]} == ranks
    listed = {}
    for module in report["modules"]:
        for param, t in module["tensors"].items():
            listed[f"base_model.model.{module['name']}.{param}"] = t
    for t in report["other_tensors"]:
        listed[t["key"]] = {"dtype": t["dtype"], "shape": t["shape"]}
    assert set(listed) == set(tensors)
    for key, t in tensors.items():
        assert listed[key] == {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}, key


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_inspect_bf16(tmp_path, safe):
    path = save(peft_model("lora", torch.bfloat16), tmp_path / "a", safe)
    report = json.loads(cli("inspect", path, "--json").stdout)
    assert report["dtypes"] == ["bfloat16"]
    assert report["problems"] == []


def test_inspect_table(tmp_path):
    path = save(peft_model("lora-patterns"), tmp_path / "a")
    proc = cli("inspect", path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar or warning when stderr is not a terminal
    out = proc.stdout
    assert "LORA" in out and "problems (0)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  lin")}
    assert rows["lin0"][1] == "4" and rows["lin1"][1] == "2"


def test_inspect_reports_problems(tmp_path):
    path = save(peft_model("lora"), tmp_path / "a")
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.lin0.something_else"] = torch.zeros(2)
    save_file(tensors, path / "adapter_model.safetensors")
    proc = cli("inspect", path, "--json")
    assert proc.returncode == 1, proc.stderr  # problems found: status 1, report still printed
    problems = json.loads(proc.stdout)["problems"]
    assert any("unknown key base_model.model.lin0.something_else" in p for p in problems), problems
    assert any(p.startswith("does not load: unexpected tensor") for p in problems), problems


# ------------------------------------------------------------------------------ convert


def peft_outputs(path) -> torch.Tensor:
    torch.manual_seed(1)
    model = PeftModel.from_pretrained(make_model(MLP), path).eval()
    with torch.no_grad():
        return model(model_input(MLP))


@pytest.mark.parametrize("name", ["lora", "lora-modules-to-save", "vera"])
def test_convert_bin_to_safetensors_round_trip(tmp_path, name):
    src = save(peft_model(name), tmp_path / "bin", safe=False)
    proc = cli("convert", src, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "adapter_model.bin").exists()
    assert (out / "README.md").is_file()
    original, converted = file_tensors(src), load_file(out / "adapter_model.safetensors")
    assert set(converted) == set(original)
    for key, t in original.items():
        assert torch.equal(converted[key], t), key
    torch.testing.assert_close(peft_outputs(out), peft_outputs(src), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_convert_dtype_equals_torch_cast(tmp_path, dtype):
    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    src = save(peft_model("lora-modules-to-save"), tmp_path / "src", safe=False)
    original = file_tensors(src)
    # Values that exercise rounding: ties, overflow to inf, NaN and subnormals. (torch's own NaN bit
    # patterns differ between its scalar and vector paths, so NaN is compared as NaN.)
    original["base_model.model.lin0.lora_A.weight"][0, :5] = torch.tensor(
        [1 + 2**-8, 1 + 3 * 2**-8, 7e4, float("nan"), 1e-6]
    )
    torch.save(original, src / "adapter_model.bin")
    proc = cli("convert", src, "--out", tmp_path / "out", "--dtype", dtype)
    assert proc.returncode == 0, proc.stderr
    converted = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for key, t in original.items():
        want = t.to(torch_dtype)
        assert converted[key].dtype == torch_dtype, key
        nan = want.isnan()
        assert torch.equal(converted[key].isnan(), nan), key
        assert torch.equal(converted[key][~nan].view(torch.int16), want[~nan].view(torch.int16)), key

    # Back to f32 is exact, and PEFT loads both.
    proc = cli("convert", tmp_path / "out", "--out", tmp_path / "back", "--dtype", "f32")
    assert proc.returncode == 0, proc.stderr
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    for key, t in converted.items():
        assert back[key].dtype == torch.float32
        torch.testing.assert_close(back[key], t.float(), rtol=0, atol=0, equal_nan=True)
    report = json.loads(cli("inspect", tmp_path / "out", "--json").stdout)
    assert report["dtypes"] == [str(torch_dtype).removeprefix("torch.")]


def test_converted_bf16_adapter_loads_in_peft(tmp_path):
    src = save(peft_model("lora"), tmp_path / "src")
    assert cli("convert", src, "--out", tmp_path / "out", "--dtype", "bf16").returncode == 0
    # PEFT's model with its adapter weights rounded to bf16, as the file holds them.
    torch.manual_seed(1)
    expected = PeftModel.from_pretrained(make_model(MLP), src).eval()
    with torch.no_grad():
        for name, p in expected.named_parameters():
            if "lora_" in name:
                p.copy_(p.to(torch.bfloat16).float())
        want = expected(model_input(MLP))
    torch.testing.assert_close(peft_outputs(tmp_path / "out"), want, rtol=0, atol=0)


# ------------------------------------------------------------------------------ help and errors


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help(command):
    args = ["--help"] if command is None else [command, "--help"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: peft-rs{'' if command is None else ' ' + command}")


def test_console_script(tmp_path):
    proc = subprocess.run(["peft-rs", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "inspect" in proc.stdout


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_missing_directory(tmp_path, command):
    args = [command, tmp_path / "nope"] + (["--out", tmp_path / "out"] if command == "convert" else [])
    assert_one_line_error(cli(*args), "nope")


@pytest.mark.parametrize("corruption", ["truncated", "garbage-header", "garbage-bin"])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_corrupt_file(tmp_path, command, corruption):
    safe = corruption != "garbage-bin"
    path = save(peft_model("lora"), tmp_path / "a", safe)
    weights = path / ("adapter_model.safetensors" if safe else "adapter_model.bin")
    data = weights.read_bytes()
    if corruption == "truncated":
        weights.write_bytes(data[: len(data) - 50])
    elif corruption == "garbage-header":
        weights.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        weights.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    args = [command, path] + (["--out", tmp_path / "out"] if command == "convert" else [])
    assert_one_line_error(cli(*args), weights.name)


def test_malformed_config(tmp_path):
    path = save(peft_model("lora"), tmp_path / "a")
    (path / "adapter_config.json").write_text("{")
    assert_one_line_error(cli("inspect", path), "adapter_config.json")


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "DIR", "--out", "OUT", "--dtype", "f8"],
        ["convert", "DIR"],
        ["inspect"],
        ["combine", "DIR", "--out", "OUT"],
        ["merge", "BASE", "DIR", "--out", "OUT", "--dtype", "int4"],
        ["frobnicate"],
        [],
    ],
    ids=lambda a: "-".join(a) or "nothing",
)
def test_bad_arguments(tmp_path, args):
    args = [str(tmp_path / a) if a in ("DIR", "OUT", "BASE") else a for a in args]
    assert_one_line_error(cli(*args))


# ------------------------------------------------------------------------------ progress bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal():
    term, pipe = FakeTerminal(), io.StringIO()
    for stream in (term, pipe):
        bar = Progress("merge", stream=stream)
        bar(0, 2_000_000)
        bar(2_000_000, 2_000_000)
        bar.close()
    assert pipe.getvalue() == ""
    last = term.getvalue().split("\r")[-1]
    assert last.startswith("merge 100% [") and "2.0 MB/2.0 MB" in last and "/s ETA 00:00" in last
    assert term.getvalue().endswith("\n")


# ------------------------------------------------------------------------------ merge / combine


def test_merge_and_combine_pass_the_options(monkeypatch, capsys):
    """The wiring of the command line to the library functions, with stand-ins recording calls."""
    calls = []

    def merge_checkpoint(
        base_dir, adapter_dirs, out_dir, weights=None, dtype=None, resume=False, progress=None
    ):
        calls.append((base_dir, adapter_dirs, out_dir, weights, dtype, resume, progress))

    def combine_adapters(
        adapter_dirs, weights, out_dir, combination_type="svd", svd_rank=None, density=None, seed=0
    ):
        calls.append((adapter_dirs, weights, out_dir, combination_type, svd_rank, density))
        raise peft_rs.errors.ConfigError("density must be in (0, 1]")

    monkeypatch.setattr(peft_rs, "merge_checkpoint", merge_checkpoint, raising=False)
    monkeypatch.setattr(peft_rs, "combine_adapters", combine_adapters, raising=False)
    argv = ["merge", "B", "A1", "A2", "--out", "O", "--weights", "1", "0.5", "--dtype", "bf16", "--resume"]
    assert peft_rs_cli.main(argv) == 0
    assert calls.pop() == ("B", ["A1", "A2"], "O", [1.0, 0.5], "bfloat16", True, None)  # stderr no TTY
    assert (
        peft_rs_cli.main(["combine", "A1", "A2", "--weights", "1", "2", "--out", "O", "--density", "2"]) == 2
    )
    assert calls.pop() == (["A1", "A2"], [1.0, 2.0], "O", "svd", None, 2.0)  # the library's default
    assert capsys.readouterr().err.splitlines() == ["peft-rs: error: density must be in (0, 1]"]


def tiny_llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size="20KB")  # several shards and an index
    return model


def merged_checkpoint(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def test_merge_equals_peft_merge_and_unload(tmp_path):
    base = tiny_llama(tmp_path / "base")
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft = get_peft_model(base, config)
    peft.save_pretrained(tmp_path / "adapter")
    proc = cli("merge", tmp_path / "base", tmp_path / "adapter", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    expected = {k: v.detach() for k, v in peft.merge_and_unload().state_dict().items()}
    got = merged_checkpoint(tmp_path / "out")
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert (tmp_path / "out" / "config.json").is_file()


def test_merge_errors_are_one_line(tmp_path):
    tiny_llama(tmp_path / "base")
    args = ["merge", tmp_path / "base", tmp_path / "missing", "--out", tmp_path / "out"]
    assert_one_line_error(cli(*args), "missing")
    args = ["merge", tmp_path / "base", tmp_path, tmp_path, "--weights", "1", "--out", tmp_path / "o"]
    assert_one_line_error(cli(*args), "--weights")


@pytest.mark.parametrize("combination_type", ["cat", "linear"])
def test_combine_equals_peft_add_weighted_adapter(tmp_path, combination_type):
    torch.manual_seed(1)
    model = get_peft_model(make_model(MLP), CONFIGS["lora"], adapter_name="a")
    torch.manual_seed(2)
    model.add_adapter("b", CONFIGS["lora"])
    model.save_pretrained(tmp_path / "saved")  # non-default names: saved/a and saved/b
    weights = ["0.7", "-0.4"]
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "c", combination_type=combination_type)
    args = ["combine", tmp_path / "saved" / "a", tmp_path / "saved" / "b", "--weights", *weights]
    proc = cli(*args, "--combination-type", combination_type, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(model, adapter_name="c")
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
