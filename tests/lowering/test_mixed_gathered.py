"""Mixed-adapter batches of LoRA run gathered (one batched matmul, `surgeon.runtime.gathered`):
equal to PEFT's per-adapter loop in outputs and gradients, follow weight edits, and fall back to
the loop (or refuse, as PEFT) where gathering would not be exact."""

from __future__ import annotations

import copy

import pytest
import torch
from surgeon.passes.insert_adapters import lower_graph

from surgeon.runtime import gathered
from surgeon.runtime.adapted import AdaptedLayer
from surgeon.runtime.graph import tag
from tests.lowering.peft_oracle import (
    Variant,
    add_peft_adapter,
    make_base,
    make_input,
    max_diff,
    peft_layer,
    randomise,
)

TOL = 1e-5
# different ranks (zero padding), rsLoRA and alphas (scaling folded into B)
VARIANTS = {"a": Variant(r=2, alpha=4.0), "b": Variant(r=5, alpha=3.0, use_rslora=True),
            "c": Variant(r=3, alpha=1.0)}
NAMES = ["b", "__base__", "a", "c", "unknown", "b", "a"]


def layers(kind: str, variants: dict[str, Variant] = VARIANTS):
    """PEFT's and our layer with `variants` (random, equal weights), eval mode."""
    base = make_base(kind)
    (first, v0), *rest = variants.items()
    theirs = peft_layer(copy.deepcopy(base), v0, first)
    ours = AdaptedLayer(copy.deepcopy(base), v0.site(kind, first))
    for i, (name, v) in enumerate(rest):
        add_peft_adapter(theirs, v, name)
        ours.add_adapter(v.site(kind, name))
    for i, name in enumerate(variants):
        randomise(theirs, name, seed=i + 1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.eval(), ours.eval()


def runs(ours: AdaptedLayer) -> list:
    return list(ours._forwards.mixed.values())


@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
@pytest.mark.parametrize("shape", ["3d", "2d"])
def test_gathered_equals_peft(kind: str, shape: str) -> None:
    theirs, ours = layers(kind)
    x = make_input(kind, batch=len(NAMES))
    x = x if shape == "3d" else x[:, 0]
    with torch.no_grad():
        expected, got = theirs(x, adapter_names=NAMES), ours(x, adapter_names=NAMES)
        base = theirs.base_layer(x)
    assert max_diff(expected, got) <= TOL
    assert max_diff(base[1], got[1]) == 0 and max_diff(base[4], got[4]) == 0  # no adapter
    assert all(max_diff(base[i], got[i]) > 1e-2 for i in (0, 2, 3))  # the adapters do work
    assert [type(r) for r in runs(ours)] == [gathered.GatheredRun]


def test_graph_has_one_gathered_node() -> None:
    _, ours = layers("Linear")
    with torch.no_grad():
        ours(make_input("Linear", batch=len(NAMES)), adapter_names=NAMES)
    (run,) = runs(ours)
    graph = lower_graph(ours, run.adapters, mixed=True, gathered=True)
    calls = [n for n in graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls][-1] is gathered.add_gathered  # after the base call only
    assert tag(calls[-1]) == {"rule": "", "pass": "insert-adapters", "adapter": "*", "role": "result"}
    assert graph.output_node().args[0] is calls[-1]
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", *gathered.INPUTS]
    assert not any("lora_A" in str(n.target) for n in graph.nodes if n.op == "get_attr")


def test_cached_stacks_follow_weight_edits() -> None:
    theirs, ours = layers("Linear")
    x = make_input("Linear", batch=len(NAMES))
    with torch.no_grad():
        ours(x, adapter_names=NAMES)
        (run,) = runs(ours)
        cached = run._stacks
        ours(x, adapter_names=NAMES)
        assert run._stacks is cached  # reused while no weight changed
        for layer in (theirs, ours):  # an optimizer-like in-place step on one adapter
            layer.lora_B["b"].weight.mul_(-2.0)
            layer.lora_A["c"].weight.add_(0.5)
        assert max_diff(theirs(x, adapter_names=NAMES), ours(x, adapter_names=NAMES)) <= TOL
        theirs.lora_A["a"].weight.zero_()
        ours.load_state_dict(theirs.state_dict())
        assert max_diff(theirs(x, adapter_names=NAMES), ours(x, adapter_names=NAMES)) <= TOL


def test_gradients_equal_peft() -> None:
    theirs, ours = layers("Linear")
    for layer in (theirs, ours):
        layer.set_adapter(list(VARIANTS))  # trainable
    x = make_input("Linear", batch=len(NAMES))
    grads = []
    for layer in (theirs, ours):
        layer(x, adapter_names=NAMES).square().sum().backward()
        grads.append({n: p.grad for n, p in layer.named_parameters()
                      if p.grad is not None and "lora_" in n})  # base freezing is model-level
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 2 * len(VARIANTS)
    assert all(max_diff(grads[0][n], grads[1][n]) <= 1e-4 for n in grads[0])


def test_lora_bias_keeps_the_loop() -> None:
    theirs, ours = layers("Linear", dict(VARIANTS, c=Variant(r=3, lora_bias=True)))
    x = make_input("Linear", batch=len(NAMES))
    with torch.no_grad():
        assert max_diff(theirs(x, adapter_names=NAMES), ours(x, adapter_names=NAMES)) <= TOL
    assert not any(isinstance(r, gathered.GatheredRun) for r in runs(ours))


def test_dropout_gathers_only_in_eval() -> None:
    variants = {k: Variant(r=v.r, alpha=v.alpha, lora_dropout=0.5) for k, v in VARIANTS.items()}
    theirs, ours = layers("Linear", variants)
    x = make_input("Linear", batch=len(NAMES))
    ours.train()  # PEFT drops each adapter's rows out: the loop does the same
    ours(x, adapter_names=NAMES)
    assert [type(r) for r in runs(ours)] != [gathered.GatheredRun]
    ours.eval()
    with torch.no_grad():
        assert max_diff(theirs(x, adapter_names=NAMES), ours(x, adapter_names=NAMES)) <= TOL
    assert isinstance(runs(ours)[-1], gathered.GatheredRun)


def test_dora_refused_as_peft() -> None:
    _, ours = layers("Linear", {"a": Variant(r=2), "d": Variant(r=2, use_dora=True)})
    with pytest.raises(ValueError, match="DoRA"):
        ours(make_input("Linear", batch=2), adapter_names=["a", "d"])
    with torch.no_grad():  # without the DoRA adapter in the batch it gathers
        ours(make_input("Linear", batch=2), adapter_names=["a", "__base__"])
    assert [type(r) for r in runs(ours)] == [gathered.GatheredRun]
