"""Capture by running (surgeon.capture.running): forwards whose Python control flow is decided by
input values that export cannot settle even on real values (`GuardOnDataDependentSymNode`).

Oracle: each toy module's own math (which projection is the query, which one reads the attention
output, which one expands into the activation), and its branches (a module the values never
reach is uncertain, not guessed).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgeon.capture import graph
from surgeon.capture.graph import CaptureError, capture
from surgeon.capture.infer import RolesError, infer_roles


class ChunkedAttention(nn.Module):
    """Attention within chunks listed by a grid of (rows, columns) tiles; chunks of one row are
    skipped. Which chunks exist is read by `.nonzero().tolist()`, so export gives up on it; a
    second MLP runs only when the chunks hold over 100 tokens."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.wide = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        bounds = _chunk_bounds(grid)
        x = x[:, :bounds[-1]]
        q, k, v = self.q(x), self.k(x), self.v(x)
        chunks = [F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b])
                  for a, b in itertools.pairwise(bounds)]
        h = x + self.o(torch.cat(chunks, 1))
        h = h + self.down(F.gelu(self.up(h)))
        if bounds[-1] > 100:
            h = h + self.wide(h)
        return h


def _chunk_bounds(grid: torch.Tensor) -> list[int]:
    """Token bounds of the chunks of more than one row, read from the grid's values."""
    bounds = [0]
    for i in (grid[:, 0] > 1).nonzero().flatten().tolist():
        bounds.append(bounds[-1] + int(grid[i, 0] * grid[i, 1]))
    return bounds


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 10, 8), torch.tensor([[1, 2], [2, 2], [3, 2]])  # chunks 4 and 6


def test_export_gives_up_and_running_captures_the_forward() -> None:
    captured = capture(ChunkedAttention().eval(), _inputs())
    assert captured.frontend == "run"
    targets = [str(n.target) for n in captured.graph.graph.nodes]
    assert targets.count("aten.scaled_dot_product_attention.default") == 2  # one per chunk
    assert targets.count("aten.linear.default") == 6  # linears stay single ops
    params = {str(n.target) for n in captured.graph.graph.nodes if n.op == "get_attr"}
    assert {"m.q.weight", "m.down.bias"} <= params  # weights named by their module paths


def test_roles_follow_the_math_of_the_run() -> None:
    roles = infer_roles(ChunkedAttention().eval(), example_inputs=_inputs())
    assert {p: str(r) for p, r in roles.items() if p != "wide"} == {
        "q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o", "up": "mlp.up",
        "down": "mlp.down"}
    assert not any(roles[p].uncertain for p in ("q", "k", "v", "o", "up", "down"))


def test_a_module_the_values_never_reach_is_uncertain() -> None:
    roles = infer_roles(ChunkedAttention().eval(), example_inputs=_inputs())
    assert roles["wide"] == "other"
    assert "never reached" in roles["wide"].uncertain  # refused by role selectors, not guessed


def test_the_other_branch_is_captured_when_the_values_take_it() -> None:
    x, grid = torch.randn(1, 200, 8), torch.tensor([[10, 10], [10, 10]])
    roles = infer_roles(ChunkedAttention().eval(), example_inputs=(x, grid))
    assert not roles["wide"].uncertain  # called: its output reaches the model's output alone
    assert roles["q"] == "attn.q" and roles["down"] == "mlp.down"


def test_the_users_model_is_left_untouched() -> None:
    model = ChunkedAttention().eval()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    ids = {name: id(p) for name, p in model.named_parameters()}
    capture(model, _inputs())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ids == {name: id(p) for name, p in model.named_parameters()}
    assert not any(m._forward_hooks for m in model.modules())


def test_too_large_to_copy_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph, "REAL_COPY_BYTES", 16)
    with pytest.raises(RolesError) as error:
        infer_roles(ChunkedAttention().eval(), example_inputs=_inputs())
    message = str(error.value)
    assert "GiB (the limit is" in message and "run:" not in message  # never run at all
    assert "--input" in message  # says what to do instead


def test_a_forward_failing_on_its_inputs_says_why() -> None:
    bad_grid = torch.tensor([[2.5, 2.0]])
    with pytest.raises(CaptureError) as error:
        capture(_Strict().eval(), (torch.randn(1, 4, 8), bad_grid))
    assert "run: ValueError: grid rows must be whole numbers" in str(error.value)


class _Strict(ChunkedAttention):
    """Refuses a grid it cannot read: the run front end reports the model's own error."""

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if not torch.equal(grid, grid.round()):
            raise ValueError("grid rows must be whole numbers")
        return super().forward(x, grid)


class _Noisy(nn.Module):
    """Adds noise it samples in forward (as ViLT samples patches): running it draws random numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x + torch.rand_like(x))


def test_running_leaves_the_callers_random_state_as_it_was() -> None:
    from surgeon.capture.running import trace_by_running

    model = _Noisy()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    traced = trace_by_running(model, (torch.zeros(2, 4),))
    assert torch.equal(torch.rand(3), expected)  # the trace's own draw did not shift the stream
    assert any(str(n.target) == "proj.weight" for n in traced.graph.nodes if n.op == "get_attr")


class _Escaping(nn.Module):
    """Data-dependent chunks (export gives up), and an activation that leaves torch on the way
    (`how`): the ops after it would read a constant, so the run's graph would cut the dataflow."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)
        self.scales = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(x[:, :_chunk_bounds(grid)[-1]]))
        if self.how == "numpy":
            h = torch.from_numpy(h.detach().numpy().copy())
        elif self.how == "item":
            h = h / h.abs().max().item()
        else:  # a weight read into Python: a constant whatever the input, the dataflow is whole
            h = h * self.scales.tolist()[0]
        return self.down(h)


def _small_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 10, 4), torch.tensor([[1, 2], [2, 2], [3, 2]])


@pytest.mark.parametrize("how", ["numpy", "item"])
def test_an_activation_leaving_torch_is_refused(how: str) -> None:
    with pytest.raises(CaptureError) as error:
        capture(_Escaping(how).eval(), _small_inputs())
    assert "run: ValuesLeftTheTrace: the forward takes a float activation out of torch" in str(error.value) \
        or "run: ValuesLeftTheTrace: the forward reads a float activation into a Python number" in str(error.value)


def test_a_weight_read_into_python_is_no_escape() -> None:
    model = _Escaping("weight").eval()
    assert capture(model, _small_inputs()).frontend == "run"
    roles = infer_roles(model, example_inputs=_small_inputs())
    assert (roles["up"], roles["down"]) == ("mlp.up", "mlp.down")
