"""Forward and training-step time of each method, surgeon vs peft, on the same model.

    python bench/methods.py                 # the full run (a few minutes on CPU)
    python bench/methods.py --device cuda   # on a GPU
    python bench/methods.py --smoke         # seconds: checks the harness end to end

For each method (LoRA as the reference, LoHa, LoKr, AdaLoRA; IA3 when its runtime is there) both
libraries adapt deep copies of one base model with the same PEFT config and get identical
random adapter weights (PEFT's state dict loaded into surgeon's model). Measured, interleaving
surgeon and peft runs and taking medians:

    forward   eval forward of a prefill batch, no grad
    train     forward + backward + AdamW step on a training batch

on all linear layers of a llama, and for LoHa/LoKr also on the convolutions of a small conv
net. It prints, per case, seconds per call and ratios: surgeon / peft (below 1: surgeon is
faster), and each side's training step over its own LoRA's (PEFT's LyCORIS paper figures are
LoHa +48%, LoKr +37% training time over LoRA). One JSON line at the end. Tests never assert
timings.

    python bench/methods.py --paired --only "lora r8" "dora r8" "loha r8" "lokr r8"
    python bench/methods.py --paired --hidden 1024 --only ...   # a wider llama

`--paired` measures each case's training step (DoRA's too) in the same rounds as its model's
LoRA step, per side, and reports the median of the per-round ratios (train/LoRA); on a CPU
with one thread it times the thread's CPU time, so a shared machine's preemption does not count. Without it the
train/LoRA columns divide medians taken at different times (noisy on a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Timing, clock, interleaved, peak_memory

SIDES = ("surgeon", "peft")


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "llama" or "convnet"
    method: str
    options: tuple[tuple[str, object], ...] = ()

    def config(self):
        import peft

        targets = "all-linear" if self.model == "llama" else ["conv1", "conv2", "conv3"]
        from surgeon.methods import config_of

        cls = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[config_of(self.method).peft_type]
        extra = {"total_step": 100} if self.method == "adalora" else {}
        if self.method == "ia3" and self.model == "llama":
            extra["feedforward_modules"] = ["down_proj"]
        return cls(target_modules=targets, **extra, **dict(self.options))


CASES = (
    Case("lora r8", "llama", "lora", (("r", 8),)),
    Case("dora r8", "llama", "lora", (("r", 8), ("use_dora", True))),
    Case("loha r8", "llama", "loha", (("r", 8),)),
    Case("lokr r8", "llama", "lokr", (("r", 8),)),
    Case("lokr r8 both", "llama", "lokr", (("r", 8), ("decompose_both", True))),
    Case("adalora r8", "llama", "adalora", (("init_r", 8),)),
    Case("ia3", "llama", "ia3"),
    Case("lora r8 conv", "convnet", "lora", (("r", 8),)),
    Case("loha r8 conv", "convnet", "loha", (("r", 8),)),
    Case("loha r4 cp conv", "convnet", "loha", (("r", 4), ("use_effective_conv2d", True))),
    Case("lokr r8 conv", "convnet", "lokr", (("r", 8),)),
    Case("vera r8", "llama", "vera", (("r", 8),)),
    Case("oft b8", "llama", "oft", (("oft_block_size", 8),)),
    Case("hra r8", "llama", "hra", (("r", 8),)),
    Case("miss r8", "llama", "miss", (("r", 8),)),
    Case("shira r8", "llama", "shira", (("r", 8),)),
    Case("boft b8", "llama", "boft", (("boft_block_size", 8),)),
    Case("boft b3 conv", "convnet", "boft", (("boft_block_size", 3),)),
    Case("oft b8 conv", "convnet", "oft", (("oft_block_size", 8),)),
    Case("road g64", "llama", "road", (("group_size", 64),)),
    Case("delora r8", "llama", "delora", (("r", 8),)),
    Case("ln_tuning", "llama", "ln_tuning"),
    Case("fourierft n200", "llama", "fourierft", (("n_frequency", 200),)),
    Case("randlora r32", "llama", "randlora", (("r", 32),)),
    Case("vblora r4 v64", "llama", "vblora", (("r", 4), ("num_vectors", 64), ("vector_length", 64))),
    Case("gralora r8 k2", "llama", "gralora", (("r", 8), ("gralora_k", 2), ("alpha", 16))),
    Case("osf", "llama", "osf"),
    Case("c3a b32", "llama", "c3a", (("block_size", 32),)),
    Case("waveft n200", "llama", "waveft", (("n_frequency", 200), ("scaling", 1.0))),
)


class ConvNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def build(model: str, smoke: bool, device: torch.device,
          hidden: int = 256) -> tuple[nn.Module, dict, dict]:
    """The base model, a prefill batch and a training batch (`hidden`: the llama's width)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if model == "convnet":
        size = 8 if smoke else 32
        base = ConvNet(16 if smoke else 64)
        return (base.to(device).eval(), {"x": torch.randn(4, 3, size, size, generator=g).to(device)},
                {"x": torch.randn(8, 3, size, size, generator=g).to(device)})
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = 64 if smoke else hidden
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=512)
    base = LlamaForCausalLM(config).to(device).eval()
    seq = 16 if smoke else 128
    ids = lambda n: {"input_ids": torch.randint(0, 512, (n, seq), generator=g).to(device)}
    return base, ids(4), ids(4)


def pair(case: Case, base: nn.Module) -> dict[str, nn.Module]:
    """PEFT's model and surgeon's, with PEFT's (random, non-zero) adapter weights in both."""
    from peft import get_peft_model

    import surgeon
    from surgeon.lang.spec import Spec
    from surgeon.peft_format.config import spec_from_peft_config

    config = case.config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in (p for p in pm.parameters() if p.requires_grad):
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)) if case.method == "ia3"
                    else 0.1 * torch.randn(p.shape, generator=g))
    ours = copy.deepcopy(base)
    surgeon.apply(Spec((spec_from_peft_config(config.to_dict(), name="default"),)), ours)
    ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()},
                         strict=False)  # AdaLoRA's ranknum is a buffer surgeon does not save
    return {"surgeon": ours, "peft": pm}


def output(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def train_step(model: nn.Module, batch: dict):
    """One forward, backward and AdamW step of `model` (put in train mode)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        output(model, batch).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def paired_train(steps: dict[str, object], lora: dict[str, object], device: torch.device,
                 timing: Timing) -> dict[str, float]:
    """Per side, the median over rounds of the case's step time over LoRA's in the same round."""
    cpu_time = device.type == "cpu" and torch.get_num_threads() == 1
    fns = {**{("case", s): f for s, f in steps.items()}, **{("lora", s): f for s, f in lora.items()}}
    for fn in fns.values():
        for _ in range(timing.warmup):
            fn()
    rounds: dict[tuple, list[float]] = {k: [] for k in fns}
    for _ in range(timing.repeats * timing.inner):
        for key, fn in fns.items():
            if cpu_time:
                start = time.thread_time()
                fn()
                rounds[key].append(time.thread_time() - start)
            else:
                rounds[key].append(clock(fn, device))
    return {f"train_over_lora_{s}": statistics.median(
        c / r for c, r in zip(rounds[("case", s)], rounds[("lora", s)], strict=True)) for s in SIDES}


def measure(case: Case, smoke: bool, device: torch.device, timing: Timing, hidden: int = 256,
            paired: bool = False) -> dict[str, float]:
    base, prefill, train_batch = build(case.model, smoke, device, hidden)
    models = pair(case, base)
    with torch.no_grad():
        a, b = (output(models[s], prefill) for s in SIDES)
        error = (a - b).abs().max().item()
    forwards = {}
    for side, model in models.items():
        model.eval()
        forwards[side] = lambda m=model: torch.no_grad()(output)(m, prefill)
    result = {f"forward_{k}": v for k, v in interleaved(forwards, device, timing).items()}
    steps = {side: train_step(model, train_batch) for side, model in models.items()}
    result.update({f"train_{k}": v for k, v in interleaved(steps, device, timing).items()})
    result.update({f"train_peak_mib_{k}": peak_memory(step, device) for k, step in steps.items()})
    reference = next(c for c in CASES if c.model == case.model and c.method == "lora")
    if paired and case != reference:  # DoRA too: its method is "lora"
        lora = {side: train_step(model, train_batch) for side, model in pair(reference, base).items()}
        result.update(paired_train(steps, lora, device, timing))
    result["max_abs_diff"] = error
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", nargs="*", help="case names to run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--hidden", type=int, default=256, help="the llama's hidden size (256 by default)")
    parser.add_argument("--paired", action="store_true",
                        help="train/LoRA from the same rounds (the case's step over its LoRA's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    timing = Timing(repeats=2, inner=1, warmup=1) if args.smoke else Timing(repeats=5, inner=3, warmup=2)
    from surgeon import methods

    rows = {}
    for case in CASES:
        if args.only and case.name not in args.only or not methods.applies(case.method):
            continue
        rows[case.name] = measure(case, args.smoke, device, timing, args.hidden, args.paired)
    _print(rows)
    print(json.dumps({"device": str(device), "torch": torch.__version__, "machine": platform.machine(),
                      "hidden": args.hidden, "rows": rows}))


def _print(rows: dict[str, dict[str, float]]) -> None:
    head = f"{'case':<18}{'fwd ms s/p':>16}{'fwd ratio':>10}{'train ms s/p':>18}{'train ratio':>12}" \
           f"{'train/LoRA s':>14}{'train/LoRA p':>14}{'max diff':>10}"
    print(head)
    for name, r in rows.items():
        lora = rows.get("lora r8 conv" if "conv" in name else "lora r8")  # DoRA too: within 1.15x?
        if f"train_over_lora_{SIDES[0]}" in r:  # --paired: from the same rounds
            rel = [f"{r[f'train_over_lora_{s}']:.2f}" for s in SIDES]
        else:
            rel = [f"{r[f'train_{s}'] / lora[f'train_{s}']:.2f}" if lora else "-" for s in SIDES]
        print(f"{name:<18}{r['forward_surgeon'] * 1e3:>7.2f}/{r['forward_peft'] * 1e3:<8.2f}"
              f"{r['forward_surgeon'] / r['forward_peft']:>10.2f}"
              f"{r['train_surgeon'] * 1e3:>9.2f}/{r['train_peft'] * 1e3:<8.2f}"
              f"{r['train_surgeon'] / r['train_peft']:>12.2f}{rel[0]:>14}{rel[1]:>14}"
              f"{r['max_abs_diff']:>10.1e}")


if __name__ == "__main__":
    main()
