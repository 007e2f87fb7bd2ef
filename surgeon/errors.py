"""The one base of every error a user can fix: a spec, a model, a checkpoint, a flag, a path.

Each stage defines its own error next to the code that raises it (`SpecError` in the language,
`PlanError` in planning, `CheckpointError` in the PEFT format, ...), always deriving from
`UserError`. The command line maps `UserError` to exit code 2 and prints its message; anything
else is an internal error (exit 1). So renaming or adding an error class never changes what the
user sees. Torch-free: the language imports it.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; `str()` is the whole message.

    `rendered` is True when `str()` is already a rendered `file:line:col: error: ...`
    diagnostic (with the source line and a caret), which the CLI prints as it is.
    """

    rendered: bool = False
