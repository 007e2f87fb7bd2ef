"""VB-LoRA as the language and PEFT's VBLoRAConfig (0.21) know it. Torch-free.

Each layer trains logits `vblora_logits_A` `(r, in / L, N)` and `vblora_logits_B` `(out / L, r,
N)` over ONE vector bank `(N, L)` per adapter shared by every adapted layer (`num_vectors` N,
`vector_length` L), itself trained. The checkpoint holds the bank once, as PEFT's
`base_model.vblora_vector_bank` (`shared_keys`), and with `save_only_topk_weights` each logits
tensor as its top-k indices and k-1 softmax weights (`layer.py`'s checkpoint codec): such a
checkpoint loads for inference and merging, as in PEFT, not for training.
"""

from __future__ import annotations

from collections.abc import Mapping

from surgeon.lang.kinds import Bool, Enum, Int, Number
from surgeon.lang.values import Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, PROBABILITY, Field, MethodConfig

# The base kinds PEFT's VBLoRAModel wraps (`_create_new_module`).
KINDS = ("Linear", "Conv1D")

# PEFT's VBLoRA table where it differs from its LoRA table (which the roles q, v follow).
TABLE = (
    ("t5", ("q", "k", "v", "o", "wi", "wo")),
    ("mt5", ("q", "k", "v", "o", "wi_0", "wi_1", "wo")),
    ("bart", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    ("opt", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    ("deberta-v2", ("query_proj", "key_proj", "value_proj", "dense")),
)


class VbloraConfig(MethodConfig):
    """VB-LoRA's hooks: fan_in_fan_out forced per kind, the kinds PEFT adapts (the sizes each
    module must have, and top-k <= bank, are the runtime's `module_problem`)."""

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        # PEFT forces it (with a warning): True exactly for transformers' Conv1D
        return dict(options, fan_in_fan_out=kind == "Conv1D")

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind not in KINDS:
            return f"is a {kind}: PEFT's VBLORA adapts only Linear and Conv1D layers"
        return None



CONFIG = VbloraConfig(
    name="vblora",
    peft_type="VBLORA",
    fields=(
        Field("r", Int(lo=1), 4, doc="rank of the composed low-rank factors"),
        Field("num_vectors", Int(lo=1), 256, doc="vectors in the shared bank"),
        Field("vector_length", Int(lo=1), 256, doc="length of each bank vector (divides in and out features)"),
        Field("topk", Int(lo=1), 2, doc="bank vectors mixed per sub-vector"),
        Field("save_only_topk_weights", Bool(), False, doc="save top-k indices and weights only (inference)"),
        Field("vblora_dropout", PROBABILITY, 0.0, alias="dropout", doc="dropout on the input"),
        Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
        Field("bias", Enum(("none", "all", "vblora_only")), "none", doc="which biases train"),
        Field("init_vector_bank_bound", Number(), 0.02, doc="the bank starts uniform in +-bound"),
        Field("init_logits_std", Number(), 0.1, doc="std of the initial logits"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("r", "num_vectors", "vector_length", "topk", "target_modules",
                             "exclude_modules", "save_only_topk_weights", "vblora_dropout",
                             "fan_in_fan_out", "bias", "modules_to_save", "init_vector_bank_bound",
                             "init_logits_std", "layers_to_transform", "layers_pattern"),
    rules=frozenset({"target", "exclude", "save"}),
    runtime="surgeon.methods.vblora.layer:METHOD",
    default_targets=("attn.q", "attn.v"),
    default_names=TABLE,
    rank_field="r",
    site_options=("bias", "fan_in_fan_out", "inference_mode", "init_logits_std", "init_vector_bank_bound",
                  "num_vectors", "save_only_topk_weights", "topk", "vblora_dropout", "vector_length"),
    summary=("r", "num_vectors", "vector_length", "topk"),
    shared_keys=("vblora_vector_bank",),
    checkpoint_codec="surgeon.methods.vblora.layer:CODEC",
)
