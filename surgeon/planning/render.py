"""A Plan as the fixed-width table `surgeon plan` prints: sites, saved modules, token rows,
warnings and totals. Reads only the Plan's public fields."""

from __future__ import annotations

_COLUMNS = ("path", "kind", "adapter", "method", "r", "alpha", "params", "rule")


def render_plan(plan) -> str:
    """A fixed-width table of the sites, then saved modules, token rows, warnings and totals."""
    rows = [_COLUMNS] + [
        (s.path, s.kind, s.adapter, s.method, str(s.r) if s.r else "-", f"{s.alpha:g}" if s.r else "-",
         f"{s.params:,}", s.rule or "-")
        for s in plan.sites
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    right = {"r", "alpha", "params"}
    lines = ["  ".join(cell.rjust(w) if col in right else cell.ljust(w)
                       for cell, w, col in zip(row, widths, _COLUMNS)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for a in plan.adapters:
        if a.save:
            heads = [f"{p} (task head)" if p in a.heads else p for p in a.save]
            lines.append(f"save ({a.name}): {', '.join(heads)}")
        for path, ix in a.tokens:
            lines.append(f"tokens ({a.name}): {path} {list(ix)}")
    for u in plan.unmatched:
        where = f"{u.location}: " if u.location else ""
        lines.append(f"{where}warning: `{u.text}` ({u.rule} rule of `{u.adapter}`) matched nothing")
    lines.append(f"{len(plan.sites)} sites; trainable params: {plan.trainable_params:,} "
                 f"of {plan.model_params:,} ({plan.trainable_percent:.4f}%)")
    return "\n".join(lines)
