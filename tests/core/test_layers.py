"""Layer indices (surgeon.planning.layers) against PEFT's layers_pattern and Python's slicing.

Also home of the tiny models the core tests share (transformers configs and plain nn.Modules).
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgeon.lang.spec import Layers, LayerSlice
from surgeon.planning.layers import LayerIndex, pattern_layers, resolve_items, structural_layers

# --------------------------------------------------------------------------- tiny models


class Block(nn.Module):
    """A residual block with a ModuleDict attention and a Sequential MLP of leaves."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"q": nn.Linear(d, d), "v": nn.Linear(d, d, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class NestedNet(nn.Module):
    """Nested ModuleDicts next to a ModuleList stack."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.towers = nn.ModuleDict({
            "left": nn.ModuleDict({"proj": nn.Linear(8, 8), "gate": nn.ModuleDict({"fc": nn.Linear(8, 6)})}),
            "right": nn.ModuleDict({"proj": nn.Linear(8, 8), "act": nn.ReLU()}),
        })
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(8, 4)


class SharedNet(nn.Module):
    """A block reused inside the stack and a leaf reachable under two names."""

    def __init__(self):
        super().__init__()
        self.first = Block()
        self.layers = nn.ModuleList([self.first, Block(), Block(), Block()])
        self.proj = nn.Linear(8, 8)
        self.alias = self.proj


class ConvBlock(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.pointwise = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)


class ConvNet(nn.Module):
    """Convolutions of every dimension, an embedding and a Sequential stack."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.stages = nn.Sequential(ConvBlock(), ConvBlock(), nn.ReLU())
        self.seq = nn.Conv1d(4, 6, 3)
        self.vol = nn.Conv3d(2, 4, (1, 2, 2))
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)


def _transformers_models() -> dict[str, nn.Module]:
    import transformers as tf

    torch.manual_seed(0)
    return {
        "llama": tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64)),
        "gpt2": tf.GPT2LMHeadModel(tf.GPT2Config(
            n_embd=32, n_layer=3, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)),
        "bert": tf.BertForSequenceClassification(tf.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=64, max_position_embeddings=32)),
        "t5": tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=3, num_heads=4, vocab_size=64)),
    }


@functools.cache
def tiny_models() -> dict[str, nn.Module]:
    """name -> model; build once per process, never mutate (deepcopy before applying peft)."""
    torch.manual_seed(0)
    return {**_transformers_models(), "nested": NestedNet(), "shared": SharedNet(), "conv": ConvNet()}


# PEFT layers_pattern of each transformers model's block stack(s).
PEFT_LAYERS_PATTERN = {"llama": "layers", "gpt2": "h", "bert": "layer", "t5": "block"}
TRANSFORMERS = tuple(PEFT_LAYERS_PATTERN)


# --------------------------------------------------------------------------- structure vs peft


def _peft_index(key: str, pattern: str | None) -> int | None:
    """The layer index PEFT's check_target_module_exists computes (copied regexes, peft 0.21)."""
    if pattern is None:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
    return None if match is None else int(match["idx"])


@pytest.mark.parametrize("name", TRANSFORMERS)
@pytest.mark.parametrize("use_pattern", [True, False])
def test_structural_index_equals_peft_on_adaptable_layers(name, use_pattern):
    model = tiny_models()[name]
    structure = structural_layers(model.named_modules())
    pattern = PEFT_LAYERS_PATTERN[name] if use_pattern else None
    checked = 0
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D":
            expected = _peft_index(path, pattern)
            got = structure.of.get(path)
            assert (got.index if got else None) == expected, path
            checked += expected is not None
    assert checked >= 6


def _zoo():
    from tests.models import HF_CASES

    return [pytest.param(case, id=case.name) for case in HF_CASES]


@pytest.mark.parametrize("case", _zoo())
def test_structural_index_equals_peft_across_the_zoo(case):
    """On every adaptable layer of the shared tiny zoo, with its layers_pattern and without."""
    model = case.build()
    structure = structural_layers(model.named_modules())
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D":
            got = structure.of.get(path)
            for pattern in (case.layers, None):
                assert (got.index if got else None) == _peft_index(path, pattern), (path, pattern)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_layers_selection_equals_peft_check_target_module_exists(name):
    """PEFT itself as oracle: layers_to_transform + layers_pattern over every Linear."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    model = tiny_models()[name]
    structure = structural_layers(model.named_modules())
    by_pattern = pattern_layers([p for p, _ in model.named_modules()], (PEFT_LAYERS_PATTERN[name],))
    leaves = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
    for idx in ([0], [1], [0, 2], [5]):
        for pattern in (PEFT_LAYERS_PATTERN[name], None):
            config = LoraConfig(target_modules=leaves, layers_to_transform=idx, layers_pattern=pattern)
            want = {p for p, m in model.named_modules()
                    if p and isinstance(m, nn.Linear) and check_target_module_exists(config, p)
                    and p not in leaves}
            layer_map = by_pattern if pattern else structure
            got = layer_map.select(Layers(tuple(idx))) & {
                p for p, m in model.named_modules() if isinstance(m, nn.Linear)}
            assert got == want, (idx, pattern)


def test_t5_stacks_are_identified_by_container_path():
    structure = structural_layers(tiny_models()["t5"].named_modules())
    assert dict(structure.sizes) == {"encoder.block": 2, "decoder.block": 3}
    assert structure.of["decoder.block.2.layer.1.EncDecAttention.q"] == LayerIndex("decoder.block", 2)
    # the inner `layer` ModuleList (self-attn, cross-attn, ff) is nested: the outer stack wins
    assert structure.of["encoder.block.1.layer.0.SelfAttention.k"] == LayerIndex("encoder.block", 1)
    last = structure.select(Layers((-1,)))
    assert "decoder.block.2.layer.2.DenseReluDense.wo" in last
    assert "encoder.block.1.layer.1.DenseReluDense.wo" in last
    assert "decoder.block.1.layer.2.DenseReluDense.wo" not in last


def test_plain_models():
    nested = structural_layers(NestedNet().named_modules())
    assert nested.sizes == {"blocks": 3}
    assert nested.of["blocks.2.attn.q"] == LayerIndex("blocks", 2)
    assert "towers.left.proj" not in nested.of  # ModuleDicts are not stacks
    assert "blocks.0.mlp.0" in nested.of and "blocks.0.mlp" in nested.of  # leaf Sequential: no stack

    conv = structural_layers(ConvNet().named_modules())
    # the trailing ReLU is no layer, so `layers[-1]` is the last ConvBlock
    assert conv.sizes == {"stages": 2}
    assert conv.select(Layers((-1,))) == {"stages.1.conv", "stages.1.pointwise", "stages.1.bn"}

    shared = structural_layers(SharedNet().named_modules())
    # layers.0 is `first` (seen first under that name), so the stack is seen from index 1
    assert {p.split(".")[1] for p in shared.of if p.startswith("layers.")} == {"1", "2", "3"}
    assert shared.sizes == {"layers": 4}


def test_root_sequential_is_a_stack():
    model = nn.Sequential(Block(), Block(), nn.Linear(8, 2))
    layers = structural_layers(model.named_modules())
    assert layers.sizes == {"": 2}
    assert layers.of["1.attn.q"] == LayerIndex("", 1)
    assert "2" not in layers.of and "1" not in layers.of  # a block is not inside itself


def test_pattern_takes_first_numbered_segment_and_first_pattern():
    paths = ["model.layers.1.experts.0.w1", "model.layers.1", "layers.3.fc", "enc.h.2.x",
             "dec.layers.0.h.4.y"]
    by_pattern = pattern_layers(paths, ("layers", "h"))
    assert by_pattern.of["model.layers.1.experts.0.w1"] == LayerIndex("model.layers", 1)
    assert "model.layers.1" not in by_pattern.of  # PEFT needs a segment after the index
    assert by_pattern.of["layers.3.fc"] == LayerIndex("layers", 3)
    assert by_pattern.of["enc.h.2.x"] == LayerIndex("enc.h", 2)
    assert by_pattern.of["dec.layers.0.h.4.y"] == LayerIndex("dec.layers", 0)
    for path, at in by_pattern.of.items():
        assert _peft_index(path, "layers") == at.index or _peft_index(path, "h") == at.index


# --------------------------------------------------------------------------- indexing semantics

_index = st.integers(-12, 12)
_slice = st.builds(LayerSlice, st.none() | _index, st.none() | _index,
                   st.none() | st.integers(1, 3) | st.integers(-3, -1))


@settings(max_examples=300, deadline=None)
@given(st.lists(_index | _slice, min_size=1, max_size=4), st.integers(0, 10))
def test_resolve_items_is_python_indexing(items, size):
    want: set[int] = set()
    seq = list(range(size))
    for item in items:
        if isinstance(item, LayerSlice):
            want.update(seq[item.start:item.stop:item.step])
        elif -size <= item < size:
            want.add(seq[item])
    got = resolve_items(items, size)
    # out-of-range ints may resolve past the end; they then match no layer
    assert {i for i in got if 0 <= i < size} == want


# --------------------------------------------------------------------------- nested containers


class MixedBlock(nn.Module):
    """A block whose Sequential MLP sits between two plain layers (issue 8's failing case)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.out = nn.Linear(d, d)

    def forward(self, x):
        return self.out(self.mlp(self.attn(x)))


class MixedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([MixedBlock() for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_nested_sequential_does_not_hide_the_layers_after_it():
    layers = structural_layers(MixedNet().named_modules())
    assert layers.sizes == {"layers": 3}
    for i in range(3):
        for name in ("attn", "mlp", "mlp.0", "mlp.2", "out"):
            assert layers.of[f"layers.{i}.{name}"] == LayerIndex("layers", i), (i, name)
    assert layers.select(Layers((LayerSlice(0, 2),))) >= {"layers.0.out", "layers.1.out"}


def test_planning_a_layer_range_after_a_nested_sequential():
    import surgeon

    plan = surgeon.plan("adapter default = lora(r=2) { target out in layers[0:2] }", MixedNet())
    assert [s.path for s in plan.adapters[0].sites] == ["layers.0.out", "layers.1.out"]
