"""Mixed-adapter batches (`adapter_names=`, one adapter per row), surgeon vs peft, one process.

    python bench/mixed_batch.py                  # 16 adapters x 32 rows, tiny and wider llama
    python bench/mixed_batch.py --smoke          # seconds: checks the script end to end
    python bench/mixed_batch.py --threads 1

Both libraries adapt deep copies of one llama with the same N LoRA adapters on q, v (r=16,
identical random weights, PEFT's in-memory names), then run `model(ids, adapter_names=names)`
with row i using adapter i mod N, under `torch.no_grad()` in eval mode, interleaved with the
base model and a single-adapter forward of the same batch. Printed: milliseconds per forward,
surgeon's throughput over peft's (above 1 means surgeon is faster), peft's time over the base
model divided by surgeon's (the adapters' own cost), the extra peak memory of one mixed forward
(resident memory, median of alternated calls: harness.peak_memories), and the max |difference| of
the logits (surgeon gathers all adapters into one batched matmul per layer, peft loops over
them); then one q_proj's mixed call alone, in us over its bare nn.Linear (fastest of the paired
rounds): the gather-matmul against peft's loop without routing or the base model. One JSON line
follows. Tests never assert timings.
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
from harness import Timing, interleaved, paired_ratios, peak_memories, rss_unavailable
from lora_overhead import SIDES, Shape, llama


def adapt_both(base, n: int):
    """(surgeon model, peft model) with adapters a0..a{n-1} on q, v and equal random weights."""
    from peft import LoraConfig, get_peft_model

    from surgeon.api import apply
    from surgeon.lang import load_spec

    names = [f"a{i}" for i in range(n)]
    spec = "\n".join(f"adapter {a} = lora(r=16, alpha=32) {{ target q_proj, v_proj }}" for a in names)
    ours_model = copy.deepcopy(base)
    apply(load_spec(spec), ours_model)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    theirs = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for a in names[1:]:
        theirs.add_adapter(a, config)
    gen = torch.Generator().manual_seed(1)
    peft_params = dict(theirs.base_model.model.named_parameters())
    with torch.no_grad():
        for name, p in ours_model.named_parameters():
            if "lora_" in name:
                value = torch.randn(p.shape, generator=gen).to(p) * 0.05
                p.copy_(value)
                peft_params[name].copy_(value)
    return ours_model.eval(), theirs.eval(), names


def measure(shape: Shape, n: int, rows: int, seq: int, timing: Timing) -> dict:
    base = llama(shape, torch.device("cpu"))
    ours, theirs, names = adapt_both(base, n)
    ids = torch.randint(0, 2048, (rows, seq), generator=torch.Generator().manual_seed(0))
    per_row = [names[i % n] for i in range(rows)]
    with torch.no_grad():
        diff = (ours(ids, adapter_names=per_row).logits
                - theirs(ids, adapter_names=per_row).logits).abs().max().item()
        seconds = interleaved({
            "base": lambda: base(ids),
            "surgeon": lambda: ours(ids, adapter_names=per_row),
            "peft": lambda: theirs(ids, adapter_names=per_row),
            "surgeon_one": lambda: ours(ids),
            "peft_one": lambda: theirs(ids),
        }, torch.device("cpu"), timing)
        us = layer_us(ours, theirs, per_row, seq, shape.hidden, timing)
        peak = peak_memories({"base": lambda: base(ids), "surgeon": lambda: ours(ids, adapter_names=per_row),
                              "peft": lambda: theirs(ids, adapter_names=per_row)},
                             torch.device("cpu"), timing.repeats)
    ms = {k: v * 1e3 for k, v in seconds.items()}
    return {"hidden": shape.hidden, "layers": shape.layers, "adapters": n, "rows": rows,
            "seq": seq, "ms": ms, "throughput_vs_peft": ms["peft"] / ms["surgeon"],
            # the adapters' share: peft's time over the base, divided by surgeon's
            "overhead_vs_peft": ((ms["peft"] - ms["base"]) / (ms["surgeon"] - ms["base"])
                                 if ms["surgeon"] > ms["base"] else float("inf")),
            "single_adapter_vs_peft": ms["peft_one"] / ms["surgeon_one"], "max_abs_diff": diff,
            "q_proj_us": us, "peak_mib": peak}


def layer_us(ours, theirs, per_row: list[str], seq: int, hidden: int, timing: Timing) -> dict:
    """One q_proj's mixed call over its bare nn.Linear, fastest round in us (no routing, no base
    model: the gather-matmul against peft's loop alone)."""
    from surgeon.runtime.adapted import AdaptedLayer

    layer = next(m for m in ours.modules() if isinstance(m, AdaptedLayer))
    peft_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(len(per_row), seq, hidden)
    fns = {"linear": lambda: layer.base_layer(x), "surgeon": lambda: layer(x, adapter_names=per_row),
           "peft": lambda: peft_layer(x, adapter_names=per_row)}
    best = paired_ratios(fns, "linear", torch.device("cpu"), Timing(timing.repeats, 10 * timing.inner, 2))
    return {k: v * 1e6 for k, v in best["min_s"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default: 1 and 16)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tiny, wide = Shape(64, 2, (1, 1), (1, 1)), Shape(256, 4, (1, 1), (1, 1))
    if args.smoke:
        runs, timing, n, rows = [(tiny, 4)], Timing(1, 1, 0), 3, 4
    else:
        # a decode step of 32 served requests (seq 1) is the multi-LoRA serving case
        seqs = (args.seq,) if args.seq else (1, 16)
        runs = [(tiny, q) for q in seqs] + [(wide, q) for q in seqs[:1]]
        timing, n, rows = Timing(9, 3, 2), args.adapters, args.rows
    results = [measure(shape, n, rows, seq, timing) for shape, seq in runs]
    print(f"{'llama':<10}{'adapters x rows':>18}{'base ms':>9}{'surgeon ms':>12}{'peft ms':>9}"
          f"{'throughput s/p':>16}{'overhead p/s':>14}{'max|diff|':>11}{'q_proj over Linear us s/p':>27}{'peak MiB s/p':>16}")
    for r in results:
        ms = r["ms"]
        model = f"h{r['hidden']} x {r['layers']}"
        batch = f"{r['adapters']} x {r['rows']} (seq {r['seq']})"
        us = r["q_proj_us"]
        layer = f"{us['surgeon'] - us['linear']:.0f} / {us['peft'] - us['linear']:.0f}"
        peak = " / ".join("n/a" if r["peak_mib"][k] is None else f"{r['peak_mib'][k]:.1f}" for k in SIDES)
        print(f"{model:<10}{batch:>18}"
              f"{ms['base']:>9.2f}{ms['surgeon']:>12.2f}{ms['peft']:>9.2f}"
              f"{r['throughput_vs_peft']:>15.2f}x{r['overhead_vs_peft']:>13.2f}x"
              f"{r['max_abs_diff']:>11.1e}{layer:>27}{peak:>16}")
    memory = rss_unavailable() or "resident (VmHWM)"
    print(f"# peak MiB: extra peak memory of one mixed forward, {memory}")
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "smoke": args.smoke, "peak_memory": memory}
    print(json.dumps({"bench": "mixed_batch", **meta, "results": results}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
