"""OFT as the language and PEFT's OFTConfig (0.21) know it. Torch-free.

PEFT sizes OFT's rotation by either `r` (blocks per layer) or `oft_block_size` (block side),
exactly one of them non-zero; each layer then derives the other from its input features
(adjusting a value that does not divide them, with a warning), so both stay site options and
the runtime (`layer.py`) does that per layer, as PEFT's `update_layer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from surgeon.lang.kinds import Bool, Enum, Int, Number
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, PROBABILITY, Field, MethodConfig, Problem

# The base kinds surgeon's OFT runtime implements (PEFT's also wraps Embedding).
KINDS = ("Linear", "Conv2d")


class OftConfig(MethodConfig):
    """OFT's hooks: the kinds it adapts, PEFT's r / oft_block_size rule."""

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        return dict(options, fan_in_fan_out=False)  # PEFT forces it off on Linear

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind == "Embedding":
            return "is an Embedding: surgeon's OFT adapts only Linear and Conv2d layers so far (PEFT's also Embedding)"
        if kind not in KINDS:
            return f"is a {kind}: PEFT's OFT adapts only Linear, Conv2d and Embedding layers"
        return None

    def check(self, values: Mapping[str, Value], stated: frozenset[str]) -> Iterable[Problem]:
        r, block = values["r"], values["oft_block_size"]
        if r == 0 and block == 0:
            yield Problem("r", "either `r` or `oft_block_size` must be non-zero")
        elif r != 0 and block != 0:
            field = "r" if "r" in stated else "oft_block_size"
            yield Problem(field, f"give either r ({r}) or oft_block_size ({block}), not both: "
                                 "r x oft_block_size == in_features",
                          hint="oft_block_size defaults to 32; with r=... also write oft_block_size=0")


CONFIG = OftConfig(
    name="oft",
    peft_type="OFT",
    fields=(
        Field("r", Int(lo=0), 0, doc="blocks per layer (0: derived from oft_block_size)"),
        Field("oft_block_size", Int(lo=0), 32, doc="side of each rotation block (0: from r)"),
        Field("module_dropout", PROBABILITY, 0.0, doc="multiplicative block dropout (unused by PEFT's forward)"),
        Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out)"),
        Field("bias", Enum(("none", "all", "oft_only")), "none", doc="which biases train"),
        Field("init_weights", Bool(), True, alias="init", doc="start as the identity rotation"),
        Field("coft", Bool(), False, doc="constrained OFT: project the rotation near identity"),
        Field("eps", Number(), 6e-5, doc="COFT's freedom of rotation"),
        Field("block_share", Bool(), False, doc="one rotation block shared by all blocks"),
        Field("use_cayley_neumann", Bool(), True, doc="Neumann series instead of a solve"),
        Field("num_cayley_neumann_terms", Int(lo=1), 5, doc="terms of the Neumann series"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("r", "oft_block_size", "module_dropout", "target_modules",
                             "fan_in_fan_out", "bias", "exclude_modules", "init_weights",
                             "layers_to_transform", "layers_pattern", "modules_to_save", "coft",
                             "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms"),
    rules=frozenset({"target", "exclude", "save"}),
    runtime="surgeon.methods.oft.layer:METHOD",
    default_targets=("attn.q", "attn.v"),  # PEFT's OFT table is its LoRA table
    site_options=("bias", "block_share", "coft", "eps", "inference_mode", "init_weights",
                  "module_dropout", "num_cayley_neumann_terms", "oft_block_size", "r",
                  "use_cayley_neumann"),
    summary=("r", "oft_block_size"),
    summary_flags=("coft", "block_share"),
)
