"""Every implemented method on one Linear layer: forward (unmerged) and merge+unmerge time through
peft_rs (torch tensors in and out) vs PEFT's layer, same weights (PEFT's file loaded by peft_rs),
same machine. ratio = peft_rs / PEFT (< 1: peft_rs faster).

    python benches/bench_methods.py [--width 1024] [--tokens 512]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
from bench_lora import One, best_time, cpu_model
from peft import (
    AdaLoraConfig,
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

METHODS = {
    "LoRA r16": LoraConfig(target_modules=["lin"], r=16, init_lora_weights=False),
    "DoRA r16": LoraConfig(target_modules=["lin"], r=16, use_dora=True, init_lora_weights=False),
    "AdaLoRA r12": AdaLoraConfig(target_modules=["lin"], init_r=12, total_step=10, init_lora_weights=False),
    "IA3 (output)": IA3Config(target_modules=["lin"], feedforward_modules=[], init_ia3_weights=False),
    "IA3 (feed-forward)": IA3Config(
        target_modules=["lin"], feedforward_modules=["lin"], init_ia3_weights=False
    ),
    "VeRA r256": VeraConfig(target_modules=["lin"], r=256, init_weights=False),
    "LoHa r8": LoHaConfig(target_modules=["lin"], r=8, init_weights=False),
    "LoKr r8": LoKrConfig(target_modules=["lin"], r=8, init_weights=False),
    "OFT block 32": OFTConfig(target_modules=["lin"], r=0, oft_block_size=32, init_weights=False),
    "BOFT block 8": BOFTConfig(target_modules=["lin"], boft_block_size=8, init_weights=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    print(
        f"# Methods on one Linear({args.width}, {args.width}), {args.tokens} tokens, f32, {cpu_model()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)\n"
    )
    columns = ["method", "forward peft_rs (ms)", "forward PEFT (ms)", "ratio"]
    columns += ["merge+unmerge peft_rs (ms)", "merge+unmerge PEFT (ms)", "ratio"]
    print("| " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(columns) - 1))
    x = torch.randn(args.tokens, args.width, generator=torch.Generator().manual_seed(0))
    warnings.filterwarnings("ignore")  # PEFT warns on every IA³ unmerge
    for name, config in METHODS.items():
        torch.manual_seed(0)
        model = One(args.width)
        state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
        types = peft_rs.module_types(model)
        peft_model = get_peft_model(model, config).eval()
        layer = peft_model.base_model.model.lin
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(tmp)
            ours = peft_rs.PeftAdapter.from_pretrained(tmp).layer("lin", state_dict, types)
        with torch.no_grad():
            torch.testing.assert_close(ours.forward(x), layer(x), rtol=1e-4, atol=1e-3)

            def merge_unmerge_rs(layer=ours):
                layer.merge()
                layer.unmerge()

            def merge_unmerge_peft(layer=layer):
                layer.merge()
                layer.unmerge()

            t = {
                "fwd_rs": best_time(ours.forward, x),
                "fwd_peft": best_time(layer, x),
                "merge_rs": best_time(merge_unmerge_rs),
                "merge_peft": best_time(merge_unmerge_peft),
            }
        row = [name]
        for mode in ("fwd", "merge"):
            rs, ref = t[f"{mode}_rs"] * 1e3, t[f"{mode}_peft"] * 1e3
            row += [f"{rs:.3f}", f"{ref:.3f}", f"{rs / ref:.2f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
