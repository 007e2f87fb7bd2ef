"""Sites for bare parameters: LoRA's `target_parameters` option (PEFT's `lora.ParamWrapper`).

Why a separate step: PEFT matches these names against parameters, not modules, and wraps the
module owning each match. Its matching (`BaseTuner._inject_parameters`): for every module in
`named_modules()` order, every parameter it holds directly, the key `<module path>.<name>`
matches an entry equal to it or ending with `.<entry>`. Each match becomes one Site of kind
"Parameter" at the owning module's path, the parameter's name in its options.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from surgeon.planning.site import Site

KIND = "Parameter"  # surgeon.methods.lora.param.KIND (planning imports no method runtime)
NAME_OPTION = "parameter_name"


def matches(model: nn.Module, wanted: Sequence[str]) -> list[tuple[str, str]]:
    """`(module path, parameter name)` for each parameter PEFT's matching selects, in its order."""
    out = []
    for path, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            key = f"{path}.{name}"
            if key in wanted or any(key.endswith(f".{w}") for w in wanted):
                out.append((path, name))
    return out


def parameter_sites(model: nn.Module, adapter, wanted: Sequence[str], module_paths: set[str],
                    make: Callable[[str, dict], Site], fail: Callable[[str], Exception]) -> tuple[Site, ...]:
    """One Site per matched parameter (`make(path, options)` fills rank, scaling, counts);
    `fail(message)` builds the error for a refusal."""
    found = matches(model, wanted)
    if not found:
        raise fail(f"adapter `{adapter.name}`: target_parameters={list(wanted)} were set but no "
                   "parameter was matched")
    seen: set[str] = set()
    sites = []
    for path, name in found:
        if path == "":
            raise fail(f"Targeting an nn.Parameter on the top-level module is not supported "
                       f"(parameter '{name}')")
        if path in module_paths:
            raise fail(f"`{path}` is targeted as a module and its parameter `{name}` by "
                       "target_parameters; PEFT refuses that too (drop one)")
        if path in seen:
            raise fail(f"`{path}`: more than one of its parameters is targeted; surgeon adapts "
                       "one parameter per module for now (PEFT nests wrappers)")
        seen.add(path)
        sites.append(make(path, {NAME_OPTION: name}))
    return tuple(sites)
