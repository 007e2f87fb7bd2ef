"""Run `surgeon` as users do: a subprocess of `python -m surgeon.cli`, offline, in a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str

    def __repr__(self) -> str:  # shown when an assertion fails
        return f"rc={self.rc}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def surgeon(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
    """`surgeon ARGS...` in `cwd`; HF_HUB_OFFLINE=1 unless `env` says otherwise."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "surgeon.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def listing(folder: Path) -> list[str]:
    """Every path under `folder`, hidden ones included (a leftover temp dir would show here)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_user_error(result: Result, *needles: str) -> None:
    """Exit code 2, one clear message on stderr containing `needles`, no traceback."""
    assert result.rc == 2, result
    assert "Traceback" not in result.err, result
    for needle in needles:
        assert needle in result.err, result
