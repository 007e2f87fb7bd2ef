"""Whether a model already carries peft's own adapter modules, so surgeon refuses to stack on them.

A model wrapped by `peft.get_peft_model`, or one given adapters through transformers'
integration (`model.add_adapter(LoraConfig(...))`, `model.load_adapter(...)`), holds peft's tuner
layers (`lora.Linear` with `base_layer`, `lora_A`, `lora_B`). Selectors would then see peft's
`lora_A`/`lora_B` as ordinary Linear layers of the model and adapt *them* (`all-linear`, `Linear`,
a regex). Surgeon refuses such a model with one sentence saying what to do instead.

peft is never imported here: if it is not loaded, no module can be one of its classes.
"""

from __future__ import annotations

import sys

from torch import nn

# (module, class): peft's tuner layers, its whole-module wrappers, and the model wrappers
_PEFT_CLASSES = (
    ("peft.tuners.tuners_utils", "BaseTunerLayer"),
    ("peft.utils.other", "AuxiliaryTrainingWrapper"),
    ("peft.tuners.tuners_utils", "BaseTuner"),
    ("peft.peft_model", "PeftModel"),
    ("peft.mixed_model", "PeftMixedModel"),
)


def _loaded_classes() -> tuple[type, ...]:
    found = []
    for module, name in _PEFT_CLASSES:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(getattr(loaded, name, None), type):
            found.append(getattr(loaded, name))
    return tuple(found)


def peft_adapter_refusal(model: nn.Module) -> str | None:
    """Why `model` cannot take surgeon adapters because it holds peft's, or None when it holds none.

    Example:
        >>> peft_adapter_refusal(peft.get_peft_model(model, LoraConfig(target_modules=["q_proj"])))
        'the model is a peft `PeftModel` ...'
    """
    classes = _loaded_classes()
    if not classes:
        return None
    for path, module in model.named_modules():
        if isinstance(module, classes):
            cls = f"{type(module).__module__}.{type(module).__name__}"
            what = f"`{path}` is peft's `{cls}`" if path else f"the model is peft's `{cls}`"
            return (f"{what}: this model already carries peft adapters, and surgeon does not add "
                    "adapters on top of peft's (its selectors would adapt peft's own `lora_A`/`lora_B` "
                    "layers). Merge them into the weights first (`model = model.merge_and_unload()`), "
                    "or load the adapter with surgeon instead of peft "
                    "(`surgeon.load_adapter(base_model, folder)`), which can then add more adapters")
    return None
