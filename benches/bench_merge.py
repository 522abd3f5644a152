"""Merging a LoRA adapter into a large checkpoint on disk: `peft_rs.merge_checkpoint` (streams the
shards: memory-mapped in, merged tensor by tensor, written shard by shard) against PEFT (load the
model in bf16, `PeftModel.from_pretrained`, `merge_and_unload()`, `save_pretrained`) and against a
plain copy of the same shard files (the floor: the bytes have to be read and written anyway).

The checkpoint is a random bf16 Llama (hidden 2048, 20 layers, vocab 32000: about 2.3 GB) saved by
transformers in 500 MB shards, with a LoRA r16 adapter on q_proj/v_proj. Each case runs in its own
process; its time covers the work plus `os.sync()` (the written bytes reach the disk in all three;
imports and interpreter start are not counted), its peak memory is the process's VmHWM (which
counts touched pages of memory-mapped files) and, sampled, its peak anonymous memory. The input
shards were just written, so all three read them from the page cache (caches cannot be dropped
without root). Everything is written under a temporary directory and deleted at the end.

    python benches/bench_merge.py [--layers 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_lora import cpu_model

SHARD = "500MB"
LLAMA = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 2048,
}

WORKER = r"""
import json, os, shutil, sys, time
from pathlib import Path

case, base, adapter, out = sys.argv[1:5]
base, out = Path(base), Path(out)
if case == "peft_rs":
    import peft_rs
elif case == "peft":
    import torch, warnings
    from peft import PeftModel
    from transformers import LlamaForCausalLM
start = time.perf_counter()
if case == "peft_rs":
    peft_rs.merge_checkpoint(base, [adapter], out)
elif case == "peft":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out, max_shard_size=sys.argv[5])
else:
    out.mkdir()
    for f in sorted(base.glob("*.safetensors")):
        shutil.copyfile(f, out / f.name)
os.sync()
seconds = time.perf_counter() - start
# VmHWM is this process image's peak (ru_maxrss would carry the parent's over fork + exec).
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "rss_mb": peak_kb / 1024}))
"""


def make_checkpoint(tmp: Path, layers: int) -> tuple[Path, Path]:
    """A random bf16 Llama (weights filled in place: no slow initialisers) and a LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA, num_hidden_layers=layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    model.save_pretrained(tmp / "base", max_shard_size=SHARD)
    lora = LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(tmp / "adapter")
    return tmp / "base", tmp / "adapter"


def anon_kb(pid: int) -> int:
    """The process's anonymous resident memory (its heap: memory-mapped file pages excluded)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon"))


def measure(case: str, base: Path, adapter: Path, out: Path) -> dict:
    """Runs one case in its own process. VmHWM counts the pages of memory-mapped input files that
    were touched (clean page cache the kernel can drop), so the peak anonymous memory is sampled
    too, every 5 ms."""
    cmd = [sys.executable, "-c", WORKER, case, str(base), str(adapter), str(out), SHARD]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = 0
    while proc.poll() is None:
        try:
            peak_anon = max(peak_anon, anon_kb(proc.pid))
        except (OSError, StopIteration):  # exiting: /proc entry gone or emptied
            pass
        time.sleep(0.005)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{stderr}")
    shutil.rmtree(out)
    return {**json.loads(stdout.strip().splitlines()[-1]), "anon_mb": peak_anon / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        base, adapter = make_checkpoint(Path(tmp), args.layers)
        shards = sorted(base.glob("*.safetensors"))
        size_gb = sum(f.stat().st_size for f in shards) / 1e9
        print(f"# {cpu_model()}")
        print(
            f"# random bf16 Llama, hidden 2048, {args.layers} layers: {size_gb:.2f} GB in "
            f"{len(shards)} shards ({SHARD}); LoRA r16 on q_proj/v_proj; time includes os.sync()\n"
        )
        results = {
            case: measure(case, base, adapter, Path(tmp) / case) for case in ("copy", "peft_rs", "peft")
        }
        print(
            "| case | time (s) | peak RSS (MB) | RSS ÷ checkpoint | peak anon. RSS (MB) "
            "| time ÷ PEFT | time ÷ copy |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        names = {
            "peft_rs": "peft_rs.merge_checkpoint",
            "peft": "PEFT merge_and_unload",
            "copy": "copy shards",
        }
        for case in ("peft_rs", "peft", "copy"):
            r = results[case]
            print(
                f"| {names[case]} | {r['seconds']:.1f} | {r['rss_mb']:.0f} | "
                f"{r['rss_mb'] / (size_gb * 1e3):.2f} | {r['anon_mb']:.0f} | "
                f"{r['seconds'] / results['peft']['seconds']:.2f} | "
                f"{r['seconds'] / results['copy']['seconds']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
