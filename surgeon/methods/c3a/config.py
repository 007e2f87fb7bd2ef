"""C3A as the language and PEFT's C3AConfig (0.21) know it. Torch-free.

PEFT's C3AConfig has no `exclude_modules`, so the language's `exclude` rule is not accepted.
`block_size_pattern` is a table option resolved per layer by the runtime with PEFT's own
matching (`re.match(rf".*\\.{key}$", path)`, first key in table order), so a table read from
a PEFT checkpoint selects exactly the layers PEFT's does.
"""

from __future__ import annotations

from collections.abc import Mapping

from surgeon.lang.kinds import Dict, Enum, Int
from surgeon.lang.values import Table, Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, Field, MethodConfig

INIT = Enum(("gaussian", "kaiming_uniform", "xavier_uniform"), bools=True)


class C3aConfig(MethodConfig):
    """C3A's hooks: the one kind PEFT adapts, the pattern table as plain pairs."""

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        pattern = options.get("block_size_pattern")
        if isinstance(pattern, Table):  # sites hold plain, JSON-able tuples
            options = dict(options, block_size_pattern=pattern.items)
        return options

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind != "Linear":
            return f"is a {kind}: PEFT's C3A adapts only Linear layers (`torch.nn.Linear`)"
        return None


CONFIG = C3aConfig(
    name="c3a",
    peft_type="C3A",
    fields=(
        Field("block_size", Int(lo=1), 256, doc="side of each circulant block; divides in and out"),
        Field("bias", Enum(("none", "all", "c3a_only")), "none", doc="which biases train"),
        Field("block_size_pattern", Dict(Int(lo=1)), Table(()),
              doc="block_size per layer: {key: size}, PEFT's `.*\\.key$` match"),
        Field("init_weights", INIT, "xavier_uniform", alias="init",
              doc="true: zeros (a no-op); false / xavier_uniform, kaiming_uniform, gaussian"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("block_size", "target_modules", "bias", "modules_to_save",
                             "layers_to_transform", "layers_pattern", "block_size_pattern",
                             "init_weights"),
    rules=frozenset({"target", "save"}),
    runtime="surgeon.methods.c3a.layer:METHOD",
    default_targets=("attn.q", "attn.v"),  # PEFT's C3A table is its LoRA table (gpt2 aside)
    site_options=("bias", "block_size", "block_size_pattern", "inference_mode", "init_weights"),
    summary=("block_size",),
    rule_hints=(("exclude", "PEFT's C3AConfig has no exclude_modules; narrow the target rule"),),
)
