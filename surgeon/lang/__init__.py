"""The `.peft` language: parse and check specs, print them back, render diagnostics. Torch-free.

Public API:
    load_spec(text_or_path) -> Spec     parse(text, file) -> Spec     print_spec(spec) -> str
    diagnose(text, file) -> (Spec | None, diagnostics)                 SpecError, Diagnostic

Names load on first use, so importing a leaf (`surgeon.lang.values`, `surgeon.lang.kinds`, as
every method's config does) does not pull in the parser, which reads the method registry.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Diagnostic": "surgeon.lang.diagnostics", "SpecError": "surgeon.lang.diagnostics",
    "render": "surgeon.lang.diagnostics", "diagnose": "surgeon.lang.parser",
    "load_spec": "surgeon.lang.parser", "parse": "surgeon.lang.parser",
    "print_spec": "surgeon.lang.printer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'surgeon.lang' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
