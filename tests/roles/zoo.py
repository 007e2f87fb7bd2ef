"""Tiny transformers models for the role tests, one builder per architecture.

Each entry builds a freshly initialised model (hidden 32-64, two layers) on CPU, so that PEFT
can inject adapters into it. Nothing is downloaded. The key is PEFT's `model_type` spelling.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
from torch import nn

_TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64)


def _auto(model_type: str, head: str = "causal", **overrides: Any) -> Callable[[], nn.Module]:
    """A builder for `model_type` with the tiny text defaults, `overrides` winning."""

    def build() -> nn.Module:
        import transformers

        kwargs = {**_TEXT, **overrides}
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
        auto = {
            "causal": transformers.AutoModelForCausalLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "base": transformers.AutoModel,
        }[head]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            return auto.from_config(config).eval()

    return build


def _blip2() -> nn.Module:
    import transformers

    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=8),
        qformer_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, encoder_hidden_size=32),
        text_config=dict(model_type="opt", vocab_size=99, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
        num_query_tokens=4, image_token_id=3,
    )
    torch.manual_seed(0)
    return transformers.Blip2ForConditionalGeneration(config).eval()


def _clip() -> nn.Module:
    import transformers

    sub = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(
        text_config=dict(sub, vocab_size=99, max_position_embeddings=16),
        vision_config=dict(sub, image_size=16, patch_size=8), projection_dim=16,
    )
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval()


def _whisper() -> nn.Module:
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=8, max_target_positions=16, pad_token_id=0,
        decoder_start_token_id=1, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config).eval()


_BART = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64)
_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8)

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    # PEFT's LoRA table
    "t5": _auto("t5", "seq2seq", **_T5),
    "mt5": _auto("mt5", "seq2seq", **_T5),
    "bart": _auto("bart", "seq2seq", **_BART),
    "gpt2": _auto("gpt2", n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64),
    "bloom": _auto("bloom", n_layer=2, n_head=4),
    "blip-2": _blip2,
    "opt": _auto("opt", ffn_dim=64, word_embed_proj_dim=32),
    "gptj": _auto("gptj", n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=64, n_positions=64),
    "gpt_neox": _auto("gpt_neox"),
    "gpt_neo": _auto("gpt_neo", attention_types=[[["global", "local"], 1]], num_layers=2, window_size=8),
    "bert": _auto("bert", "base"),
    "roberta": _auto("roberta", "base"),
    "xlm-roberta": _auto("xlm-roberta", "base"),
    "electra": _auto("electra", "base", embedding_size=32),
    "deberta-v2": _auto("deberta-v2", "base"),
    "deberta": _auto("deberta", "base"),
    "layoutlm": _auto("layoutlm", "base"),
    "llama": _auto("llama", num_key_value_heads=2),
    "gpt_bigcode": _auto("gpt_bigcode", n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64),
    "mpt": _auto("mpt", d_model=32, n_heads=4, n_layers=2, expansion_ratio=2),
    "falcon": _auto("falcon", new_decoder_architecture=True, num_kv_heads=2),
    "codegen": _auto("codegen", n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=64, n_positions=64,
                     n_ctx=64),
    "mistral": _auto("mistral", num_key_value_heads=2),
    "stablelm": _auto("stablelm", num_key_value_heads=2),
    "mixtral": _auto("mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "phi": _auto("phi"),
    "gemma": _auto("gemma", num_key_value_heads=2, head_dim=8),
    "gemma2": _auto("gemma2", num_key_value_heads=2, head_dim=8),
    "gemma3_text": _auto("gemma3_text", num_key_value_heads=2, head_dim=8),
    "qwen2": _auto("qwen2", num_key_value_heads=2),
    "qwen3": _auto("qwen3", num_key_value_heads=2, head_dim=8),
    # not in PEFT's tables
    "phi3": _auto("phi3", num_key_value_heads=2, pad_token_id=0),
    "olmo": _auto("olmo"),
    "olmo2": _auto("olmo2"),
    "starcoder2": _auto("starcoder2", num_key_value_heads=2),
    "granite": _auto("granite", num_key_value_heads=2),
    "cohere": _auto("cohere", num_key_value_heads=2),
    "persimmon": _auto("persimmon"),
    "phimoe": _auto("phimoe", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "whisper": _whisper,
    "vit": _auto("vit", "base", image_size=16, patch_size=8),
    "clip": _clip,
    "rwkv": _auto("rwkv", attention_hidden_size=32, context_length=64),
}


def build(arch: str) -> nn.Module:
    """A tiny model of architecture `arch` on CPU in eval mode."""
    return BUILDERS[arch]()


@functools.cache
def roles_of(arch: str) -> dict[str, str]:
    """Inferred roles of the tiny `arch` model, computed once per test session."""
    from surgeon.capture.infer import infer_roles

    return infer_roles(build(arch))


def select(roles: dict[str, str], *selectors: str) -> set[str]:
    """Paths whose role matches any role selector (without its `@`)."""
    from surgeon.capture.names import role_matches

    return {path for path, role in roles.items()
            if any(role_matches(s.lstrip("@"), role) for s in selectors)}
