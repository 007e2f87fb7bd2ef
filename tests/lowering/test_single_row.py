"""The single-row form of a CPU eval graph (`surgeon.runtime.single_row`): a decode step's input
(1, 1, in) runs `mv` for the base and each shrink and `addmv_` for each expand. Checked against
PEFT's layer (the oracle) and against the layer's general form; states without that form, other
shapes, autograd, live weights and torch.compile keep their behaviour."""

from __future__ import annotations

import pytest
import torch

from surgeon.runtime.adapted import AdaptedLayer
from surgeon.runtime.single_row import single_row_graph
from tests.lowering.peft_oracle import (
    Variant,
    make_base,
    max_diff,
    pair,
    two_adapters,
)

TOL = 1e-5
VARIANTS = {"lora": Variant(), "rslora": Variant(r=4, alpha=3.0, use_rslora=True),
            "dropout": Variant(lora_dropout=0.3)}


def _spy(layer: AdaptedLayer) -> list[int]:
    """Counts the layer's calls of its single-row form (built by a first call)."""
    with torch.no_grad():
        layer(torch.randn(1, 1, layer.base_layer.in_features))
    calls: list[int] = []
    row = layer._run_row
    layer.__dict__["_run_row"] = lambda self, x: calls.append(1) or row(self, x)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_mv_gives_the_bits_of_linear_for_one_row(dtype: torch.dtype, bias: bool) -> None:
    """What the form rests on: on this CPU one row through `mv` / `addmv` is `linear` exactly, so
    the base half of a decode step does not change by a bit."""
    gen = torch.Generator().manual_seed(0)
    for n_in, n_out in ((8, 6), (64, 172), (1024, 1024)):
        w = torch.randn(n_out, n_in, generator=gen).to(dtype)
        b = torch.randn(n_out, generator=gen).to(dtype) if bias else None
        x = torch.randn(1, 1, n_in, generator=gen).to(dtype)
        flat = x.view(-1)
        row = torch.mv(w, flat) if b is None else torch.addmv(b, w, flat)
        assert torch.equal(torch.nn.functional.linear(x, w, b), row.view(1, 1, -1))


ROWS = {"contiguous": lambda: torch.randn(1, 1, 8),
        "strided": lambda: torch.randn(1, 1, 16)[..., ::2],  # a slice of a wider tensor
        "batch-slice": lambda: torch.randn(3, 1, 8)[1:2]}


@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("bias", [True, False])
def test_a_decode_step_runs_the_row_form_and_matches_peft(row: str, variant: str, bias: bool) -> None:
    theirs, ours = pair("Linear", VARIANTS[variant], bias=bias)
    theirs.eval()
    ours.eval()
    calls = _spy(ours)
    x = ROWS[row]()
    before = x.clone()
    with torch.no_grad():
        got = ours(x)
        assert got.shape == (1, 1, 6) and max_diff(theirs(x), got) <= TOL
        assert torch.equal(got, ours._run(ours, x))  # the general form, to the bit
    assert calls == [1]
    assert torch.equal(x, before)


def test_two_adapters_add_in_the_graph_order() -> None:
    theirs, ours = two_adapters("Linear", Variant(r=3, alpha=5.0))
    for layer in (theirs, ours):
        layer.set_adapter(["default", "other"])
    calls = _spy(ours)
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        assert max_diff(theirs(x), ours(x)) <= TOL
        assert torch.equal(ours(x), ours._run(ours, x))
    row = single_row_graph(ours._graph, ours)
    assert [n.target for n in row.nodes if n.op == "call_method"].count("addmv_") == 2
    assert calls == [1, 1]


@pytest.mark.parametrize("shape", [(2, 1, 8), (1, 2, 8), (1, 8), (8,), (1, 1, 1, 8)])
def test_other_shapes_take_the_general_form(shape: tuple[int, ...]) -> None:
    theirs, ours = pair("Linear", Variant())
    theirs.eval()
    ours.eval()
    calls = _spy(ours)
    x = torch.randn(*shape)
    with torch.no_grad():
        got = ours(x)
        assert got.shape == (*shape[:-1], 6) and max_diff(theirs(x), got) <= TOL
    assert not calls


def _no_row_form(layer: AdaptedLayer) -> bool:
    layer(torch.randn(1, 1, 8))  # lowers the current state
    return layer._row_shape is None and layer._run_row is None


def test_states_without_the_form() -> None:
    """Training, DoRA, lora_bias, merged or disabled adapters, an adapter in another dtype than
    the base (the graph casts), a hooked base (called as a module): the general form only."""
    _, ours = pair("Linear", Variant())
    assert _no_row_form(ours.train())
    for variant in (Variant(use_dora=True), Variant(lora_bias=True)):
        assert _no_row_form(pair("Linear", variant)[1].eval())
    _, merged = pair("Linear", Variant())
    merged.eval().merge()
    assert _no_row_form(merged)
    _, disabled = pair("Linear", Variant())
    disabled.eval().enable_adapters(False)
    assert _no_row_form(disabled)
    _, cast = pair("Linear", Variant())
    cast.lora_A["default"].to(torch.float64)
    cast.lora_B["default"].to(torch.float64)
    cast.relower()
    assert _no_row_form(cast.eval())
    base = make_base("Linear")
    base.register_forward_hook(lambda _m, _i, out: out)
    hooked = AdaptedLayer(base, Variant().site("Linear")).eval()
    assert _no_row_form(hooked)
    _, conv1d = pair("Conv1D", Variant())
    assert _no_row_form(conv1d.eval())


def test_gradients_through_the_row_form_match_peft() -> None:
    """Eval mode with autograd on (an input's gradient): `mv` and the in-place `addmv_` into a
    fresh base output are differentiable like the general form."""
    theirs, ours = pair("Linear", VARIANTS["rslora"])
    theirs.eval()
    ours.eval()
    calls = _spy(ours)
    x = torch.randn(1, 1, 8, requires_grad=True)
    x_theirs = x.detach().clone().requires_grad_(True)
    theirs(x_theirs).square().sum().backward()
    ours(x).square().sum().backward()
    assert calls == [1]
    assert max_diff(x.grad, x_theirs.grad) <= TOL
    ours_grads = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if p.grad is not None:
            assert max_diff(ours_grads[name].grad, p.grad) <= TOL, name


def test_the_form_reads_the_live_weights() -> None:
    """Nothing is cached: a weight replaced through `.data` or written in place is what the next
    decode step uses."""
    theirs, ours = pair("Linear", Variant())
    theirs.eval()
    ours.eval()
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        ours(x)
        for layer in (theirs, ours):
            layer.lora_A["default"].weight.data = torch.full((2, 8), 0.25)
            layer.lora_B["default"].weight.mul_(-2.0)
            layer.base_layer.weight.data = layer.base_layer.weight.data * 3.0
        assert max_diff(theirs(x), ours(x)) <= TOL


def test_a_mixed_batch_of_one_row_routes_by_name() -> None:
    theirs, ours = pair("Linear", Variant())
    theirs.eval()
    ours.eval()
    calls = _spy(ours)
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        assert torch.equal(ours(x, adapter_names=["__base__"]), ours.base_layer(x))
        assert max_diff(theirs(x, adapter_names=["default"]), ours(x, adapter_names=["default"])) <= TOL
    assert not calls


@pytest.mark.parametrize("built", [True, False], ids=["built", "not-yet-built"])
def test_torch_compile_traces_the_row_form(built: bool) -> None:
    """Built by an eager decode step first, the trace takes the row form; not yet built, the
    general one (a trace cannot build fx graphs). Both equal PEFT's layer."""
    theirs, ours = pair("Linear", Variant())
    theirs.eval()
    ours.eval()
    if built:
        _spy(ours)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    with torch.no_grad():
        for x in (torch.randn(1, 1, 8), torch.randn(2, 3, 8)):  # one row, then the general form
            assert max_diff(compiled(x), theirs(x)) <= TOL


def test_the_form_is_built_at_the_first_decode_step_not_at_apply() -> None:
    _, ours = pair("Linear", Variant())
    ours.eval()
    with torch.no_grad():
        ours(torch.randn(2, 3, 8))
        lowered = ours._forwards.by_state[ours._key()]
        assert lowered.row.shape == (1, 1, 8) and lowered.row.compiled is None
        ours(torch.randn(1, 1, 8))
    assert ours._run_row is lowered.row.compiled is not None
