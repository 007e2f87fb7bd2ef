"""Tiny models for every test: transformers architectures from tiny configs and plain modules.

Each `ModelCase` builds a fresh, seeded model in eval mode and seeded example inputs, so two
calls give identical weights: a test builds one copy for peft (the oracle) and one for surgeon.
Nothing is downloaded. Hidden sizes are 32, two layers, a vocabulary of 64.

    case = CASES["llama"]
    model, inputs = case.build(), case.inputs()
    model(**inputs)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

VOCAB = 64
BATCH, SEQ = 2, 6

# Tiny tensors on a shared 2-core machine: intra-op threads only add contention (5x slower).
torch.set_num_threads(1)


def seeded(seed: int = 0) -> torch.Generator:
    """Seed torch's global generator (transformers initialises through it) and return a local one."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- plain modules


class MLP(nn.Module):
    """The MLP of PEFT's custom-models guide, with a small hidden width."""

    def __init__(self, num_units_hidden: int = 32):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(20, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, X):
        return self.seq(X)


class ConvNet(nn.Module):
    """A small conv net: Conv2d -> ReLU -> Conv2d -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.act = nn.ReLU()
        self.head = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.head(x.flatten(1))


class SharedTwice(nn.Module):
    """Calls one submodule twice in its forward (weight sharing through reuse)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.shared = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))  # the same module again
        return self.out(h)


class NestedDicts(nn.Module):
    """Modules held in nested `nn.ModuleDict`s, an embedding included."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({
            "embed": nn.Embedding(VOCAB, 32),
            "enc": nn.ModuleDict({"proj": nn.Linear(32, 32), "gate": nn.Linear(32, 32)}),
            "dec": nn.ModuleDict({"proj": nn.Linear(32, 32), "out": nn.Linear(32, 8)}),
        })

    def forward(self, input_ids):
        b = self.blocks
        h = b["embed"](input_ids)
        h = b["enc"]["proj"](h) * torch.sigmoid(b["enc"]["gate"](h))
        return b["dec"]["out"](torch.relu(b["dec"]["proj"](h)))


# --------------------------------------------------------------------------- inputs


def token_inputs(seed: int = 1, *, decoder: bool = False, mask: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    out = {"input_ids": ids}
    if mask:
        out["attention_mask"] = torch.ones_like(ids)
    if decoder:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 4), generator=g)
    return out


def tensor_input(name: str, *shape: int, seed: int = 1) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {name: torch.randn(*shape, generator=torch.Generator().manual_seed(seed))}


# --------------------------------------------------------------------------- transformers configs

_LM = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, **_LM)


def _hf(config_cls: str, model_cls: str, **config) -> Callable[[], nn.Module]:
    """A factory that builds `transformers.<model_cls>` from `transformers.<config_cls>(**config)`."""

    def build() -> nn.Module:
        import transformers

        seeded(0)
        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg).eval()

    return build


def _plain(cls: type[nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        seeded(0)
        return cls().eval()

    return build


@dataclass(frozen=True)
class ModelCase:
    """A tiny model, its inputs and the PEFT target names the oracle tests use for it."""

    name: str
    build: Callable[[], nn.Module]  # a fresh, seeded model in eval mode
    inputs: Callable[[], dict[str, torch.Tensor]]  # seeded keyword inputs of `model(**inputs)`
    qv: tuple[str, ...]  # PEFT `target_modules` names for "q and v" (or two layers of a plain model)
    linear: tuple[str, ...] = ()  # every linear layer's name, for plain modules ("all-linear" there)
    layers: str | None = None  # PEFT layers_pattern of the repeated-block stack, None if there is none
    save: str | None = None  # a head to put in modules_to_save
    hf: bool = True  # a transformers PreTrainedModel

    def output(self, model: nn.Module, **extra) -> torch.Tensor:
        """The model's main output tensor on this case's inputs."""
        out = model(**self.inputs(), **extra)
        return out if isinstance(out, torch.Tensor) else out[0]


_CAUSAL = token_inputs
_SEQ2SEQ = lambda: token_inputs(decoder=True)  # noqa: E731

HF_CASES = (
    ModelCase("llama", _hf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, **_DECODER),
              _CAUSAL, ("q_proj", "v_proj"), layers="layers"),
    ModelCase("mistral", _hf("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, **_DECODER),
              _CAUSAL, ("q_proj", "v_proj"), layers="layers"),
    ModelCase("qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2, **_DECODER),
              _CAUSAL, ("q_proj", "v_proj"), layers="layers"),
    ModelCase("gpt2", _hf("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4, n_positions=64,
                          **_LM), _CAUSAL, ("c_attn",), layers="h"),
    ModelCase("gpt_neox", _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **_DECODER),
              _CAUSAL, ("query_key_value",), layers="layers"),
    ModelCase("opt", _hf("OPTConfig", "OPTForCausalLM", hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64, **_LM),
              _CAUSAL, ("q_proj", "v_proj"), layers="layers"),
    ModelCase("bloom", _hf("BloomConfig", "BloomForCausalLM", hidden_size=32, n_layer=2, n_head=4, **_LM),
              _CAUSAL, ("query_key_value",), layers="h"),
    ModelCase("falcon", _hf("FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, **_LM), _CAUSAL, ("query_key_value",), layers="h"),
    ModelCase("bert", _hf("BertConfig", "BertForSequenceClassification", hidden_size=32,
                          intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=64, num_labels=3, vocab_size=VOCAB, pad_token_id=0),
              _CAUSAL, ("query", "value"), layers="layer", save="classifier"),
    ModelCase("roberta", _hf("RobertaConfig", "RobertaForSequenceClassification", hidden_size=32,
                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, num_labels=3, **_LM),
              _CAUSAL, ("query", "value"), layers="layer", save="classifier"),
    ModelCase("t5", _hf("T5Config", "T5ForConditionalGeneration", d_model=32, d_kv=8, d_ff=64, num_layers=2,
                        num_heads=4, decoder_start_token_id=0, **_LM),
              _SEQ2SEQ, ("q", "v"), layers="block"),
    ModelCase("bart", _hf("BartConfig", "BartForConditionalGeneration", d_model=32, encoder_layers=2,
                          decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                          encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                          decoder_start_token_id=2, **_LM),
              _SEQ2SEQ, ("q_proj", "v_proj"), layers="layers"),
    ModelCase("vit", _hf("ViTConfig", "ViTForImageClassification", hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4,
                         num_labels=3), tensor_input("pixel_values", BATCH, 3, 16, 16),
              ("q_proj", "v_proj"), layers="layers", save="classifier"),
    ModelCase("whisper", _hf("WhisperConfig", "WhisperForConditionalGeneration", d_model=32,
                             encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                             num_mel_bins=8, max_source_positions=8, max_target_positions=32,
                             decoder_start_token_id=1, **_LM),
              lambda: {**tensor_input("input_features", BATCH, 8, 16)(),
                       "decoder_input_ids": token_inputs(mask=False)["input_ids"][:, :4]},
              ("q_proj", "v_proj"), layers="layers"),
)

PLAIN_CASES = (
    ModelCase("mlp", _plain(MLP), tensor_input("X", 4, 20), ("seq.0", "seq.2"),
              linear=("seq.0", "seq.2", "seq.4"), save="seq.4", hf=False),
    ModelCase("convnet", _plain(ConvNet), tensor_input("x", BATCH, 3, 8, 8), ("conv1", "head"),
              linear=("head",), hf=False),
    ModelCase("shared", _plain(SharedTwice), tensor_input("x", 4, 16), ("shared", "out"),
              linear=("inp", "shared", "out"), hf=False),
    ModelCase("nested", _plain(NestedDicts), lambda: token_inputs(mask=False), ("enc.proj", "dec.proj"),
              linear=("enc.proj", "enc.gate", "dec.proj", "dec.out"), hf=False),
)

CASES: dict[str, ModelCase] = {c.name: c for c in HF_CASES + PLAIN_CASES}


def tiny_llama(layers: int = 2, hidden: int = 32, **config) -> nn.Module:
    """A seeded LlamaForCausalLM with `layers` blocks (32 for apply-time measurements)."""
    kw = {**_DECODER, "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 2 * hidden,
          "num_key_value_heads": 2, **config}
    return _hf("LlamaConfig", "LlamaForCausalLM", **kw)()
