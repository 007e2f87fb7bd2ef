"""The Triton kernels (surgeon/kernels/) against their torch references and peft's layers.

    python bench/triton_kernels.py --device cuda     # on a GPU: kernel, reference, peft; ratios
    python bench/triton_kernels.py --smoke           # CPU: the references and peft only (no kernels)

Per shape (tokens, hidden, rank) it times, in alternation:
    lora      one adapted Linear's LoRA branch added to the base output: the fused kernel
              (`kernels.lora_add`), its torch reference (three ops), peft's Linear.forward
              minus nothing (peft's whole layer, base included, so the base GEMM is timed
              separately and subtracted from both sides)
    gathered  16 adapters, one per row: the BGMV kernel, the reference (bmm), peft's loop
    dora      DoRA's weight norm: the one-pass kernel vs the reference (builds W + sBA)
and prints milliseconds and kernel/reference, kernel/peft ratios, plus one JSON line.
Tests never assert timings; the kernels' correctness is tests/kernels/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Timing, interleaved

from surgeon import kernels
from surgeon.kernels import reference


def lora_case(tokens: int, hidden: int, r: int, device: torch.device, dtype: torch.dtype) -> dict:
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(hidden, hidden)).to(device, dtype)
    pm = get_peft_model(base, LoraConfig(target_modules=["0"], r=r, lora_alpha=2 * r))
    layer = pm.base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    prev = layer.base_layer(x)
    fns = {"reference": lambda: reference.lora_add(prev, x, a, b, 2.0),
           "peft": lambda: layer(x), "base": lambda: layer.base_layer(x)}
    if device.type == "cuda":
        fns["kernel"] = lambda: kernels.lora_add(prev, x, a, b, 2.0)
    return fns


def gathered_case(tokens: int, hidden: int, r: int, device: torch.device, dtype: torch.dtype) -> dict:
    n = 16
    a_t = torch.randn(n + 1, hidden, r, device=device, dtype=dtype)
    b_t = torch.randn(n + 1, r, hidden, device=device, dtype=dtype)
    slots = torch.arange(32, device=device) % n
    x = torch.randn(32, tokens, hidden, device=device, dtype=dtype)
    prev = torch.randn(32, tokens, hidden, device=device, dtype=dtype)

    def loop():  # peft's `_mixed_batch_forward`: per adapter, index, two GEMMs, indexed add
        out = prev.clone()
        for i in range(n):
            rows = (slots == i).nonzero().view(-1)
            out[rows] += (x[rows] @ a_t[i]) @ b_t[i]
        return out

    fns = {"reference": lambda: reference.gathered_add(prev, x, slots, a_t, b_t), "peft": loop}
    if device.type == "cuda":
        fns["kernel"] = lambda: kernels.gathered_add(prev, x, slots, a_t, b_t)
    return fns


def dora_case(tokens: int, hidden: int, r: int, device: torch.device, dtype: torch.dtype) -> dict:
    w = torch.randn(hidden, hidden, device=device, dtype=dtype)
    a, b = torch.randn(r, hidden, device=device, dtype=dtype), torch.randn(hidden, r, device=device, dtype=dtype)
    fns = {"reference": lambda: reference.dora_norm(w, a, b, 0.5)}
    if device.type == "cuda":
        fns["kernel"] = lambda: kernels.dora_norm(w, a, b, 0.5)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(1, 64, 8)] if args.smoke else [(1, 1024, 16), (16, 1024, 16), (512, 4096, 16), (1, 4096, 64)]
    timing = Timing(repeats=2, inner=1, warmup=1) if args.smoke else Timing(repeats=9, inner=20, warmup=3)
    rows = {}
    with torch.no_grad():
        for tokens, hidden, r in shapes:
            for name, build in (("lora", lora_case), ("gathered", gathered_case), ("dora", dora_case)):
                times = interleaved(build(tokens, hidden, r, device, dtype), device, timing)
                rows[f"{name} t{tokens} h{hidden} r{r}"] = times
    print(f"{'case':<26}" + "".join(f"{k:>12}" for k in ("kernel ms", "ref ms", "peft ms", "k/ref", "k/peft")))
    for case, t in rows.items():
        base = t.get("base", 0.0)
        kernel, ref, peft = t.get("kernel"), t["reference"], t.get("peft")
        peft_branch = None if peft is None else peft - base  # peft's layer includes the base GEMM
        cells = [kernel, ref, peft_branch]
        ratios = [kernel / ref if kernel else None, kernel / peft_branch if kernel and peft_branch else None]
        print(f"{case:<26}" + "".join(f"{c * 1e3:>12.4f}" if c else f"{'-':>12}" for c in cells)
              + "".join(f"{q:>12.2f}" if q else f"{'-':>12}" for q in ratios))
    print(json.dumps({"device": str(device), "dtype": str(dtype), "rows": rows}))


if __name__ == "__main__":
    main()
