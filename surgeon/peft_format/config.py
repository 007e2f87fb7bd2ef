"""Spec <-> PEFT adapter_config.json: the conversions, in one import.

    spec_from_peft_config(config, name=)      PEFT dict -> Adapter       (peft_config_read)
    peft_config_from_adapter(adapter)         Adapter -> PEFT dict, no model (peft_config_write)
    peft_config_for_sites(adapter, sites)     resolved plan -> PEFT dict  (peft_config_write)

How PEFT's first-match rank_pattern/alpha_pattern maps onto the Spec's most-specific-wins
rules is explained in `peft_config_patterns`. Field bookkeeping lives in `peft_config_fields`.
"""

from __future__ import annotations

from surgeon.peft_format.fields import ConversionError, NeedsModelError
from surgeon.peft_format.read import spec_from_peft_config
from surgeon.peft_format.write import paths_regex, peft_config_for_sites, peft_config_from_adapter

__all__ = [
    "ConversionError", "NeedsModelError", "paths_regex", "peft_config_for_sites",
    "peft_config_from_adapter", "spec_from_peft_config",
]
