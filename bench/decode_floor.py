"""What an unmerged LoRA decode step cannot avoid: each half of the adapter alone, in the model.

    python bench/decode_floor.py --threads 1                        # hidden-64 x 2 llama
    python bench/decode_floor.py --threads 1 --decode-shape 1024x4  # the hidden-1024 one

Issue 14 asks for a decode overhead (LoRA r=16 on q and v, unmerged) of at most a quarter of
peft's. Whatever the code, an unmerged adapter must read `A` and `B` and run a shrink and an
expand per adapted layer each step. This script measures what those cost inside the model, in
the same paired rounds as the base model and peft's (`lora_overhead.tiny_decode`'s method:
thread CPU time, rotated order, fresh model copies sharing the base weights). Each variant
replaces the adapted layers' single-row forward (`surgeon.runtime.single_row`) by a part of it:

    wrapper only  the base `linear` alone, as `nn.Linear` calls it (what wrapping costs)
    base only     the base `mv` alone (what the wrapper and the row dispatch cost)
    shrink only   plus `mv(A, x)` (its result dropped)
    expand only   plus `out.addmv_(B, u)` on a fixed `u`
    adapter       the real row form (both; the only variant whose output is right)

`shrink only + expand only - base only` is the floor of any unmerged implementation with the
same two products; printed as a fraction of peft's overhead. The variants other than `adapter`
compute wrong outputs on purpose: they exist to time their calls, nothing reads their results.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Timing, cpu_timer, paired_ratios
from lora_overhead import CASES, SIDES, Shape, adapt, llama, randomize_like


def _weights(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = layer._modules["lora_A"]._modules["default"]._parameters["weight"]
    b = layer._modules["lora_B"]._modules["default"]._parameters["weight"]
    return layer._modules["base_layer"]._parameters["weight"], a, b


def _wrapper_only(layer, x):
    w, _, _ = _weights(layer)
    return torch._C._nn.linear(x, w, None)


def _base_only(layer, x):
    w, _, _ = _weights(layer)
    return torch.mv(w, x.view(-1)).view(1, 1, -1)


def _shrink_only(layer, x):
    w, a, _ = _weights(layer)
    flat = x.view(-1)
    torch.mv(a, flat)
    return torch.mv(w, flat).view(1, 1, -1)


def _expand_only(layer, x):
    w, _, b = _weights(layer)
    out = torch.mv(w, x.view(-1))
    out.addmv_(b, layer.__dict__["_fixed_u"], alpha=2.0)
    return out.view(1, 1, -1)


VARIANTS = {"wrapper only": _wrapper_only, "base only": _base_only, "shrink only": _shrink_only, "expand only": _expand_only,
            "adapter": None}


def _install(model, run) -> None:
    """Build each adapted layer's row form (one decode step), then swap in `run` if given."""
    from surgeon.runtime.adapted import AdaptedLayer

    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    with torch.no_grad():
        for layer in layers:
            layer(torch.zeros(1, 1, layer.base_layer.in_features))
            assert layer._row_shape is not None, "no single-row form: nothing to measure"
            if run is not None:
                layer.__dict__["_fixed_u"] = torch.ones(layer.lora_A["default"].weight.shape[0])
                layer.__dict__["_run_row"] = run


def measure(hidden: int, layers: int, rounds: int, copies: int) -> dict:
    device = torch.device("cpu")
    original, case = llama(Shape(hidden, layers, (1, 1), (1, 1)), device), CASES[0]
    ids = torch.randint(0, 2048, (1, 1), device=device)
    per_copy, agree = [], 0.0
    for _ in range(copies):
        base = copy.deepcopy(original)
        models = {side: adapt(side, base, case, share_weights=True)[0] for side in SIDES}
        agree = max(agree, randomize_like(models["surgeon"], models["peft"]))
        variants = {"peft": models["peft"]}
        for name, run in VARIANTS.items():
            model = models["surgeon"] if run is None else adapt("surgeon", base, case, True)[0]
            if run is not None:
                model.load_state_dict(models["surgeon"].state_dict())
            _install(model, run)
            variants[name] = model
        with torch.no_grad():  # the row form (the real one) against peft, on the decode step
            agree = max(agree, (variants["adapter"](ids).logits - models["peft"](ids).logits).abs().max().item())
            fns = {"base": lambda b=base: b(ids)} | {n: (lambda m=m: m(ids)) for n, m in variants.items()}
            per_copy.append(paired_ratios(fns, "base", device, Timing(rounds, 10 if hidden <= 256 else 2, 3),
                                          cpu_timer(device)))
    overhead = {name: statistics.median(c[name] for c in per_copy) for name in ("peft", *VARIANTS)}
    base_s = statistics.median(c["min_s"]["base"] for c in per_copy)
    floor = overhead["shrink only"] + overhead["expand only"] - overhead["base only"]
    return {"hidden": hidden, "layers": layers, "rounds": rounds, "copies": copies,
            "base_ms": base_s * 1e3, "overhead": overhead, "floor": floor, "max_abs_diff": agree,
            "floor_over_peft": floor / overhead["peft"],
            "adapter_over_peft": overhead["adapter"] / overhead["peft"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--decode-shape", default="64x2", help="HIDDENxLAYERS")
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny run (tests)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden, layers = (int(v) for v in args.decode_shape.split("x"))
    rounds, copies = (3, 1) if args.smoke else (args.rounds, args.copies)
    result = measure(hidden, layers, rounds, copies)
    sites = 2 * layers
    print(f"llama hidden {hidden} x {layers}, LoRA q,v r=16 ({sites} adapted layers), base step "
          f"{result['base_ms']:.2f} ms; overhead over the base (median of {rounds} paired rounds, "
          f"{copies} copies):")
    for name, value in result["overhead"].items():
        per_site = value * result["base_ms"] * 1e3 / sites
        print(f"  {name:<12} {value:+7.2%}  ({per_site:5.1f} us per adapted layer, "
              f"{value / result['overhead']['peft']:.2f}x peft's)")
    print(f"floor (shrink + expand - base only): {result['floor']:+.2%} = "
          f"{result['floor_over_peft']:.2f}x peft's overhead; the row form: "
          f"{result['adapter_over_peft']:.2f}x (max|diff| against peft {result['max_abs_diff']:.1e})")
    print(json.dumps({"bench": "decode_floor", "threads": torch.get_num_threads(), **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
