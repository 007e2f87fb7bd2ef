"""Progress lines for the slow stages of `plan`/`apply` appear on a terminal's stderr only:
piped output, `--json` included, stays exactly the command's results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from surgeon.cli.main import main

pytest.importorskip("transformers")
SPEC = str(Path(__file__).resolve().parents[2] / "examples" / "lora_qv.peft")


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_piped_plan_json_has_no_progress(capsys):
    out, err = _run(capsys, ["plan", SPEC, "--model", "tiny:llama", "--json"])
    json.loads(out)
    assert " ... " not in err and "loading" not in err


def test_terminal_shows_each_stage(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    out, err = _run(capsys, ["apply", SPEC, "--model", "tiny:llama", "-o", str(tmp_path / "o")])
    for label in ("loading tiny:llama ...", "planning ...", "applying ...", "saving "):
        assert label in err
    assert " ... " not in out  # results stay on stdout, progress on stderr
