"""Graph scope (`surgeon.compile`) against site scope and peft: LoRA on q, k, v, gate, up.

    python bench/fusion.py --threads 1        # hidden-64 x 2 and hidden-256 x 4 llamas
    python bench/fusion.py --smoke            # seconds: checks the script end to end
    python bench/fusion.py --threads 1 --inductor   # base and both scopes under torch.compile

Three deep copies of one llama get identical random LoRA weights (r=16, alpha=32) on q_proj,
k_proj, v_proj, gate_proj and up_proj: surgeon's site scope (every layer its own shrink), the
same after `surgeon.compile` (q, k, v share one shrink GEMM over the concatenated A's, gate and
up another), and peft 0.21. Each forward runs under `torch.no_grad()` in eval mode: decode (a
1x1 token batch, as lora_overhead.py's) and prefill (1x128), interleaved with the base model in
paired rounds (`harness.paired_ratios`). Printed: each side's overhead over the base model
(median of per-round ratios), compiled/site and compiled/peft (of those overheads; below 1 =
the compiled model's adapters cost less), the whole forward's fastest round compiled/site
("time c/s"), the base model's fastest round in ms, and the max |difference| of the logits
against peft; then (eager only) one block's q, k, v calls alone over three bare nn.Linear
calls, the shared GEMM against its bookkeeping without the rest of the model. One JSON line follows. Tests never assert timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Timing, paired_ratios
from lora_overhead import Shape, llama

TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]


def adapt_three(base):
    """(site scope, graph scope, peft): equal random adapter weights on TARGETS."""
    from peft import LoraConfig, get_peft_model

    import surgeon
    from surgeon.api import apply

    site = apply(f"adapter default = lora(r=16, alpha=32) {{ target {', '.join(TARGETS)} }}",
                 copy.deepcopy(base))
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    theirs = dict(peft.base_model.model.named_parameters())
    with torch.no_grad():
        for name, p in site.named_parameters():
            if "lora_" in name:
                value = torch.randn(p.shape, generator=gen) * 0.02
                p.copy_(value)
                theirs[name].copy_(value)
    fused = surgeon.compile(copy.deepcopy(site))
    assert len(surgeon.fusion.groups(fused)) == 2 * len(base.model.layers)
    return site.eval(), fused.eval(), peft.eval()


def measure(shape: Shape, timing: Timing, inductor: bool = False) -> dict:
    base = llama(shape, torch.device("cpu"))
    site, fused, peft = adapt_three(base)
    if inductor:  # the base and both scopes under torch.compile (peft stays eager)
        torch._dynamo.reset()
        base, site, fused = torch.compile(base), torch.compile(site), torch.compile(fused)
    out: dict = {"hidden": shape.hidden, "layers": shape.layers}
    gen = torch.Generator().manual_seed(0)
    for phase, size in (("decode", shape.prefill[:1] + (1,)), ("prefill", shape.prefill)):
        ids = torch.randint(0, 2048, size, generator=gen)
        with torch.no_grad():
            expected = peft(ids).logits
            diff = {name: (m(ids).logits - expected).abs().max().item()
                    for name, m in (("site", site), ("compiled", fused))}
            fns = {name: (lambda m=m, ids=ids: m(ids))
                   for name, m in (("base", base), ("site", site), ("compiled", fused), ("peft", peft))}
            over = paired_ratios(fns, "base", torch.device("cpu"), timing)
        out[phase] = {"tokens": list(size), "overhead": {k: over[k] for k in ("site", "compiled", "peft")},
                      "min_ms": {k: v * 1e3 for k, v in over["min_s"].items()},
                      "compiled_over_site": _ratio(over["compiled"], over["site"]),
                      "time_compiled_over_site": over["min_s"]["compiled"] / over["min_s"]["site"],
                      "compiled_over_peft": _ratio(over["compiled"], over["peft"]),
                      "max_abs_diff_vs_peft": diff}
        if not inductor:
            out[phase]["qkv_us"] = group_us(site, fused, shape, size[1], timing)
    return out


def group_us(site, fused, shape: Shape, tokens: int, timing: Timing) -> dict:
    """One block's q, k, v calls on one tensor, site scope and fused, over three bare
    nn.Linear calls (fastest round, us): the shared GEMM against its bookkeeping, without the
    rest of the model."""
    def qkv(model):
        attn = model.model.layers[0].self_attn
        return attn.q_proj, attn.k_proj, attn.v_proj

    x = torch.randn(1, tokens, shape.hidden)
    (sq, sk, sv), (fq, fk, fv) = qkv(site), qkv(fused)
    linear = sq.base_layer
    fns = {"linear": lambda: (linear(x), linear(x), linear(x)),
           "site": lambda: (sq(x), sk(x), sv(x)), "compiled": lambda: (fq(x), fk(x), fv(x))}
    with torch.no_grad():
        best = paired_ratios(fns, "linear", torch.device("cpu"),
                             Timing(timing.repeats, 10 * timing.inner, timing.warmup))
    return {k: v * 1e6 for k, v in best["min_s"].items()}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=21, help="paired rounds per measurement")
    parser.add_argument("--inductor", action="store_true",
                        help="site scope and compiled model each under torch.compile (inductor)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.smoke:
        shapes, timing = [Shape(64, 2, (1, 8), (1, 8))], Timing(1, 1, 0)
    else:
        shapes = [Shape(64, 2, (1, 128), (1, 128)), Shape(256, 4, (1, 128), (1, 128))]
        timing = Timing(args.rounds, 10, 3)
    results = [measure(shape, timing, args.inductor) for shape in shapes]
    print(f"{'llama':<9}{'phase':<9}{'base ms':>9}{'site':>9}{'compiled':>10}{'peft':>9}"
          f"{'compiled/site':>15}{'compiled/peft':>15}{'time c/s':>10}{'max|diff| site, compiled':>26}")
    for r in results:
        for phase in ("decode", "prefill"):
            p = r[phase]
            o = p["overhead"]
            d = p["max_abs_diff_vs_peft"]
            model = f"h{r['hidden']} x {r['layers']}"
            print(f"{model:<9}{phase:<9}{p['min_ms']['base']:>9.2f}"
                  f"{o['site']:>+9.1%}{o['compiled']:>+10.1%}{o['peft']:>+9.1%}"
                  f"{p['compiled_over_site']:>14.2f}x{p['compiled_over_peft']:>14.2f}x"
                  f"{p['time_compiled_over_site']:>9.2f}x"
                  f"{d['site']:>13.1e}{d['compiled']:>13.1e}")
    if not args.inductor:
        print("one block's q, k, v calls over three bare nn.Linear calls, fastest round (us):")
        for r in results:
            for phase in ("decode", "prefill"):
                us = r[phase]["qkv_us"]
                print(f"  h{r['hidden']} {phase:<8} linear x3 {us['linear']:8.1f}   site "
                      f"+{us['site'] - us['linear']:7.1f}   compiled +{us['compiled'] - us['linear']:7.1f}")
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "smoke": args.smoke, "inductor": args.inductor}
    print(json.dumps({"bench": "fusion", **meta, "results": results}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
