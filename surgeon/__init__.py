"""surgeon: a declarative model-surgery compiler for parameter-efficient fine-tuning.

    import surgeon
    spec = surgeon.load_spec("examples/lora_qv.peft")
    print(surgeon.plan(spec, model))          # the dry run: every site and why
    surgeon.apply(spec, model)                # in place, as a transaction
    surgeon.save_pretrained(model, "out/")    # a PEFT checkpoint

Names are imported lazily so that `import surgeon` (and `surgeon check`) does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_spec": "surgeon.lang",
    "print_spec": "surgeon.lang",
    "SpecError": "surgeon.lang",
    "Spec": "surgeon.lang.spec",
    "Site": "surgeon.planning.site",
    "plan": "surgeon.planning.planner",
    "Plan": "surgeon.planning.plans",
    "PlanError": "surgeon.planning.planner",
    "roles": "surgeon.capture.infer",
    "infer_roles": "surgeon.capture.infer",
    "apply": "surgeon.api",
    "save_pretrained": "surgeon.api",
    "load_adapter": "surgeon.api",
    "merge": "surgeon.api",
    "unmerge": "surgeon.api",
    "merge_and_unload": "surgeon.api",
    "unload": "surgeon.api",
    "set_adapter": "surgeon.api",
    "disable_adapters": "surgeon.api",
    "adapter_rows": "surgeon.api",
    "delete_adapter": "surgeon.api",
    "active_adapters": "surgeon.api",
    "viz": "surgeon.pictures.picture",
    "prepare_kbit": "surgeon.runtime.quantized",
    "compile": "surgeon.fusion",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
    if name == "roles":  # `surgeon.roles(model)` is the function, not the module
        return importlib.import_module(module).infer_roles
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
