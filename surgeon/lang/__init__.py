"""The `.peft` language: parse and check specs, print them back, render diagnostics. Torch-free.

Public API:
    load_spec(text_or_path) -> Spec     parse(text, file) -> Spec     print_spec(spec) -> str
    diagnose(text, file) -> (Spec | None, diagnostics)                 SpecError, Diagnostic
"""

from surgeon.lang.diagnostics import Diagnostic, SpecError, render
from surgeon.lang.parse import diagnose, load_spec, parse
from surgeon.lang.printer import print_spec

__all__ = ["Diagnostic", "SpecError", "diagnose", "load_spec", "parse", "print_spec", "render"]
