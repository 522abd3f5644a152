"""Speed of every method against PEFT on one Linear(width, width) with bias, per width, dtype and
token count, in one run: the unmerged forward through peft_rs (torch tensors in and out, PEFT's
file loaded by peft_rs, the same weights) beside PEFT's layer, and merge+unmerge per method. A
"base" row per size times the plain linear layer: torch's F.linear (what PEFT's merged layer
costs) against peft_rs's layer with LoRA merged (its plain matmul path), and gives peft_rs's LoRA
unmerged ÷ merged time (project goal: ≤ 1.05 at ≥ 512 tokens).

Sides are timed in interleaved repetitions (A, B, A, B, ... so drift hits both; before each timed
call the same side runs untimed for at least 20 ms (one call or more), so that the other side's
worker threads have gone idle and this side's are awake, as in a loop of calls) until one side has
spent --budget seconds (3 to 30 repetitions); cells show the median and ± half the interquartile
range as % of the median. ratio = peft_rs / PEFT (< 1: peft_rs faster; project goal ≤ 0.9
everywhere). Every cell's outputs are compared before timing.

    python benches/bench_speed.py                  # widths 1024/4096 x f32/bf16/f16 x tokens 1/64/512/4096
    python benches/bench_speed.py --quick          # width 1024, tokens 1 and 512, f32
    python benches/bench_speed.py --widths 1024 --dtypes f32,bf16 --methods lora,oft --json out.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import peft
import torch
import torch.nn.functional as F
from bench_lora import One, cpu_info
from bench_methods import METHODS
from peft import PeftConfig, get_peft_model
from torch import nn

import peft_rs

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# Output agreement per dtype: |peft_rs - PEFT| <= atol + rtol * |PEFT| elementwise (assert_close's
# rule), atol = the given fraction of the PEFT output's RMS (the scale at which a sum of terms
# cancels). f32: summation order and OFT/BOFT's solves differ, ~1e-6 relative; 1e-4 / 1e-3 are
# bench_methods' bounds at unit scale. bf16 (8-bit mantissa, one rounding ≤ 2**-8 ≈ 3.9e-3
# relative): both keep the adapter in f32 but round at different points (peft_rs's LoHa/LoKr
# fold ΔW into the weight and round once; OFT/BOFT rotate in f32): a few roundings apart, 2e-2.
# f16 (11-bit mantissa) the same roundings, 8x finer.
TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2.5e-3, 2.5e-3)}
LORA = "LoRA r16"  # the adapter merged in the base rows
MIN_REPS, MAX_REPS = 3, 30
# Untimed calls of a side before each of its timed calls, at least one (see `timed`).
WARM_UP_S = 0.02
GOAL_RATIO, GOAL_UNMERGED = 0.9, 1.05
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")


class Built(NamedTuple):
    peft_layer: nn.Module
    adapter: peft_rs.PeftAdapter
    state_dict: dict[str, torch.Tensor]
    types: dict[str, str]
    f32_outputs: dict[int, torch.Tensor]  # the f32 PEFT layer's output per token count (bf16 only)


def installed(path: str) -> str:
    return datetime.datetime.fromtimestamp(os.path.getmtime(path)).astimezone().isoformat(timespec="seconds")


def build(config: PeftConfig, width: int, dtype: torch.dtype, xs: dict[int, torch.Tensor]) -> Built:
    """PEFT's layer and peft_rs's adapter with the same weights: the model is made in f32 with
    non-identity adapter weights, the adapter saved, and then the base is cast to `dtype` with the
    adapter weights in f32, as PEFT keeps them on a bf16 model (`autocast_adapter_dtype`) and as
    peft_rs does. For bf16, the f32 layer's outputs for `xs` are kept."""
    torch.manual_seed(0)
    model = One(width)
    state_dict = {k: v.detach().clone().to(dtype) for k, v in model.state_dict().items()}
    types = peft_rs.module_types(model)
    peft_model = get_peft_model(model, copy.deepcopy(config)).eval()
    layer = peft_model.base_model.model.lin
    f32_outputs = {}
    if dtype != torch.float32:
        f32_outputs = {tokens: layer(x.float()) for tokens, x in xs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        adapter = peft_rs.PeftAdapter.from_pretrained(tmp)
    f32_state = {name: t.detach().clone() for name, t in peft_model.state_dict().items()}
    peft_model.to(dtype)
    peft_model.base_model._cast_adapter_dtype("default", autocast_adapter_dtype=True)
    # The round trip through bf16 rounded the adapter's weights: give PEFT back the f32 values
    # peft_rs loaded (as a model made in bf16 with an f32 adapter has them).
    with torch.no_grad():
        for name, t in peft_model.state_dict().items():
            if t.dtype == torch.float32:
                t.copy_(f32_state[name])
    return Built(layer, adapter, state_dict, types, f32_outputs)


def timed(fns: Sequence[Callable[[], object]], budget_s: float) -> list[list[float]]:
    """Seconds per call of each of `fns`: one warm-up call each, then rounds of one call each
    (interleaved), at least MIN_REPS rounds, then until one side has spent `budget_s` or MAX_REPS."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    while True:
        for fn, side in zip(fns, times, strict=True):
            # Measured on these VMs: after a torch call, its OpenMP workers keep spinning for
            # several milliseconds (libgomp's GOMP_SPINCOUNT) and share the cores with whatever
            # runs next (a 64-token peft_rs call took 1.1 ms instead of 0.5 ms for ~20 ms); after
            # an idle pause instead, both sides' threads wake slowly and the next few calls run
            # cold (1 token: 0.21 ms, then 0.13, 0.09 ... 0.06). So each side first runs on its
            # own for WARM_UP_S, and the call timed is the next one, as in a loop of calls.
            end = time.perf_counter() + WARM_UP_S
            fn()
            while time.perf_counter() < end:
                fn()
            start = time.perf_counter()
            fn()
            side.append(time.perf_counter() - start)
        rounds = len(times[0])
        if rounds >= MAX_REPS or (rounds >= MIN_REPS and max(map(sum, times)) >= budget_s):
            return times


def summarize(times: list[float]) -> dict[str, Any]:
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {
        "median_ms": median * 1e3,
        "q1_ms": q1 * 1e3,
        "q3_ms": q3 * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "times_ms": [t * 1e3 for t in times],
    }


def fmt(side: dict[str, Any]) -> str:
    spread = (side["q3_ms"] - side["q1_ms"]) / 2 / side["median_ms"] * 100
    return f"{side['median_ms']:.3f} ±{spread:.0f}%"


def rms_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the RMS of b."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.pow(2).mean().sqrt()).item()


def check(ours: torch.Tensor, ref: torch.Tensor, f32_output: torch.Tensor | None) -> dict[str, Any]:
    """Whether peft_rs's output `ours` agrees with `ref` within TOLERANCE of ref's dtype (and has
    its dtype), how many elements do not, and the errors (max |Δ| / RMS) against it and, for bf16,
    of both against the f32 model's output."""
    if ours.shape != ref.shape:
        raise ValueError(f"peft_rs's output has shape {tuple(ours.shape)}, PEFT's {tuple(ref.shape)}")
    rtol, atol = TOLERANCE[ref.dtype]
    a, b = ours.float(), ref.float()
    within = (a - b).abs() <= atol * b.pow(2).mean().sqrt() + rtol * b.abs()
    over = int((~within).sum())  # NaNs count
    result = {
        "ok": ours.dtype == ref.dtype and over == 0,
        "dtype": str(ours.dtype).removeprefix("torch."),
        "over_tolerance": over,
        "elements": b.numel(),
        "max_err": rms_error(a, b),
    }
    if f32_output is not None:
        result["peft_rs_vs_f32_model"] = rms_error(a, f32_output)
        result["peft_vs_f32_model"] = rms_error(b, f32_output)
    return result


def merge_unmerge(layer: Any) -> None:
    layer.merge()
    layer.unmerge()


def row(*cells: object) -> None:
    print("| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |", flush=True)


def failed(record: dict[str, Any]) -> bool:
    return "error" in record or not record.get("check", {"ok": True})["ok"]


def compare(record: dict[str, Any], fns: Sequence[Callable[[], object]], budget: float) -> list[list[float]]:
    """Times `fns` (peft_rs's first, PEFT's second, any others after) into `record`, with the
    ratio of the first two; returns the timings of the others."""
    rs, ref, *others = timed(fns, budget)
    record["peft_rs"], record["peft"] = summarize(rs), summarize(ref)
    record["ratio"] = record["peft_rs"]["median_ms"] / record["peft"]["median_ms"]
    return others


def forward_row(record: dict[str, Any]) -> None:
    label = record["method"] + (" (MISMATCH)" if failed(record) else "")
    row(label, record["tokens"], fmt(record["peft_rs"]), fmt(record["peft"]), f"{record['ratio']:.2f}")


def mismatch(record: dict[str, Any]) -> str:
    c = record["check"]
    line = f"MISMATCH {record['method']}, {record['tokens']} tokens: output dtype {c['dtype']}, "
    line += f"{c['over_tolerance']} of {c['elements']} elements over the tolerance, "
    line += f"max |peft_rs - PEFT| = {c['max_err']:.2e} x RMS"
    if "peft_vs_f32_model" in c:
        line += (
            f"; vs the f32 model: peft_rs {c['peft_rs_vs_f32_model']:.2e}, PEFT {c['peft_vs_f32_model']:.2e}"
        )
    return line


def base_rows(where: dict[str, Any], xs: dict[int, torch.Tensor], budget: float) -> list[dict]:
    """Per token count: torch's F.linear with PEFT's merged weight against peft_rs's layer with the
    LoRA merged, and peft_rs's unmerged LoRA layer timed in the same rounds."""
    built = build(METHODS[LORA], where["width"], DTYPES[where["dtype"]], {})
    unmerged = built.adapter.layer("lin", built.state_dict, built.types)
    merged = built.adapter.layer("lin", built.state_dict, built.types)
    merged.merge()
    built.peft_layer.merge()
    base = built.peft_layer.get_base_layer()
    linear = partial(F.linear, weight=base.weight, bias=base.bias)
    records = []
    for tokens, x in xs.items():
        record = {"table": "base", "method": "base (linear)", **where, "tokens": tokens}
        record["check"] = check(merged.forward(x), linear(x), None)
        fns = [partial(merged.forward, x), partial(linear, x), partial(unmerged.forward, x)]
        [lora_unmerged] = compare(record, fns, budget)
        record["peft_rs_lora_unmerged"] = summarize(lora_unmerged)
        merged_ms = record["peft_rs"]["median_ms"]
        record["unmerged_over_merged"] = record["peft_rs_lora_unmerged"]["median_ms"] / merged_ms
        forward_row(record)
        records.append(record)
    return records


def method_rows(
    name: str, config: PeftConfig, where: dict[str, Any], xs: dict[int, torch.Tensor], budget: float
) -> list[dict]:
    """Forward records per token count (their rows printed) and one merge+unmerge record; a
    failure is recorded as the error and the method's next cell goes on."""
    try:
        built = build(config, where["width"], DTYPES[where["dtype"]], xs)
        ours = built.adapter.layer("lin", built.state_dict, built.types)
    except Exception as error:
        row(name, "", f"error: {error!r}", "", "")
        return [{"table": "forward", "method": name, **where, "error": repr(error)}]
    layer = built.peft_layer
    records = []
    for tokens, x in xs.items():
        record = {"table": "forward", "method": name, **where, "tokens": tokens}
        try:
            record["check"] = check(ours.forward(x), layer(x), built.f32_outputs.get(tokens))
            compare(record, [partial(ours.forward, x), partial(layer, x)], budget)
        except Exception as error:
            record["error"] = repr(error)
            row(name, tokens, f"error: {error!r}", "", "")
        else:
            forward_row(record)
        records.append(record)
    record = {"table": "merge", "method": name, **where}
    try:
        compare(record, [partial(merge_unmerge, ours), partial(merge_unmerge, layer)], budget)
    except Exception as error:
        record["error"] = repr(error)
    return [*records, record]


def section(
    width: int, dtype_name: str, tokens_list: list[int], methods: dict[str, PeftConfig], budget: float
) -> list[dict]:
    """The three tables of one width and dtype."""
    where = {"width": width, "dtype": dtype_name}
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[dtype_name]
    xs = {tokens: torch.randn(tokens, width, generator=generator).to(dtype) for tokens in tokens_list}
    print(f"\n## Linear({width}, {width}), {dtype_name}: unmerged forward\n")
    row("method", "tokens", "peft_rs ms (± spread)", "PEFT ms (± spread)", "ratio")
    print("|---|---:|---:|---:|---:|")
    records = base_rows(where, xs, budget)
    for name, config in methods.items():
        records += method_rows(name, config, where, xs, budget)
        gc.collect()
    print("\nbase (linear): peft_rs's layer with LoRA merged; PEFT column: torch F.linear (merged weight).")
    for r in records:
        if "check" in r and not r["check"]["ok"]:
            print(mismatch(r))
    print(f"\n## Linear({width}, {width}), {dtype_name}: merge + unmerge\n")
    row("method", "peft_rs ms (± spread)", "PEFT ms (± spread)", "ratio")
    print("|---|---:|---:|---:|")
    for r in records:
        if r["table"] == "merge" and "error" in r:
            row(r["method"], f"error: {r['error']}", "", "")
        elif r["table"] == "merge":
            row(r["method"], fmt(r["peft_rs"]), fmt(r["peft"]), f"{r['ratio']:.2f}")
    print(f"\n## Linear({width}, {width}), {dtype_name}: peft_rs LoRA unmerged ÷ merged\n")
    row("tokens", "unmerged ms (± spread)", "merged ms (± spread)", "unmerged ÷ merged")
    print("|---:|---:|---:|---:|")
    for r in records:
        if r["table"] == "base":
            ratio = f"{r['unmerged_over_merged']:.2f}"
            row(r["tokens"], fmt(r["peft_rs_lora_unmerged"]), fmt(r["peft_rs"]), ratio)
    return records


def summary(records: list[dict]) -> None:
    def where(r: dict) -> str:
        tokens = f", {r['tokens']} tokens" if "tokens" in r else ""
        kind = "merge+unmerge" if r["table"] == "merge" else "forward"
        return f"{r['method']} ({kind}, width {r['width']}, {r['dtype']}{tokens}): {r['ratio']:.2f}"

    ratios = [r for r in records if "ratio" in r]
    above = sorted((r for r in ratios if r["ratio"] > GOAL_RATIO), key=lambda r: -r["ratio"])
    if ratios:
        print(f"\nworst ratio: {where(max(ratios, key=lambda r: r['ratio']))}")
    print(f"cells above {GOAL_RATIO} (goal: <= {GOAL_RATIO}x PEFT everywhere): {len(above)} of {len(ratios)}")
    for r in above:
        print(f"- {where(r)}")
    goal = [r for r in records if r["table"] == "base" and r["tokens"] >= 512]
    if goal:
        w = max(goal, key=lambda r: r["unmerged_over_merged"])
        print(
            f"peft_rs LoRA unmerged ÷ merged at >= 512 tokens: worst {w['unmerged_over_merged']:.2f} "
            f"(width {w['width']}, {w['dtype']}, {w['tokens']} tokens; goal <= {GOAL_UNMERGED})"
        )
    print(f"errors or mismatches: {sum(map(failed, records))}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", default="1024,4096", help="comma-separated (default 1024,4096)")
    parser.add_argument("--tokens", default="1,64,512,4096", help="comma-separated (default 1,64,512,4096)")
    parser.add_argument("--dtypes", default="f32,bf16,f16", help="comma-separated, of f32, bf16 and f16")
    parser.add_argument("--methods", default="", help="comma-separated substrings of method names")
    parser.add_argument("--budget", type=float, default=0.4, help="seconds per side per cell (default 0.4)")
    parser.add_argument("--quick", action="store_true", help="width 1024, tokens 1 and 512, f32")
    parser.add_argument("--json", help="write every record (all timings) to this file")
    args = parser.parse_args()
    if args.quick:
        args.widths, args.tokens, args.dtypes = "1024", "1,512", "f32"
    widths = [int(w) for w in args.widths.split(",")]
    tokens_list = [int(t) for t in args.tokens.split(",")]
    dtype_names = args.dtypes.split(",")
    if unknown := set(dtype_names) - set(DTYPES):
        parser.error(f"unknown dtypes {sorted(unknown)}; choose from {list(DTYPES)}")
    wanted = [s.lower() for s in args.methods.split(",") if s]
    methods = {n: c for n, c in METHODS.items() if not wanted or any(s in n.lower() for s in wanted)}

    torch.set_num_threads(os.cpu_count() or 1)
    warnings.filterwarnings("ignore")  # PEFT warns on every IA³ unmerge
    cpu, flags = cpu_info(FLAGS)
    header = {
        "cpu": cpu,
        "flags": flags,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "all cores"),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "peft_rs": peft_rs.__version__,
        "peft_rs_installed": installed(peft_rs._core.__file__),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "budget_s": args.budget,
    }
    print("# peft_rs vs PEFT: unmerged forward and merge+unmerge on one Linear with bias\n")
    print(f"- CPU: {cpu}; flags: {' '.join(flags) or 'none of ' + ', '.join(FLAGS)}; {os.cpu_count()} cores")
    print(f"- threads: torch {header['torch_threads']}, peft_rs (rayon) {header['rayon_threads']}")
    print(f"- torch {torch.__version__}, peft {peft.__version__}, peft_rs {peft_rs.__version__}")
    print(f"- peft_rs's compiled module installed {header['peft_rs_installed']} (tells rebuilds apart)")
    print(f"- {header['date']}")
    print(
        f"- each cell: median of {MIN_REPS}-{MAX_REPS} interleaved repetitions (~{args.budget} s per side), "
        "± half the interquartile range as % of the median; ratio = peft_rs / PEFT (< 1: peft_rs faster)"
    )
    start = time.perf_counter()
    records = []
    with torch.no_grad():
        for width in widths:
            for dtype_name in dtype_names:
                records += section(width, dtype_name, tokens_list, methods, args.budget)
    summary(records)
    print(f"total time: {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"header": header, "records": records}, out, indent=1)


if __name__ == "__main__":
    main()
