"""Class 4: a broken checkpoint or config is refused with the file and field named (a UserError
in the API, exit 2 in the CLI), and a failed load leaves the model bit-identical."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import surgeon
from surgeon.errors import UserError
from surgeon.peft_format import files
from tests.hostile.common import assert_exit_2, cli, net

GOOD = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["head"]}
MODEL = "py:tests/hostile/common.py:net"


def _checkpoint(folder, config=GOOD, weights: bytes | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / files.CONFIG_NAME).write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is None:
        save_file({"base_model.model.head.lora_A.weight": torch.zeros(2, 8),
                   "base_model.model.head.lora_B.weight": torch.zeros(2, 2)},
                  str(folder / files.WEIGHTS_NAME))
    else:
        (folder / files.WEIGHTS_NAME).write_bytes(weights)
    return folder


def _good_bytes(tmp_path) -> bytes:
    return (_checkpoint(tmp_path / "good") / files.WEIGHTS_NAME).read_bytes()


def _refused_unchanged(folder, *needles: str):
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as caught:
        surgeon.load_adapter(model, folder)
    for needle in needles:
        assert needle in str(caught.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name, data", [
    ("zero-byte", b""),
    ("random", bytes(range(256)) * 8),
    ("huge header", struct.pack("<Q", 2**62) + b"{}"),
    ("header past the end", struct.pack("<Q", 2**20) + b"{}"),
])
def test_broken_safetensors(tmp_path, name, data):
    _refused_unchanged(_checkpoint(tmp_path / "ckpt", weights=data), files.WEIGHTS_NAME)


def test_truncated_safetensors(tmp_path):
    data = _good_bytes(tmp_path)
    _refused_unchanged(_checkpoint(tmp_path / "ckpt", weights=data[:-7]), files.WEIGHTS_NAME)


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON list"),
    ("\xff\xfe", "not valid JSON"),
    ("[" * 100000, "not valid JSON"),
])
def test_broken_config_json(tmp_path, text, needle):
    folder = _checkpoint(tmp_path / "ckpt")
    (folder / files.CONFIG_NAME).write_bytes(text.encode("latin-1"))
    _refused_unchanged(folder, files.CONFIG_NAME, needle)


@pytest.mark.parametrize("field, value", [
    ("r", "8"), ("r", None), ("r", -4), ("r", 2.5), ("lora_alpha", "sixteen"), ("lora_dropout", 5.0),
    ("task_type", "NOT_A_TASK"), ("peft_type", 7), ("target_modules", 5), ("rank_pattern", [1]),
    ("rank_pattern", {"head": "x"}), ("alpha_pattern", {"head": None}), ("layers_pattern", 5),
    ("trainable_token_indices", {"emb": [-5]}), ("use_dora", "yes"),
])
def test_wrong_field_types_name_file_and_field(tmp_path, field, value):
    config = {**GOOD, field: value}
    if field == "layers_pattern":
        config["layers_to_transform"] = [0]
    _refused_unchanged(_checkpoint(tmp_path / "ckpt", config), files.CONFIG_NAME, f"`{field}`")


def test_missing_and_dangling_files(tmp_path):
    folder = _checkpoint(tmp_path / "ckpt")
    (folder / files.WEIGHTS_NAME).unlink()
    _refused_unchanged(folder, files.WEIGHTS_NAME)
    os.symlink(tmp_path / "gone", folder / files.WEIGHTS_NAME)
    _refused_unchanged(folder, "dangling")
    (folder / files.CONFIG_NAME).unlink()
    _refused_unchanged(folder, files.CONFIG_NAME)
    _refused_unchanged(tmp_path / "nowhere", "no such directory")


def test_pickle_with_code_is_refused_without_advice(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / files.CONFIG_NAME).write_text(json.dumps(GOOD))
    torch.save({"k": Evil()}, folder / files.PICKLE_NAME)
    with pytest.raises(files.CheckpointError) as caught:
        files.read_checkpoint(folder, allow_pickle=True)
    assert "weights_only=False" not in str(caught.value) and "\n" not in str(caught.value)


def test_model_folder_with_only_pickles_exits_2(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    torch.save({"w": torch.zeros(1)}, model_dir / "pytorch_model.bin")
    outcome = cli(capsys, "roles", "--model", model_dir)
    assert_exit_2(outcome, "pickles", "pytorch_model.bin")
    assert "weights_only" not in outcome.err


def test_model_folder_with_invalid_config_exits_2(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{oops")
    assert_exit_2(cli(capsys, "roles", "--model", model_dir), "config.json")


@pytest.mark.parametrize("config", ['{"r": 8', '[]', json.dumps({**GOOD, "r": "8"})])
def test_cli_merge_and_convert_exit_2(tmp_path, capsys, config):
    folder = _checkpoint(tmp_path / "ckpt", config)
    assert_exit_2(cli(capsys, "convert", folder / files.CONFIG_NAME), files.CONFIG_NAME)
    outcome = cli(capsys, "merge", "--model", MODEL, "--adapter", folder, "-o", tmp_path / "out")
    assert_exit_2(outcome, files.CONFIG_NAME)
    assert not (tmp_path / "out").exists()


def test_disk_full_exits_2_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    spec = tmp_path / "s.peft"
    spec.write_text("adapter default = lora(r=2) { target head }\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    outcome = cli(capsys, "apply", spec, "--model", MODEL, "-o", tmp_path / "out")
    assert_exit_2(outcome, "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.peft"]
