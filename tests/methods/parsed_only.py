"""A method that is parsed and converted but has no runtime part, registered for a test's duration."""

from __future__ import annotations

import contextlib

from surgeon import methods
from surgeon.methods.base import COMMON_FIELDS, PEFT_HEAD, MethodConfig

PARSED_ONLY = MethodConfig(name="parsedonly", peft_type="PARSEDONLY", fields=COMMON_FIELDS,
                           peft_fields=PEFT_HEAD + ("target_modules",), rules=frozenset({"target"}))


@contextlib.contextmanager
def parsed_only_method():
    methods.register(PARSED_ONLY)
    try:
        yield PARSED_ONLY.name
    finally:
        methods.unregister(PARSED_ONLY.name)
