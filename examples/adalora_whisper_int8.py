"""AdaLoRA on an 8-bit Whisper: the rank allocator over a few steps, then peft reads it back.

A tiny Whisper is built from a transformers config (nothing downloaded), saved, and loaded again
with `BitsAndBytesConfig(load_in_8bit=True)` as a real checkpoint would be; `surgeon.prepare_kbit`
readies it for training. `examples/adalora_whisper.peft` adapts it; each step adds AdaLoRA's
orthogonality loss and runs the allocator, which prunes ranks toward `target_r`. The checkpoint
is saved with `rank_pattern` and loaded by `peft.PeftModel.from_pretrained` onto a fresh 8-bit
base: the logits must agree.

    .venv/bin/python examples/adalora_whisper_int8.py
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

import surgeon
from surgeon.methods.adalora import RankAllocator, orth_loss

SPEC = Path(__file__).with_name("adalora_whisper.peft")
MELS, FRAMES, VOCAB = 16, 32, 64


def tiny_whisper(path: Path) -> None:
    """Save a seeded random Whisper small enough for two CPU cores."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=VOCAB, num_mel_bins=MELS, d_model=64, encoder_layers=2,
                           decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=FRAMES // 2,
                           max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1)
    WhisperForConditionalGeneration(config).save_pretrained(path)


def load_int8(path: Path) -> torch.nn.Module:
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration, logging

    logging.set_verbosity_error()
    return WhisperForConditionalGeneration.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu").eval()


def batch(seed: int) -> dict[str, torch.Tensor]:
    """Synthetic log-mel features and target tokens."""
    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(2, MELS, FRAMES, generator=g),
            "labels": torch.randint(3, VOCAB, (2, 6), generator=g)}


def main(workdir: Path) -> float:
    """Train, save, reload with peft; returns the largest logit difference."""
    from peft import PeftModel

    tiny_whisper(workdir / "base")
    model = surgeon.prepare_kbit(load_int8(workdir / "base"), use_gradient_checkpointing=False)
    torch.manual_seed(0)
    surgeon.apply(SPEC, model)
    allocator = RankAllocator(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(allocator.total_step):
        loss = model(**batch(step)).loss + orth_loss(model)
        loss.backward()
        opt.step()
        allocator.update_and_allocate(step)
        opt.zero_grad()
        print(f"step {step:2d}  loss {loss.item():.4f}  kept ranks {allocator.budget}")
    allocator.finalize()
    model.eval()
    surgeon.save_pretrained(model, workdir / "adapter")

    probe = batch(100)
    with torch.no_grad():
        ours = model(**probe).logits
        theirs = PeftModel.from_pretrained(load_int8(workdir / "base"), workdir / "adapter")
        peft_logits = theirs.get_base_model()(**probe).logits  # its forward wants input_ids
    return (ours - peft_logits).abs().max().item()


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        diff = main(Path(tmp))
    print(f"peft reads the checkpoint back: max |logit difference| = {diff:.2e}")
    assert diff < 1e-4, diff
