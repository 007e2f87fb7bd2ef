"""The captured graph seen as dataflow: what each node does, and which tensors flow where.

Role rules never look at fx directly. `Flow` sorts every node into a few kinds (a projection
that applies a weight, a matmul of two activations, an attention call, a softmax, an
activation, a norm, a slice, ...) for both graph flavours: aten ops from `torch.export` and
torch functions / leaf modules from `symbolic_trace`. Edges are floating-point tensors only:
integer indices (MoE routing, positions) and SymInts would otherwise connect everything.
Module names serve only to say which module owns a weight (`nn_module_stack`, `get_attr`).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import fx, nn

from surgeon.capture.contractions import contraction
from surgeon.capture.graph import Capture
from surgeon.capture.ops import op_name
from surgeon.capture.writes import pieces, written_bases
from surgeon.layer_kinds import FAMILY, kind_of

# Node kinds. PASS is anything data flows through unchanged in kind (views, casts, adds, ...).
PARAM, INPUT, OUTPUT, PROJ, MATMUL, SDPA, SOFTMAX, TOPK, ACT, NORM, REDUCE, SLICE, PASS = (
    "param", "input", "output", "proj", "matmul", "sdpa", "softmax", "topk", "act", "norm",
    "reduce", "slice", "pass")

_MATMULS = {"linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "addbmm", "einsum",
            "grouped_mm_fallback", "_grouped_mm", "grouped_mm"}
_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
          "conv_transpose2d", "conv_transpose3d"}
_NAMED = {
    SDPA: {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_cudnn_attention"},
    SOFTMAX: {"softmax", "_softmax", "_safe_softmax"},
    TOPK: {"topk", "argmax", "argmin", "argsort", "sort"},
    ACT: {"gelu", "silu", "relu", "relu6", "sigmoid", "tanh", "softplus", "mish", "elu", "selu",
          "celu", "leaky_relu", "hardswish", "hardsigmoid", "hardtanh", "erf", "glu", "gelu_",
          "expm1", "log1p", "log_sigmoid", "softsign", "prelu", "rrelu"},
    NORM: {"layer_norm", "native_layer_norm", "rms_norm", "group_norm", "native_group_norm",
           "batch_norm", "native_batch_norm", "instance_norm", "_native_batch_norm_legit",
           "_native_batch_norm_legit_no_training"},
    REDUCE: {"mean", "sum", "var", "var_mean", "std", "amax", "amin", "max", "min", "norm",
             "linalg_vector_norm", "cumsum", "logsumexp", "prod"},
    SLICE: {"getitem", "slice", "select", "narrow", "split", "chunk", "unbind", "split_with_sizes",
            "tensor_split", "unsafe_split"},
}
_KIND_OF_NAME = {name: kind for kind, names in _NAMED.items() for name in names}
# Ops a weight passes through between its parameter and the op that applies it.
_WEIGHT_VIEWS = {"t", "transpose", "permute", "numpy_T", "view", "reshape", "expand", "to",
                 "_to_copy", "contiguous", "clone", "select", "index", "slice", "unsqueeze",
                 "squeeze", "alias", "detach", "detach_", "lift_fresh_copy", "type_as", "float", "half",
                 "bfloat16", "getitem"}
_WEIGHT_SCALES = {"mul", "div", "mul_", "div_"}
_MODULE_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Softmax, SOFTMAX), (nn.LayerNorm, NORM), (nn.GroupNorm, NORM), (nn.modules.batchnorm._BatchNorm, NORM),
    (nn.GELU, ACT), (nn.SiLU, ACT), (nn.ReLU, ACT), (nn.Sigmoid, ACT), (nn.Tanh, ACT), (nn.Mish, ACT),
    (nn.GLU, ACT), (nn.LeakyReLU, ACT), (nn.ELU, ACT), (nn.Softplus, ACT), (nn.Hardswish, ACT),
)


def adaptable_kind(module: nn.Module) -> str | None:
    """"linear", "conv" or "embedding" for a layer PEFT can adapt (`surgeon.layer_kinds`), else None."""
    kind = kind_of(module)
    return None if kind is None else FAMILY[kind]


@dataclass(frozen=True)
class Proj:
    """A node that applies a weight to data: a linear, a convolution or an embedding lookup."""

    node: fx.Node
    kind: str  # "linear", "conv" or "embedding"
    data: fx.Node  # the activation (or index) operand
    module: str | None  # canonical path of the adaptable layer owning the weight, if any
    param: str | None = None  # canonical path of the weight parameter itself (MoE expert stacks)


class Flow:
    """Kinds, float-tensor edges, projections and input origins of one captured graph."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.nodes: list[fx.Node] = list(capture.graph.graph.nodes)
        self._names = _canonical_names(capture.model)
        self.kind: dict[fx.Node, str] = {}
        self.projs: dict[fx.Node, Proj] = {}
        self._contracted: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}  # sum(a * b) -> (a, b)
        for node in self.nodes:
            self._classify(node)

    # ---- edges -------------------------------------------------------------------------------
    def operands(self, matmul: fx.Node) -> tuple[Any, Any]:
        """(left, right) activation operands of a MATMUL node: a matmul-like op, or a contraction
        written by hand (`(q[..., :, None, :] * k[..., None, :, :]).sum(-1)`)."""
        if matmul in self._contracted:
            return self._contracted[matmul]
        name = op_name(matmul)
        args = _matmul_operands(matmul, name)
        return args[0], args[1]

    def inputs(self, node: fx.Node, writes: bool = False) -> list[fx.Node]:
        """Float-tensor operands of `node` (parameters excluded) whose values it reads; a piece
        of a concatenation reads only the part it takes (`_pieces`). With `writes`, a node
        reading a tensor written in place earlier (`buffer[:, i] = x`) reads those writes too
        (Longformer assembles its banded scores so, into a zeros buffer)."""
        if node in self._pieces:
            return [self._pieces[node]]
        found = [n for n in _data_inputs(node) if self.kind[n] != PARAM and _is_float(n)]
        if writes:
            order = self._order[node]
            found += [w for n in found for w in self._writes_into.get(n, ()) if self._order[w] < order]
        return found

    def users(self, node: fx.Node, writes: bool = False) -> list[fx.Node]:
        """Nodes that read `node`'s values as float data (not only its dtype or shape); with
        `writes`, an in-place write (`out[:, i] = x`) is read by the later readers of the tensor
        written into. Only the walk from an attention core to its output follows writes: a
        recurrence written step by step (RWKV's WKV) would otherwise look pointwise."""
        if not _is_float(node):
            return []
        found = [u for u in node.users if node in _data_inputs(u)]
        base = self._written_base.get(node) if writes else None
        if base is not None:
            found += [u for u in base.users if base in _data_inputs(u)
                      and u not in self._written_base and self._order[u] > self._order[node]]
        return found

    @cached_property
    def _order(self) -> dict[fx.Node, int]:
        return {n: i for i, n in enumerate(self.nodes)}

    @cached_property
    def _written_base(self) -> dict[fx.Node, fx.Node]:
        return written_bases(self.nodes)

    @cached_property
    def _writes_into(self) -> dict[fx.Node, list[fx.Node]]:
        found: dict[fx.Node, list[fx.Node]] = {}
        for write, base in self._written_base.items():
            found.setdefault(base, []).append(write)
        return found

    @cached_property
    def _pieces(self) -> dict[fx.Node, fx.Node]:
        return pieces(self.nodes, self._channel_step)

    def _channel_step(self, node: fx.Node) -> fx.Node | None:
        """The one input of a step that keeps channels apart (a view, a cast, an activation, a
        depthwise convolution), else None."""
        if self.is_depthwise(node):
            inputs = [self.projs[node].data]
        elif self.kind.get(node) in (PASS, ACT, SLICE):
            inputs = [n for n in _data_inputs(node) if self.kind.get(n) != PARAM and _is_float(n)]
        else:
            return None
        return inputs[0] if len(inputs) == 1 and isinstance(inputs[0], fx.Node) else None

    def is_depthwise(self, node: fx.Node) -> bool:
        """A depthwise convolution: one filter per channel (a short convolution along time)."""
        proj = self.projs.get(node)
        if proj is None or proj.kind != "conv" or proj.module is None:
            return False
        module = self.capture.model.get_submodule(proj.module)
        groups = getattr(module, "groups", 1)
        channels = getattr(module, "in_channels", 0)
        return groups > 1 and groups == channels == getattr(module, "out_channels", -1)

    @cached_property
    def origins(self) -> dict[fx.Node, frozenset[str]]:
        """The user inputs each node depends on, through every tensor edge but SymInts."""
        found: dict[fx.Node, frozenset[str]] = {}
        for node in self.nodes:
            if self.kind[node] == INPUT:
                found[node] = frozenset({node.name})
                continue
            deps = [found[n] for n in node.all_input_nodes if n in found and not _is_symint(n)]
            found[node] = frozenset().union(*deps)
        return found

    def walk_back(self, start: fx.Node, through: frozenset[str], collect: frozenset[str],
                  writes: bool = False) -> list[fx.Node]:
        """Nodes of a `collect` kind reached backwards from `start` (itself included) through
        nodes of a `through` kind, nearest first. `writes`: see `inputs`."""
        return self._walk([start], through, collect, forward=False, include_start=True, writes=writes)

    def walk_forward(self, start: fx.Node, through: frozenset[str], collect: frozenset[str],
                     writes: bool = False) -> list[fx.Node]:
        """Nodes of a `collect` kind reached forwards from `start` through `through` kinds;
        a projection counts only where the walk arrives at its data operand. `writes`: see
        `users`."""
        return self._walk([start], through, collect, forward=True, include_start=False, writes=writes)

    def _walk(self, start: Iterable[fx.Node], through: frozenset[str], collect: frozenset[str],
              forward: bool, include_start: bool, writes: bool = False) -> list[fx.Node]:
        found: list[fx.Node] = []
        seen: set[fx.Node] = set()
        queue: deque[tuple[fx.Node | None, fx.Node]] = deque((None, n) for n in start)
        while queue:
            came_from, node = queue.popleft()
            if node in seen:
                continue
            seen.add(node)
            kind = self.kind[node]
            if came_from is not None or include_start:
                if kind in collect and self._arrives_at_data(came_from, node, forward):
                    found.append(node)
                    continue
                if kind not in through:
                    continue
            nexts = self.users(node, writes) if forward else self.inputs(node, writes)
            queue.extend((node, n) for n in nexts)
        return found

    def _arrives_at_data(self, came_from: fx.Node | None, node: fx.Node, forward: bool) -> bool:
        return not (forward and node in self.projs and self.projs[node].data is not came_from)

    def input_name(self, node: fx.Node) -> str:
        """The model's name for a placeholder (`input_ids`), or its graph name."""
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        names = self.capture.inputs
        return names[placeholders.index(node)] if len(names) == len(placeholders) else node.name

    # ---- module paths ------------------------------------------------------------------------
    def scope(self, node: fx.Node) -> str:
        """Canonical path of the innermost module `node` ran in ("" at the top level)."""
        stack = node.meta.get("nn_module_stack")
        if stack:
            return self.canonical(_strip_call_index(list(stack.values())[-1][0]))
        return self.canonical(str(node.target)) if node.op == "call_module" else ""

    def canonical(self, path: str) -> str:
        """`path` (graph spelling) as the model's first name for that module."""
        prefix = self.capture.prefix
        if prefix and path.startswith(prefix):
            path = path[len(prefix):]
        elif prefix and path == prefix.rstrip("."):
            path = ""
        try:
            return self._names.get(id(self.capture.model.get_submodule(path)), path)
        except AttributeError:
            return path

    @cached_property
    def called_modules(self) -> set[str]:
        """Canonical paths of every module that ran during the trace."""
        called: set[str] = set()
        for node in self.nodes:
            for path, _ in (node.meta.get("nn_module_stack") or {}).values():
                called.add(self.canonical(_strip_call_index(path)))
            if node.op == "call_module":
                called.add(self.canonical(str(node.target)))
        return called

    # ---- classification ----------------------------------------------------------------------
    def _classify(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            self.kind[node] = PARAM
        elif node.op == "placeholder":
            self.kind[node] = INPUT
        elif node.op == "output":
            self.kind[node] = OUTPUT
        elif node.op == "call_module":
            self._classify_module(node)
        else:
            self._classify_function(node, op_name(node))

    def _classify_module(self, node: fx.Node) -> None:
        module = self.capture.graph.get_submodule(str(node.target))
        kind = adaptable_kind(module)
        if kind is not None:
            self._add_proj(node, kind, node.args[0], self.canonical(str(node.target)))
            return
        self.kind[node] = next((k for t, k in _MODULE_KINDS if isinstance(module, t)), PASS)

    def _classify_function(self, node: fx.Node, name: str) -> None:
        if name in _MATMULS:
            operands = _matmul_operands(node, name)
            weights = [o for o in operands if self._weight_param(o) is not None]
            if name == "linear" and operands[1] in weights:  # linear's weight is its second operand,
                weights = [operands[1]]  # even when its data is a parameter too (learned queries)
            data = [o for o in operands if o not in weights]
            if len(weights) == 1 and len(data) == 1:
                self._add_proj(node, "linear", data[0], self._owner(node, weights[0]),
                               self._weight_param(weights[0]))
            else:
                self.kind[node] = MATMUL if len(data) == 2 else PASS
        elif name in _CONVS and len(node.args) > 1 and self._weight_param(node.args[1]) is not None:
            self._add_proj(node, "conv", node.args[0], self._owner(node, node.args[1]))
        elif name == "embedding" and self._weight_param(node.args[0]) is not None:
            self._add_proj(node, "embedding", node.args[1], self._owner(node, node.args[0]))
        elif name in ("max", "min") and _uses_indices(node):
            self.kind[node] = TOPK  # max(dim) whose indices select (phimoe's sparsemixer)
        elif name in ("mul", "div") and self._normalises(node):
            # by hand: a norm, x * rsqrt(mean(x^2) + eps), or a softmax, exp(x) / sum(exp(x))
            self.kind[node] = self._normalises(node)
        elif name == "sum" and (pair := contraction(node)) is not None:
            self.kind[node] = MATMUL  # an einsum written by hand
            self._contracted[node] = pair
        elif name in ("max", "min", "clamp", "clamp_min", "clamp_max", "maximum", "minimum") \
                and not _reduces(node):
            self.kind[node] = PASS  # elementwise clamps (of scores, of activations)
        else:
            self.kind[node] = _KIND_OF_NAME.get(name, PASS)

    def _normalises(self, node: fx.Node) -> str:
        """NORM for `x * f(reduce(g(x)))` (RMSNorm, LayerNorm written by hand: one operand scaled
        by a statistic of itself, whatever the ops between); SOFTMAX for `exp(x) / sum(exp(x))`;
        "" otherwise."""
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2:
            return ""
        for data, scale in (operands, operands[::-1]):
            sources = _cast_chain(data)
            for reduce in self._statistics(scale):
                if any(n in sources for n in _chain_back(reduce, 4)):
                    exp = op_name(data) == "exp" and op_name(reduce) == "sum"
                    return SOFTMAX if exp and op_name(node) == "div" else NORM
        return ""

    def _statistics(self, node: fx.Node) -> list[fx.Node]:
        """Reductions a few elementwise steps behind `node` (rsqrt(mean(...) + eps))."""
        found, frontier = [], [node]
        for _ in range(5):
            nexts = []
            for n in frontier:
                if self.kind.get(n) == REDUCE:
                    found.append(n)
                elif self.kind.get(n) in (PASS, ACT) and n.op == "call_function":
                    nexts.extend(a for a in n.all_input_nodes if self.kind.get(a) != PARAM)
            frontier = nexts
        return found

    def _add_proj(self, node: fx.Node, kind: str, data: Any, module: str | None,
                  param: str | None = None) -> None:
        self.kind[node] = PROJ
        self.projs[node] = Proj(node, kind, data, module, param)

    def _weight_param(self, operand: Any) -> str | None:
        """The parameter path behind a weight operand (through views, transposes, expert selects)."""
        while isinstance(operand, fx.Node):
            if operand.op == "get_attr":
                path = self.canonical_param(str(operand.target))
                return path if self._holds(path) else None
            if operand.op not in ("call_function", "call_method") or not _weight_step(operand):
                return None
            operand = operand.args[0] if operand.args else None
        return None

    def _holds(self, path: str) -> bool:
        """Whether the model holds a tensor at `path`: export lifts tensors the forward makes
        (`lifted_tensor_0`) into graph constants that belong to no module."""
        owner, _, name = path.rpartition(".")
        try:
            return isinstance(getattr(self.capture.model.get_submodule(owner), name), torch.Tensor)
        except AttributeError:
            return False

    def canonical_param(self, target: str) -> str:
        owner, _, name = target.rpartition(".")
        return f"{self.canonical(owner)}.{name}" if owner else name

    def _owner(self, node: fx.Node, weight: Any) -> str | None:
        """The adaptable layer applying `weight`: the innermost module the node ran in when that
        module holds this very weight (tied lm heads), else the parameter's own module."""
        param = self._weight_param(weight)
        assert param is not None
        owner, _, name = param.rpartition(".")
        model = self.capture.model
        tensor = getattr(model.get_submodule(owner), name)
        for path in (self.scope(node), owner):
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if adaptable_kind(module) and any(p is tensor for p in module.parameters(recurse=False)):
                return path
        return None


def _weight_step(node: fx.Node) -> bool:
    """A step a weight takes on its way to the op applying it: a view, or a constant rescale
    (rwkv rescales its weights in place at inference)."""
    name = op_name(node)
    if name in _WEIGHT_VIEWS:
        return True
    return name in _WEIGHT_SCALES and not any(isinstance(a, fx.Node) for a in node.args[1:])


# Ops that read only the dtype/shape of their operands after the first (`x.type_as(y)`), or of
# every operand (`zeros_like(y)`): no data flows from those operands.
_FIRST_ONLY = {"type_as", "expand_as", "view_as", "reshape_as", "_assert_tensor_metadata"}
_NO_DATA = {"empty_like", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
            "new_empty", "new_full", "rand_like", "randn_like", "sym_size", "size"}


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    if node.op not in ("call_function", "call_method"):
        return list(node.all_input_nodes)
    name = op_name(node)
    if name in _NO_DATA:
        return []
    if name in _FIRST_ONLY:
        return [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []
    return list(node.all_input_nodes)


def _reduces(node: fx.Node) -> bool:
    """max/min over a dimension (a reduction), not max/min of two tensors (a clamp)."""
    return op_name(node) in ("max", "min") and not (len(node.args) > 1 and isinstance(node.args[1], fx.Node))


def _cast_chain(node: fx.Node) -> set[fx.Node]:
    """`node` and what it is a cast or view of (the norm's input before `.float()`)."""
    found = {node}
    while node.op == "call_function" and op_name(node) in ("to", "_to_copy", "float", "type_as",
                                                          "view", "reshape", "alias", "contiguous"):
        node = node.args[0]
        if not isinstance(node, fx.Node):
            break
        found.add(node)
    return found


def _chain_back(node: fx.Node, steps: int) -> set[fx.Node]:
    """Nodes up to `steps` first-operand steps behind `node` (mean <- pow <- float <- x)."""
    found: set[fx.Node] = set()
    for _ in range(steps):
        if not node.args or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
        found.add(node)
    return found


def _uses_indices(node: fx.Node) -> bool:
    """max(dim)/min(dim) whose indices are read (export unpacks both halves, used or not)."""
    return any(op_name(u) == "getitem" and u.args[1] == 1 and u.users for u in node.users)


def _matmul_operands(node: fx.Node, name: str) -> list[Any]:
    if name == "linear":
        return [node.args[0], node.args[1]]
    if name in ("addmm", "baddbmm", "addbmm"):
        return [node.args[1], node.args[2]]
    if name == "einsum":
        return list(node.args[1])
    return [node.args[0], node.args[1]]


def _is_float(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if val is None:
        return node.op != "get_attr"
    if isinstance(val, (list, tuple)):
        return any(_is_data(v) for v in val)
    return _is_data(val)


def _is_data(val: Any) -> bool:
    """A floating-point or complex tensor (RoPE applied as a complex product, Llama 4)."""
    return isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex())


def _is_symint(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, int))


def _strip_call_index(path: str) -> str:
    """nn_module_stack spells the n-th call of a module `path@n`."""
    return re.sub(r"@\d+", "", path)


def _canonical_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}
