"""WaveFT as the language and PEFT's WaveFTConfig (0.21) know it. Torch-free.

PEFT's config accepts every name of its `WAVELET_REDUCTIONS` (db1-db38, sym2-sym20,
coif1-coif17) as `wavelet_family`, but PEFT 0.21 ships filters only for db1-db10, sym2-sym10 and
coif1-coif5 (its `wavelet.py`; the others fail when a layer is built). Those are the families
surgeon implements (`wavelets.py`) and the only ones the option accepts: any other is refused
at its span, with the list. `n_frequency_pattern` is a table option resolved per layer by
the runtime with PEFT's `get_pattern_key`; `proportional_parameters` (a budget shared across
all targeted layers) is not implemented and refused when set.
"""

from __future__ import annotations

from collections.abc import Mapping

from surgeon.lang.kinds import Bool, Dict, Enum, Int, Number
from surgeon.lang.values import Table, Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, Field, MethodConfig

# What PEFT's `Wavelet` has filters for, and surgeon implements.
SUPPORTED = (tuple(f"db{i}" for i in range(1, 11)) + tuple(f"sym{i}" for i in range(2, 11))
             + tuple(f"coif{i}" for i in range(1, 6)))
KINDS = ("Linear", "Conv1D")


class WaveftConfig(MethodConfig):
    """WaveFT's hooks: fan_in_fan_out forced per kind, the kinds PEFT adapts."""

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        pattern = options.get("n_frequency_pattern")
        if isinstance(pattern, Table):  # sites hold plain, JSON-able tuples
            options = dict(options, n_frequency_pattern=pattern.items)
        return dict(options, fan_in_fan_out=kind == "Conv1D")  # PEFT forces it (with a warning)

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind not in KINDS:
            return f"is a {kind}: PEFT's WaveFT adapts only Linear and Conv1D layers"
        return None


CONFIG = WaveftConfig(
    name="waveft",
    peft_type="WAVEFT",
    fields=(
        Field("n_frequency", Int(lo=1), 2592, doc="trained wavelet coefficients per layer"),
        Field("scaling", Number(), 25.0, doc="factor of the reconstructed delta weight"),
        Field("wavelet_family", Enum(SUPPORTED), "db1", doc="wavelet of the inverse transform"),
        Field("use_idwt", Bool(), True, doc="false: the coefficients are the delta itself"),
        Field("random_loc_seed", Int(lo=0), 777, doc="seed of the coefficients' positions"),
        Field("fan_in_fan_out", Bool(), False, doc="base weight stored (in, out), as GPT-2's Conv1D"),
        Field("bias", Enum(("none", "all", "waveft_only")), "none", doc="which biases train"),
        Field("n_frequency_pattern", Dict(Int(lo=1)), Table(()),
              doc="n_frequency per layer: {key: count}, PEFT's pattern match"),
        Field("proportional_parameters", Bool(), False,
              doc="share n_frequency x layers across layers by size (not implemented)"),
        Field("init_weights", Bool(), True, alias="init", doc="true: zeros; false: 0.01 * randn"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("n_frequency", "scaling", "wavelet_family", "use_idwt",
                             "random_loc_seed", "fan_in_fan_out", "target_modules",
                             "exclude_modules", "bias", "modules_to_save", "layers_to_transform",
                             "layers_pattern", "n_frequency_pattern", "proportional_parameters",
                             "init_weights"),
    rules=frozenset({"target", "exclude", "save"}),
    runtime="surgeon.methods.waveft.layer:METHOD",
    default_targets=("attn.q", "attn.v"),  # PEFT's WaveFT table: q/v as LoRA's (gpt2 aside)
    site_options=("bias", "fan_in_fan_out", "inference_mode", "init_weights", "n_frequency",
                  "n_frequency_pattern", "random_loc_seed", "scaling", "use_idwt",
                  "wavelet_family"),
    unimplemented=("proportional_parameters",),
    summary=("n_frequency", "wavelet_family"),
)
