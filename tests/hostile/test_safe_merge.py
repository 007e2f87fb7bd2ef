"""Class 9: `surgeon merge --safe-merge` refuses an adapter whose merge gives NaN/inf weights
and writes nothing (PEFT's safe_merge); without the flag the merge goes ahead, as in PEFT."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

import surgeon
from surgeon.peft_format import files
from tests.hostile.common import assert_exit_2, cli, net

MODEL = "py:tests/hostile/common.py:net"


def _nan_adapter(folder):
    model = surgeon.apply("adapter default = lora(r=2, init=false) { target head }", net())
    surgeon.save_pretrained(model, folder)
    tensors = load_file(folder / files.WEIGHTS_NAME)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(folder / files.WEIGHTS_NAME))


def test_safe_merge_refuses_nan_and_writes_nothing(tmp_path, capsys):
    _nan_adapter(tmp_path / "ckpt")
    outcome = cli(capsys, "merge", "--model", MODEL, "--adapter", tmp_path / "ckpt",
                  "-o", tmp_path / "merged", "--safe-merge")
    assert_exit_2(outcome, "--safe-merge", "`head`", "NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_without_safe_merge_the_merge_is_written(tmp_path, capsys):
    _nan_adapter(tmp_path / "ckpt")
    outcome = cli(capsys, "merge", "--model", MODEL, "--adapter", tmp_path / "ckpt", "-o", tmp_path / "merged")
    assert outcome.rc == 0, outcome
    assert torch.isnan(load_file(tmp_path / "merged" / "model.safetensors")["head.weight"]).all()


def test_safe_merge_passes_a_finite_adapter(tmp_path, capsys):
    model = surgeon.apply("adapter default = lora(r=2, init=false) { target head }", net())
    surgeon.save_pretrained(model, tmp_path / "ckpt")
    outcome = cli(capsys, "merge", "--model", MODEL, "--adapter", tmp_path / "ckpt",
                  "-o", tmp_path / "merged", "--safe-merge")
    assert outcome.rc == 0, outcome
    merged = load_file(tmp_path / "merged" / "model.safetensors")["head.weight"]
    assert not torch.equal(merged, net().head.weight.detach())
