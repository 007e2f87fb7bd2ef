"""The forward graph of an adapted layer: node builder, provenance tags, and the fast compile.

Every node a pass inserts carries `node.meta["surgeon"] = {"rule", "pass", "adapter", "role"}`:
`rule` is the `file:line:col` of the spec rule behind the adapter (`Site.rule`, "" for the
base call), `pass` the pass that inserted the node, `adapter` the adapter it belongs to (None
for the base call), and `role` one of: "input" (the `x` placeholder), "base" / "base_out" (the
base call, its last node), "branch", "rows" (a mixed-batch placeholder), "result" (the last
node of a branch's output part: a function of the previous result; `prev + delta` for LoRA,
`prev * scale` for IA3), "input_result" (the last node of a branch's input part: a function of
the previous input, which the base call then reads instead; IA3's feed-forward scaling),
"weight_result" (the last node of a weight part: the weight an inlined base call reads instead;
BOFT's rotated Conv2d kernel) or "epilogue" (a final cast back to the base output dtype).

A branch is the nodes of one adapter: an input part before the base call, an output part after
it, or both. Each part's *spine* is its `args[0]` chain: followed back from the part's end
through the adapter's own nodes, it reaches what the part transforms (`spine_source`). Removing a
branch is the same for every method: route each part end's users to its source, then erase
the adapter's nodes.

`compile_forward` turns the graph into the function the layer runs. It is the fx code with one
rewrite: `self.lora_A.default.weight` becomes `self._modules['lora_A']._modules['default']
._parameters['weight']`. On CPython 3.11 each `nn.Module.__getattr__` first fails the normal
lookup and raises an AttributeError internally (~1 us each); plain dict lookups cost ~40 ns and
still resolve live, so replaced parameters and `.to()` stay correct.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import operator
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import fx, nn

if TYPE_CHECKING:
    from surgeon.planning.site import Site

META = "surgeon"


class LayerView(Protocol):
    """What graph code reads from an adapted layer: the Builder, the passes and a method's
    `emit` are typed against this, not `surgeon.runtime.adapted.AdaptedLayer` (which implements
    it), so they stand on the IR alone and the layer can import them without a cycle."""

    base_layer: nn.Module  # the wrapped host module; graph targets start "base_layer."
    kind: str  # its `Site.kind`
    sites: dict[str, Site]  # every adapter on the layer, by name
    merged_adapters: list[str]  # adapters folded into the base weight, in merge order
    training: bool  # train-mode graphs keep dropout

    @property
    def path(self) -> str:
        """The layer's path in the host model (for error notes)."""
        ...

    def lowered_adapters(self) -> list[str]:
        """The adapters whose branch the whole-batch graph runs, in order."""
        ...

    def adapter_parameters(self, adapter: str) -> Iterator[nn.Parameter]:
        """The parameters of `adapter` on the layer."""
        ...

    def get_submodule(self, target: str) -> nn.Module: ...

    def __getattr__(self, name: str) -> Any:
        """The method's parameter containers (`lora_A`, ...), named by `MethodRuntime.containers`."""
        ...


def tag(node: fx.Node) -> dict[str, Any]:
    """The provenance tag of `node` (empty for untagged nodes such as placeholders)."""
    return node.meta.get(META, {})


class Builder:
    """Emits nodes before `anchor`, each tagged `dict(tag, role=...)`.

    Args:
        graph: the graph to edit.
        layer: the adapted layer the graph belongs to (attribute targets resolve against it).
        x: the node holding the layer input.
        anchor: nodes are inserted before it (the output or the epilogue).
        tag: provenance `{"rule", "pass", "adapter"}` for every node emitted.
        role: the role of emitted nodes ("base" or "branch"; `result` nodes say "result").
    """

    def __init__(self, graph: fx.Graph, layer: LayerView, x: fx.Node, anchor: fx.Node,
                 tag: dict[str, Any], role: str = "branch") -> None:
        self.graph, self.layer, self.x, self.anchor = graph, layer, x, anchor
        self.tag, self.role = tag, role

    def _new(self, op: str, target: Any, args: tuple, kwargs: dict | None = None,
             role: str | None = None) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs or {})
        node.meta[META] = dict(self.tag, role=role or self.role)
        return node

    def attr(self, target: str) -> fx.Node:
        """A `get_attr` of `target`, shared with the base or this adapter's nodes when present
        before the insertion point (a node defined later could not be read here)."""
        for node in self.graph.nodes:
            if node is self.anchor:
                break
            if node.op == "get_attr" and node.target == target and \
                    tag(node).get("adapter") in (None, self.tag["adapter"]):
                return node
        return self._new("get_attr", target, ())

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        return self._new("call_function", fn, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return self._new("call_method", name, args, kwargs)

    def module(self, target: str, *args: Any) -> fx.Node:
        return self._new("call_module", target, args)

    def result(self, prev: fx.Node, delta: fx.Node, alpha: float = 1.0) -> fx.Node:
        """The branch's result node: `prev + alpha * delta`, `prev` first (see module docstring);
        one `add(prev, delta, alpha)` node when `alpha != 1` (one kernel, not a mul and an add)."""
        if alpha == 1.0:
            return self._new("call_function", torch.add, (prev, delta), {}, role="result")
        return self._new("call_function", add, (prev, delta, alpha), {}, role="result")

    def index_result(self, prev: fx.Node, rows: fx.Node, delta: fx.Node, alpha: float) -> fx.Node:
        """Mixed-batch result: `prev` with `alpha * delta` added at `rows`."""
        return self._new("call_function", torch.index_add, (prev, 0, rows, self._scaled(delta, alpha)),
                         {}, role="result")

    def as_result(self, node: fx.Node) -> fx.Node:
        """Make `node` the branch's result: an output transform other than `prev + delta`
        (`prev * s`), whose spine (`args[0]` chain, see the module docstring) reaches `prev`."""
        node.meta[META]["role"] = "result"
        return node

    def before_base(self) -> Builder:
        """A Builder for the branch's input part: it emits before the base call, and its `x`
        is the input the base call reads now (the layer input, or an earlier input part's)."""
        first = next(n for n in self.graph.nodes if tag(n).get("role") in ("base", "base_out"))
        return Builder(self.graph, self.layer, _last_input(self.graph), first, self.tag, self.role)

    def input_result(self, node: fx.Node) -> fx.Node:
        """Make `node` (whose spine reaches this Builder's `x`) the input the base call reads:
        the end of the branch's input part. Use on a `before_base()` Builder."""
        node.meta[META]["role"] = "input_result"
        for user in list(self.x.users):
            if tag(user).get("role") in ("base", "base_out"):
                user.replace_input_with(self.x, node)
        return node

    def weight_part(self) -> Builder:
        """A Builder for the branch's weight part (BOFT's Conv2d rotates the kernel): it emits
        before the base call, and its `x` is the weight the inlined base call reads now (the
        base weight, or an earlier weight part's). Raises UserError for a module base call."""
        base = next(n for n in self.graph.nodes if tag(n).get("role") == "base_out")
        if base.op != "call_function":
            from surgeon.errors import UserError
            raise UserError(f"`{self.layer.path}`: this adapter rewrites the base weight, which "
                            "needs a plain torch layer (no hooks, subclass or padding mode)")
        return Builder(self.graph, self.layer, base.args[1], base, self.tag, self.role)

    def weight_result(self, node: fx.Node) -> fx.Node:
        """Make `node` (whose spine reaches this Builder's `x`) the weight the base call reads:
        the end of a `weight_part()` (removed like the other part ends)."""
        node.meta[META]["role"] = "weight_result"
        self.anchor.replace_input_with(self.x, node)
        return node

    def _scaled(self, delta: fx.Node, alpha: float) -> fx.Node:
        # A separate multiply, not `torch.add(..., alpha=)`: torch 2.13's inductor (CPU) drops
        # the alpha of an add fused with a matmul and computes wrong results.
        return delta if alpha == 1.0 else self.call(operator.mul, delta, alpha)


def add(prev: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """`prev + alpha * delta` as one `torch.add(..., alpha=)` kernel in eager mode (the decode
    hot path: one op fewer per adapter). Under torch.compile a separate multiply: torch 2.13's
    inductor (CPU) drops the alpha of an add fused with a matmul on 2-D inputs (wrong results)."""
    if torch.compiler.is_compiling():
        return torch.add(prev, delta * alpha)
    return torch.add(prev, delta, alpha=alpha)


# Outputs below this many elements (a decode step's) add as two kernels: fewer dispatches than
# `addmm_` and its three views, and nothing large to allocate.
_SMALL = 1 << 14


def expand_add(prev: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """`prev + alpha * h @ weight.T` (LoRA's expand and add; `h`: `(..., r)`, `weight`: `(out, r)`)
    as one `addmm`: no output-sized delta in between, nor its scaled gradient in the backward.
    Under torch.compile, on a tensor subclass (a DTensor's sharding rules) or a small output
    (`_SMALL`), the expand and `add`."""
    if torch.compiler.is_compiling() or type(prev) is not torch.Tensor or prev.numel() < _SMALL:
        return add(prev, torch._C._nn.linear(h, weight), alpha)
    out = torch.addmm(prev.reshape(-1, prev.shape[-1]), h.reshape(-1, h.shape[-1]), weight.t(),
                      alpha=alpha)
    return out.view(prev.shape)


def expand_add_(prev: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """`expand_add` written into `prev`, which the graph owns (a fresh base output no other node
    reads, see `owned`): one `addmm_` and no new output-sized tensor (at prefill, allocating and
    faulting in that tensor costs more than the adapter's GEMMs)."""
    if torch.compiler.is_compiling() or type(prev) is not torch.Tensor or not prev.is_contiguous():
        return expand_add(prev, h, weight, alpha)
    if prev.numel() < _SMALL:
        return torch.add(prev, torch._C._nn.linear(h, weight), alpha=alpha)
    prev.view(-1, prev.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), weight.t(), alpha=alpha)
    return prev


def lora_add_(prev: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              alpha: float) -> torch.Tensor:
    """LoRA's whole eval branch, `prev += alpha * (x @ a.T) @ b.T`, written into `prev` (owned,
    as for `expand_add_`). One input row (a decode step of one sequence) runs as two
    matrix-vector products on flat views, `mv` then `addmv_`: about half the dispatch cost of
    `linear` on 3-D inputs plus an `add`, which is most of a small layer's adapter cost. Any
    other shape is the shrink and `expand_add_`."""
    if (x.numel() == x.shape[-1] and type(prev) is torch.Tensor and prev.is_contiguous()
            and not torch.compiler.is_compiling()):
        prev.view(-1).addmv_(b, torch.mv(a, x.reshape(-1)), alpha=alpha)
        return prev
    return expand_add_(prev, torch._C._nn.linear(x, a), b, alpha)


# Calls whose result is a fresh tensor the graph may write into (see `owned`).
_WRITABLE = (torch._C._nn.linear, expand_add_, lora_add_)


def owned(b: Builder, prev: fx.Node) -> bool:
    """Whether the tensor of `prev` is the graph's own to write into: made by an inlined base
    `linear` or an earlier in-place branch, and read by no other node (only the anchor yet)."""
    return (prev.op == "call_function" and prev.target in _WRITABLE
            and all(user is b.anchor for user in prev.users))


def _format_target(base: str, target: str) -> str:
    """The attribute chain fx's codegen writes for `target` (see torch.fx.graph)."""
    expr = base
    for part in target.split("."):
        expr = f"{expr}.{part}" if part.isidentifier() else f'getattr({expr}, "{part}")'
    return expr


def _fast_target(root: nn.Module, target: str) -> str:
    """`target` as dict lookups: `_modules[...]` down the path, then the leaf's own dict."""
    expr, module = "self", root
    *path, leaf = target.split(".")
    for part in path:
        expr, module = f"{expr}._modules[{part!r}]", module._modules[part]
    for table in ("_parameters", "_buffers", "_modules"):
        if leaf in getattr(module, table):
            return f"{expr}.{table}[{leaf!r}]"
    return f"getattr({expr}, {leaf!r})"


def compile_forward(graph: fx.Graph, layer: nn.Module) -> Callable[..., Any]:
    """Compile `graph` into `forward(self, *inputs)` with fast attribute access (see above).

    Layers with the same structure generate the same source and share one function object.

    Args:
        graph: a linted graph whose attribute targets resolve in `layer`.
        layer: the module the function will be called with as `self`.
    """
    rewrites: dict[str, tuple[str, str]] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            rewrites[node.name] = (_format_target("self", node.target),
                                   _fast_target(layer, node.target))
    try:
        key = (_structure(graph), tuple(rewrites.items()))
        return _BY_STRUCTURE[key]
    except TypeError:  # an unhashable constant in the graph: no structural sharing
        key = None
    except KeyError:
        pass
    fn = _compile(graph, rewrites)
    if key is not None:
        if len(_BY_STRUCTURE) >= _MAX_CACHED:
            _BY_STRUCTURE.clear()
        _BY_STRUCTURE[key] = fn
    return fn


# Functions by graph structure: the layers of a model mostly share one or two structures, so
# all but the first skip fx's code generation (the bulk of lowering a layer).
_BY_STRUCTURE: dict[tuple, Callable[..., Any]] = {}
_MAX_CACHED = 1024


def _structure(graph: fx.Graph) -> tuple:
    """Everything fx's codegen reads from the nodes (names, ops, targets, types, arguments);
    constants keyed with their type so `2` and `2.0` stay distinct."""
    return tuple((n.name, n.op, n.target, n.type, _constant(n.args), _constant(n.kwargs))
                 for n in graph.nodes)


def _constant(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return ("%", value.name)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_constant(v) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, _constant(v)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor constants are not shared by structure")
    return (type(value), repr(value) if isinstance(value, float) else value)


def _compile(graph: fx.Graph, rewrites: dict[str, tuple[str, str]]) -> Callable[..., Any]:
    """fx's generated code with the attribute chains of `rewrites` replaced, exec'd."""

    def transform(body: list[str]) -> list[str]:
        out = []
        for fragment in body:
            var, sep, rhs = fragment.partition(" = ")
            if sep and var in rewrites and rhs.startswith(rewrites[var][0]):
                slow, fast = rewrites[var]
                fragment = f"{var} = {fast}{rhs[len(slow):]}"
            out.append(fragment)
        return out

    with graph.on_generate_code(lambda _: transform):
        code = graph.python_code(root_module="self")
    scope = tuple(sorted(code.globals.items(), key=lambda kv: kv[0]))
    try:
        return _exec_source(code.src, scope)
    except TypeError:  # an unhashable global: compile without sharing
        return _exec_source.__wrapped__(code.src, scope)


@functools.lru_cache(maxsize=1024)
def _exec_source(src: str, scope: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    """Exec generated source once per distinct (source, globals); registered for tracebacks."""
    filename = f"<surgeon-forward-{hashlib.sha1(src.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    namespace = dict(scope)
    exec(compile(src, filename, "exec"), namespace)  # noqa: S102 - code we generated
    return namespace["forward"]


def source_of(fn: Callable[..., Any]) -> str:
    """The generated source of a function made by `compile_forward` (for tests and viz)."""
    return "".join(linecache.getlines(fn.__code__.co_filename))


def node_summary(gm: fx.GraphModule) -> list[tuple[str, str, dict[str, Any]]]:
    """`(name, op, tag)` for every node: a compact view for tests and `surgeon viz`."""
    return [(n.name, n.op, tag(n)) for n in gm.graph.nodes]


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph` with its own node tags, to edit while the original stays in use."""
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))
    for node in new.nodes:
        if META in node.meta:
            node.meta[META] = dict(node.meta[META])
    return new


# The roles of nodes the base call may read as its input.
INPUTS = ("input", "input_result")


def _last_input(graph: fx.Graph) -> fx.Node:
    return [n for n in graph.nodes if tag(n).get("role") in INPUTS][-1]


def spine_source(end: fx.Node) -> fx.Node:
    """What a branch part ending at `end` transforms: its `args[0]` chain followed back to
    the first node that is not the same adapter's (`prev`, or the input the part replaces)."""
    adapter, node = tag(end).get("adapter"), end
    while tag(node).get("adapter") == adapter and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def branch_adapters(graph: fx.Graph) -> list[str]:
    """The adapters with a branch in `graph` (an input part, an output part or both), in graph
    order: input parts (before the base call) first, each part kind in insertion order."""
    ends = (n for n in graph.nodes if tag(n).get("role") in ("result", "input_result",
                                                               "weight_result"))
    return list(dict.fromkeys(tag(n)["adapter"] for n in ends))


def result_nodes(graph: fx.Graph) -> dict[str, fx.Node]:
    """Each adapter's branch result node, by adapter name."""
    return {tag(n)["adapter"]: n for n in graph.nodes if tag(n).get("role") == "result"}
