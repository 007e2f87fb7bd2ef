"""FourierFT as the language and PEFT's FourierFTConfig (0.21) know it. Torch-free.

Each adapted layer trains `n_frequency` spectral coefficients at frequency locations drawn
from `random_loc_seed`; the weight delta is `scaling` times the real part of their inverse 2-D
FFT. `n_frequency_pattern` is a table option resolved per layer by the runtime with PEFT's own
matching (`re.match(rf".*\\.{key}$", path)`, first key in table order, else the exact path), so
a table read from a PEFT checkpoint sizes exactly the layers PEFT's does.
"""

from __future__ import annotations

from collections.abc import Mapping

from surgeon.lang.kinds import Bool, Dict, Enum, Int, Number
from surgeon.lang.values import Table, Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, Field, MethodConfig

# The base kinds PEFT's FourierFTModel wraps (`_create_new_module`: nn.Linear and Conv1D).
KINDS = ("Linear", "Conv1D")


class FourierFtConfig(MethodConfig):
    """FourierFT's hooks: fan_in_fan_out forced per kind, the pattern as plain pairs, the kinds."""

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        # PEFT forces it (with a warning): True exactly for transformers' Conv1D
        options = dict(options, fan_in_fan_out=kind == "Conv1D")
        pattern = options.get("n_frequency_pattern")
        if isinstance(pattern, Table):  # sites hold plain, JSON-able tuples
            options["n_frequency_pattern"] = pattern.items
        return options

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind not in KINDS:
            return f"is a {kind}: PEFT's FOURIERFT adapts only Linear and Conv1D layers"
        return None


CONFIG = FourierFtConfig(
    name="fourierft",
    peft_type="FOURIERFT",
    fields=(
        Field("n_frequency", Int(lo=1), 1000, doc="trained spectral coefficients per layer"),
        Field("scaling", Number(), 150.0, doc="factor of the delta (as LoRA's alpha)"),
        Field("random_loc_seed", Int(), 777, doc="seed of the frequency locations"),
        Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
        Field("bias", Enum(("none", "all", "fourier_only")), "none", doc="which biases train"),
        Field("n_frequency_pattern", Dict(Int(lo=1)), Table(()),
              doc="n_frequency per layer: {key: n}, PEFT's `.*\\.key$` match"),
        Field("init_weights", Bool(), False, alias="init",
              doc="true: a zero spectrum (a no-op); false: standard normal"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("n_frequency", "scaling", "random_loc_seed", "fan_in_fan_out",
                             "target_modules", "exclude_modules", "bias", "modules_to_save",
                             "layers_to_transform", "layers_pattern", "n_frequency_pattern",
                             "init_weights"),
    rules=frozenset({"target", "exclude", "save"}),
    runtime="surgeon.methods.fourierft.layer:METHOD",
    default_targets=("attn.q", "attn.v"),  # PEFT's FourierFT table is its LoRA table, except:
    default_names=(("gpt2", ("mlp.c_proj",)), ("gpt_bigcode", ("mlp.c_proj",))),
    site_options=("bias", "fan_in_fan_out", "inference_mode", "init_weights", "n_frequency",
                  "n_frequency_pattern", "random_loc_seed", "scaling"),
    summary=("n_frequency", "scaling"),
    rule_hints=(("rank", "FourierFT's per-layer size is n_frequency_pattern={key: n}"),),
)
