"""OSF as the language and PEFT's OSFConfig (0.21) know it. Torch-free.

OSF splits each targeted Linear's weight by SVD: the top `effective_rank` singular directions
stay frozen, the rest (`U_low`, `S_low`, `V_low`) train, their gradients projected away from
the frozen subspace. `effective_rank` is per layer: an int, a float in (0, 1] (a fraction of the
smaller weight dimension), or null (half of it). PEFT's `rank_pattern` overrides it with the
first key that `re.search`es the module path (not PEFT's usual suffix match), so here it is an
option holding PEFT's table, not a `rank` rule. PEFT's config has no exclude or layer fields.

Classic placement: PEFT's OSF table (by `config.model_type`, `default_names`). PEFT falls back
to all-linear for a model type it does not list; surgeon asks for a target rule instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from surgeon.lang.kinds import Bool, Dict, Int, Number
from surgeon.lang.values import Table, Value
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, Field, MethodConfig, Problem

_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
# PEFT 0.21's TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING, model_type -> names.
DEFAULT_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (model_type, _ALL) for model_type in ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2",
                                          "gemma3_text", "qwen2", "qwen3", "phi")
) + (
    ("gpt2", ("c_attn", "c_proj")),
    ("bloom", ("query_key_value", "dense_4h_to_h")),
    ("opt", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    ("gptj", ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")),
    ("gpt_neox", ("query_key_value", "dense_4h_to_h")),
    ("falcon", ("query_key_value", "dense_4h_to_h")),
    ("gpt_bigcode", ("c_attn", "c_proj")),
)
RANK_HINT = ("OSF's per-module ranks are the option rank_pattern={\"regex\": rank, ...} (PEFT "
             "matches it with re.search, first key wins)")


class OsfConfig(MethodConfig):
    """OSF's hooks: only Linear layers; the rank table as plain data on each site."""

    def site_options_for(self, kind: str, options: dict[str, Value]) -> dict[str, Value]:
        if isinstance(options.get("rank_pattern"), Table):  # sites hold plain, JSON-able tuples
            options = dict(options, rank_pattern=options["rank_pattern"].items)
        return options

    def site_problem(self, kind: str, options: Mapping[str, Value]) -> str | None:
        if kind != "Linear":
            return (f"is {'an' if kind[0] in 'AEIOU' else 'a'} {kind}: PEFT's OSF adapts only "
                    "torch.nn.Linear layers (it silently skips other targets)")
        return None

    def check(self, values: Mapping[str, Value], stated: frozenset[str]) -> Iterable[Problem]:
        table = values.get("rank_pattern")
        keys = [k for k, _ in table.items] if isinstance(table, Table) else []
        if keys != sorted(keys):
            yield Problem("rank_pattern", "the first rank_pattern key that matches wins, and PEFT "
                          "writes adapter_config.json with sorted keys: once saved, overlapping keys "
                          "may resolve other ranks (in PEFT too)", hint="list the keys in sorted order",
                          warning=True)


CONFIG = OsfConfig(
    name="osf",
    peft_type="OSF",
    fields=(
        Field("effective_rank", Number(positive=True), None,
              doc="frozen SVD rank: int, fraction in (0, 1] of min(out, in), or null (half)"),
        Field("rank_pattern", Dict(Number(positive=True)), None,
              doc="regex (re.search on the module path) -> effective_rank; first match wins"),
        Field("init_weights", Bool(), True, alias="init",
              doc="trainable part from the SVD (a no-op at start); false: random"),
        Field("target_svd_config", Dict(Int()), None, doc="accepted and ignored, as by PEFT 0.21"),
    ) + COMMON_FIELDS,
    peft_fields=PEFT_HEAD + ("effective_rank", "target_modules", "rank_pattern", "init_weights",
                             "modules_to_save", "target_svd_config"),
    rules=frozenset({"target", "save"}),
    runtime="surgeon.methods.osf.layer:METHOD",
    default_names=DEFAULT_NAMES,
    site_options=("effective_rank", "inference_mode", "init_weights", "rank_pattern"),
    summary=("effective_rank",),
    rule_hints=(("rank", RANK_HINT),),
)
