"""Adapters that could never run, from the capture the planner already made for roles.

Why here and not a new capture: capture is the costly step, so the facts (surgeon.capture.reach)
come only with a plan that used a role selector; a plan by names, types or layers only is
unchecked beyond `select.never_runs` (MultiheadAttention's out_proj, TransformerEncoderLayer's
fast path). A target whose weight its parent reads directly is refused (it never runs, on any
input); targets the captured call never reached are warned about once per adapter (other
inputs may reach them).
"""

from __future__ import annotations

import warnings

from surgeon.capture.reach import NEVER_CALLED
from surgeon.planning.select import Resolver


def refusal(resolver: Resolver, path: str) -> tuple[str, str] | None:
    """(why, hint) when an adapter at `path` can never run, as far as the capture shows."""
    fact = resolver.unreached(path)
    if fact is None or not fact[1]:
        return None
    return fact[0], f"target the module that applies the weight, or leave `{path}` out (`except`, `exclude`)"


def warn_unreached(resolver: Resolver, adapter: str, paths: list[str]) -> None:
    """One warning for `adapter`'s targets the captured call never reached."""
    dead = [p for p in paths if (fact := resolver.unreached(p)) is not None and not fact[1]]
    if dead:
        more = f" and {len(dead) - 3} more" if len(dead) > 3 else ""
        listed = ", ".join(f"`{p}`" for p in dead[:3]) + more
        warnings.warn(f"adapter `{adapter}`: {listed} {NEVER_CALLED}", UserWarning, stacklevel=5)
