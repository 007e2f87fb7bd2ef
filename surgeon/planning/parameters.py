"""Sites for bare parameters: LoRA's `target_parameters` option (PEFT's `lora.ParamWrapper`).

Why a separate step: PEFT matches these names against parameters, not modules, and wraps the
module owning each match. Its matching (`BaseTuner._inject_parameters`): for every module in
`named_modules()` order, every parameter it holds directly, the key `<module path>.<name>`
matches an entry equal to it or ending with `.<entry>`. Each match becomes one Site of kind
"Parameter" at the owning module's path, the parameter's name in its options. The language's
`param` atoms and expert-stack roles (`@moe.up`) add full parameter paths to those entries.
`rank`/`alpha` rules apply by parameter path, as PEFT's rank_pattern keys match
`<module>.<parameter>` for a ParamWrapper.

Several parameters of one module give several Sites at one path, in PEFT's matching order
(the module's registration order): the runtime nests one adapted layer per parameter, the
first innermost, as PEFT nests its ParamWrappers (see `surgeon.methods.lora.param`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from surgeon.lang.spec import NO_SPAN
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
    sites = []
    for path, name in found:
        if path == "":
            raise fail(f"Targeting an nn.Parameter on the top-level module is not supported "
                       f"(parameter '{name}')")
        if path in module_paths:
            raise fail(f"`{path}` is targeted as a module and its parameter `{name}` by "
                       "target_parameters; PEFT refuses that too (drop one)")
        sites.append(make(path, {NAME_OPTION: name}))
    return tuple(sites)


def planned_sites(planner: Any, adapter, wanted: Sequence[str], kept: set[str],
                  values: dict[str, dict[str, Any]]) -> tuple[Site, ...]:
    """The Sites of `wanted` for `planner` (a planning.planner._Planner), each with the rank and
    alpha its `rank`/`alpha` rules give its parameter path (`values`), else the adapter's."""
    from surgeon import methods

    config, runtime = methods.config_of(adapter.method), methods.runtime_of(adapter.method)
    node = next((o for o in adapter.options if o.name == "target_parameters"), None)
    r0, alpha0 = adapter.option(config.rank_field), adapter.option(config.alpha_field)
    base = {n: adapter.option(n) for n in config.site_options}
    base["fan_in_fan_out"] = adapter.option("fan_in_fan_out")  # refused there, as in PEFT

    def make(path: str, extra: dict) -> Site:
        key = f"{path}.{extra[NAME_OPTION]}"
        rule = planner.picked.get(key) or node or adapter
        r, alpha = values["rank"].get(key, r0), values["alpha"].get(key, alpha0)
        options = {**base, **extra}
        site = Site(path=path, kind=KIND, method=adapter.method, adapter=adapter.name,
                    r=r, alpha=float(alpha), scaling=config.scaling(alpha, r, options),
                    options=tuple(sorted(options.items())),
                    rule="" if rule.span == NO_SPAN else rule.span.location())
        try:  # PEFT's refusal of a 1-D or 4-D parameter, located at its rule
            params = runtime.num_params(planner.resolver.modules[path], site)
        except ValueError as error:
            raise planner.error(f"`{key}`: {error}", rule) from None
        return replace(site, params=params)

    at = node or next(iter(planner.picked.values()), adapter)
    return parameter_sites(planner.resolver.model, adapter, wanted, kept, make,
                           lambda message: planner.error(message, at))
