"""Class 5: names and output paths cannot make surgeon write outside its target, through a link
or into a device; `--force` guards every existing output; no temporary survives a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import surgeon
from surgeon.errors import UserError
from surgeon.peft_format import files
from tests.hostile.common import assert_exit_2, cli, net, tree

SPEC = "adapter default = lora(r=2) { target head }\n"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["head"]}
BAD_NAMES = ["../escape", "/abs/path", "a/b", "", "..", ".hidden", "-rf", "x" * 300]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_adapter_names_are_refused_everywhere(tmp_path, name):
    model = net()
    with pytest.raises(UserError):
        surgeon.apply(SPEC, model, adapter_name=name)
    surgeon.apply(SPEC, model)
    surgeon.save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(UserError):
        surgeon.load_adapter(model, tmp_path / "ckpt", name)
    with pytest.raises(UserError):
        files.adapter_dir(tmp_path, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written beside it


def test_convert_refuses_a_subfolder_name_check_would_reject(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    (folder / "-rf").mkdir(parents=True)
    (folder / files.CONFIG_NAME).write_text(json.dumps(CONFIG))
    (folder / "-rf" / files.CONFIG_NAME).write_text(json.dumps(CONFIG))
    assert_exit_2(cli(capsys, "convert", folder), "-rf")


def _special_outputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "real_dir").mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link_file = tmp_path / "link_file"
    link_file.symlink_to(tmp_path / "real_file")
    (tmp_path / "real_file").write_text("keep")
    link_dir = tmp_path / "link_dir"
    link_dir.symlink_to(tmp_path / "real_dir")
    return {"fifo": fifo, "device": Path("/dev/null"), "link_file": link_file, "link_dir": link_dir}


@pytest.mark.parametrize("kind", ["fifo", "device", "link_file", "link_dir"])
def test_convert_output_never_replaces_special_files(tmp_path, capsys, kind):
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps(CONFIG))
    target = _special_outputs(tmp_path)[kind]
    before = tree(tmp_path)
    assert_exit_2(cli(capsys, "convert", config, "-o", target, "--force"), str(target))
    assert tree(tmp_path) == before
    assert (tmp_path / "real_file").read_text() == "keep" and target.exists()


def test_apply_output_symlink_to_folder_is_refused(tmp_path, capsys):
    spec = tmp_path / "s.peft"
    spec.write_text(SPEC)
    target = _special_outputs(tmp_path)["link_dir"]
    outcome = cli(capsys, "apply", spec, "--model", "py:tests/hostile/common.py:net", "-o", target, "--force")
    assert_exit_2(outcome, "symbolic link")
    assert target.is_symlink()


def test_convert_needs_force_to_overwrite_a_spec(tmp_path, capsys):
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps(CONFIG))
    out = tmp_path / "spec.peft"
    out.write_text("# mine\n")
    assert_exit_2(cli(capsys, "convert", config, "-o", out), "--force")
    assert out.read_text() == "# mine\n"
    assert cli(capsys, "convert", config, "-o", out, "--force").rc == 0
    assert "adapter default = lora" in out.read_text()


@pytest.mark.parametrize("output", ["", ".", "..", "sub/.."])
def test_empty_or_dot_outputs_are_refused(tmp_path, capsys, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    spec = tmp_path / "s.peft"
    spec.write_text(SPEC)
    before = tree(tmp_path)
    assert_exit_2(cli(capsys, "convert", spec, "-o", output, "--force"), "cannot write")
    assert tree(tmp_path) == before


def test_sigterm_leaves_no_partial_folder(tmp_path):
    """A real process killed with SIGTERM while it writes: its temporaries are removed."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from surgeon.cli.main import main\n"
        "import surgeon.cli.commands as c\n"
        "real = c.atomic_dir\n"
        "from contextlib import contextmanager\n"
        "@contextmanager\n"
        "def slow(target, force=False):\n"
        "    with real(target, force=force) as tmp:\n"
        "        (tmp / 'started').write_text('x'); print('writing', flush=True); time.sleep(60)\n"
        "        yield tmp\n"
        "c.atomic_dir = slow\n"
        "sys.exit(main(sys.argv[1:]))\n")
    spec = tmp_path / "s.peft"
    spec.write_text(SPEC)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", script, "convert", str(spec), "-o", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "terminated" in err
    assert tree(tmp_path) == ["s.peft"]


def test_written_files_follow_the_umask(tmp_path, capsys):
    spec = tmp_path / "s.peft"
    spec.write_text(SPEC)
    old = os.umask(0o027)
    try:
        outcome = cli(capsys, "apply", spec, "--model", "py:tests/hostile/common.py:net", "-o", tmp_path / "out")
        model = surgeon.apply(SPEC, net())
        surgeon.save_pretrained(model, tmp_path / "api")
    finally:
        os.umask(old)
    assert outcome.rc == 0, outcome
    for root in (tmp_path / "out", tmp_path / "api"):
        assert root.stat().st_mode & 0o777 == 0o750
        for path in root.rglob("*"):
            assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path
