"""LoRA forward through peft_rs (torch tensors in and out) vs PEFT's LoRA layer, same weights,
same machine, same threads. Prints a markdown table; ratio = peft_rs time / PEFT time (< 1 means
peft_rs is faster).

    python benches/bench_lora.py            # tokens 1/512/4096 x r 8/16/64, width 4096, f32, CPU
    python benches/bench_lora.py --quick    # a small subset
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_rs


class One(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)


def best_time(fn, *args, budget_s: float = 1.0, min_reps: int = 3) -> float:
    """The fastest of repeated calls of `fn(*args)` within about `budget_s` seconds."""
    fn(*args)  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return min(times)


def bench(tokens: int, width: int, r: int) -> dict[str, float]:
    torch.manual_seed(0)
    peft_model = get_peft_model(
        One(width), LoraConfig(target_modules=["lin"], r=r, lora_alpha=2 * r, init_lora_weights=False)
    ).eval()
    layer = peft_model.base_model.model.lin
    base = layer.get_base_layer()
    ours = peft_rs.AdaptedLayer(base.weight.detach(), base.bias.detach())
    ours.add_adapter(
        "default",
        peft_rs.LoraConfig(r=r, lora_alpha=2 * r),
        weights={
            "lora_A.weight": layer.lora_A["default"].weight.detach(),
            "lora_B.weight": layer.lora_B["default"].weight.detach(),
        },
    )
    x = torch.randn(tokens, width)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward(x), layer(x), rtol=1e-4, atol=1e-3)
        result = {
            "unmerged_rs": best_time(lambda: ours.forward(x)),
            "unmerged_peft": best_time(lambda: layer(x)),
        }
        ours.merge()
        layer.merge()
        torch.testing.assert_close(ours.forward(x), layer(x), rtol=1e-4, atol=1e-3)
        result["merged_rs"] = best_time(lambda: ours.forward(x))
        result["merged_peft"] = best_time(lambda: layer(x))
    return result


def cpu_info(flags: tuple[str, ...]) -> tuple[str, list[str]]:
    """The CPU's model name and which of `flags` it has."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine(), []
    present = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine()), [flag for flag in flags if flag in present]


def cpu_model() -> str:
    """The CPU's model name and the vector extensions that matter here (timings are only
    comparable as ratios measured in the same run)."""
    name, flags = cpu_info(("avx2", "fma", "avx512f", "avx512_bf16"))
    return f"{name} ({' '.join(flags) or 'no AVX2'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tokens 1/512, r 8/16 only")
    parser.add_argument("--width", type=int, default=4096)
    args = parser.parse_args()
    tokens_list = [1, 512] if args.quick else [1, 512, 4096]
    ranks = [8, 16] if args.quick else [8, 16, 64]
    print(
        f"# LoRA forward, width {args.width}, f32, CPU: {cpu_model()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), peft_rs {peft_rs.__version__}\n"
    )
    columns = ["tokens", "r", "unmerged peft_rs (ms)", "unmerged PEFT (ms)", "ratio"]
    columns += ["merged peft_rs (ms)", "merged PEFT (ms)", "ratio"]
    print("| " + " | ".join(columns) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in tokens_list:
        for r in ranks:
            t = bench(tokens, args.width, r)
            ms = {k: v * 1e3 for k, v in t.items()}
            row = [tokens, r]
            for mode in ("unmerged", "merged"):
                rs, ref = ms[f"{mode}_rs"], ms[f"{mode}_peft"]
                row += [f"{rs:.3f}", f"{ref:.3f}", f"{rs / ref:.2f}"]
            print("| " + " | ".join(map(str, row)) + " |", flush=True)


if __name__ == "__main__":
    main()
