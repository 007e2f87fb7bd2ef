"""BOFT as the language and PEFT's BOFTConfig (0.21) know it. Torch-free.

PEFT sizes the butterfly blocks by either `boft_block_size` or `boft_block_num`, exactly one of
them non-zero; each layer derives the other from its input features (a Conv2d's count its
kernel) and refuses a value that does not divide them, so both stay site options and the
runtime (`layer.py`) checks them per layer at plan time, as PEFT's `update_layer` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from surgeon.lang.kinds import Bool, Enum, Int
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, PROBABILITY, Field, MethodConfig, Problem

KINDS = ("Linear", "Conv2d")


class BoftConfig(MethodConfig):
    """BOFT's hooks: the kinds it adapts, PEFT's block size / block number rule."""

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        return dict(options, fan_in_fan_out=False) if kind == "Linear" else options  # as PEFT

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind not in KINDS:
            return f"is a {kind}: PEFT's BOFT adapts only Linear and Conv2d layers"
        return None

    def check(self, values: Mapping[str, Value], stated: frozenset[str]) -> Iterable[Problem]:
        size, num = values["boft_block_size"], values["boft_block_num"]
        if size == 0 and num == 0:
            yield Problem("boft_block_size", "either `boft_block_size` or `boft_block_num` must be non-zero")
        elif size != 0 and num != 0:
            field = "boft_block_num" if "boft_block_num" in stated else "boft_block_size"
            yield Problem(field, f"give either boft_block_size ({size}) or boft_block_num ({num}), not "
                                 "both: boft_block_size x boft_block_num == in_features",
                          hint="boft_block_size defaults to 4; with boft_block_num=... also write "
                               "boft_block_size=0")


CONFIG = BoftConfig(
    name="boft",
    peft_type="BOFT",
    fields=(
        Field("boft_block_size", Int(lo=0), 4, alias="block_size", doc="side of each block (0: from block_num)"),
        Field("boft_block_num", Int(lo=0), 0, alias="block_num", doc="blocks per layer (0: from block_size)"),
        Field("boft_n_butterfly_factor", Int(lo=1), 1, alias="butterfly",
              doc="butterfly factors (1: plain block-diagonal OFT)"),
        Field("boft_dropout", PROBABILITY, 0.0, alias="dropout",
              doc="multiplicative dropout: blocks set to the identity in training"),
        Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out)"),
        Field("bias", Enum(("none", "all", "boft_only")), "none", doc="which biases train"),
        Field("init_weights", Bool(), True, alias="init", doc="start as the identity rotation"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor",
                             "target_modules", "exclude_modules", "boft_dropout", "fan_in_fan_out",
                             "bias", "modules_to_save", "init_weights", "layers_to_transform",
                             "layers_pattern"),
    rules=frozenset({"target", "exclude", "save"}),
    runtime="surgeon.methods.boft.layer:METHOD",
    default_targets=("attn.q", "attn.v"),  # PEFT's BOFT table is its LoRA table
    site_options=("bias", "boft_block_num", "boft_block_size", "boft_dropout",
                  "boft_n_butterfly_factor", "inference_mode", "init_weights"),
    summary=("boft_block_size", "boft_block_num", "boft_n_butterfly_factor"),
)
