"""Fine-tune with transformers' Trainer on a surgeon-adapted model: checkpoints, resume, save.

    .venv/bin/python examples/trainer_lora.py                 # a small random llama, offline, seconds
    .venv/bin/python examples/trainer_lora.py --model DIR_OR_HUB_ID --steps 200

Nothing surgeon-specific happens after `surgeon.apply`: Trainer's checkpoints, `save_model` and
`model.save_pretrained` write PEFT adapter folders (adapter_config.json +
adapter_model.safetensors), because surgeon answers transformers' own adapter protocol on the model
(see surgeon/integrations/transformers.py), and `train(resume_from_checkpoint=...)` restores the
adapter from such a checkpoint. The result loads with `peft.PeftModel.from_pretrained`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import surgeon

SPEC = """
adapter default = lora(r=8, alpha=16, dropout=0.0, task_type=CAUSAL_LM) {
    target @attn.q, @attn.v
}
"""


def base_model(name: str | None, folder: Path) -> str:
    """A model folder: `name` itself, or a small random llama written to `folder` (no download)."""
    if name:
        return name
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local folder or Hub id (default: a tiny llama)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="surgeon-trainer-"))
    base = base_model(args.model, out / "base")

    model = surgeon.apply(SPEC, transformers.AutoModelForCausalLM.from_pretrained(base))
    vocab = model.config.vocab_size
    rows = torch.randint(0, vocab, (64, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in rows]
    training = transformers.TrainingArguments(
        str(out / "run"), max_steps=args.steps, save_steps=max(1, args.steps // 2), learning_rate=5e-3,
        per_device_train_batch_size=8, report_to=[], use_cpu=not torch.cuda.is_available(),
        logging_steps=max(1, args.steps // 4))
    trainer = transformers.Trainer(model=model, args=training, train_dataset=data)
    trainer.train()
    trainer.save_model(str(out / "adapter"))  # a PEFT adapter folder, as for a peft model
    print("saved:", sorted(p.name for p in (out / "adapter").iterdir()))

    # resume from the mid-run checkpoint on a freshly adapted model: the same result
    again = surgeon.apply(SPEC, transformers.AutoModelForCausalLM.from_pretrained(base))
    checkpoint = out / "run" / f"checkpoint-{training.save_steps}"
    transformers.Trainer(model=again, args=training, train_dataset=data).train(resume_from_checkpoint=str(checkpoint))

    # peft reads the folder as its own
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(out / "adapter"))
    with torch.no_grad():
        ids = rows[:2]
        logits = [m.eval()(ids).logits for m in (model, again, reloaded)]
    print(f"resumed vs trained: max |diff| = {(logits[1] - logits[0]).abs().max():.2e}")
    print(f"peft reload vs trained: max |diff| = {(logits[2] - logits[0]).abs().max():.2e}")
    print("output:", out)


if __name__ == "__main__":
    main()
