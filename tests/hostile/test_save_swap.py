"""Class 6: save_pretrained into an existing folder is one swap: all of the new save or none of
it, exactly the adapters saved (no stale subfolder), the user's other files kept."""

from __future__ import annotations

import pytest

import surgeon
from surgeon.errors import UserError
from surgeon.peft_format import files
from tests.hostile.common import net, tree

TWO = ("adapter default = lora(r=2) { target head }\n"
       "adapter other = lora(r=4) { target query_projection_matrix }\n")


def _two_adapters():
    return surgeon.apply(TWO, net())


def test_saving_fewer_adapters_leaves_no_stale_subfolder(tmp_path):
    model = _two_adapters()
    surgeon.save_pretrained(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "other" / files.CONFIG_NAME).is_file()
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    (tmp_path / "ckpt" / "data").mkdir()
    (tmp_path / "ckpt" / "data" / "x.csv").write_text("1,2")
    surgeon.delete_adapter(model, "other")
    surgeon.save_pretrained(model, tmp_path / "ckpt")
    assert files.adapters_in(tmp_path / "ckpt") == {"default": tmp_path / "ckpt"}
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"  # the user's files stay
    assert (tmp_path / "ckpt" / "data" / "x.csv").read_text() == "1,2"
    assert [p for p in tree(tmp_path) if p.startswith(".")] == []


def test_a_stray_file_where_an_adapter_goes_fails_before_anything_changes(tmp_path):
    model = _two_adapters()
    surgeon.save_pretrained(model, tmp_path / "ckpt", selected_adapters=["default"])
    before = {p: (tmp_path / "ckpt" / p).read_bytes() for p in tree(tmp_path / "ckpt")}
    (tmp_path / "ckpt" / "other").write_text("a file, not a folder")
    with pytest.raises(UserError, match="not an adapter folder"):
        surgeon.save_pretrained(model, tmp_path / "ckpt")
    after = {p: (tmp_path / "ckpt" / p).read_bytes() for p in tree(tmp_path / "ckpt")}
    assert after == {**before, "other": b"a file, not a folder"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failure_midway_leaves_the_old_save_whole(tmp_path, monkeypatch):
    model = _two_adapters()
    surgeon.save_pretrained(model, tmp_path / "ckpt")
    before = {p: (tmp_path / "ckpt" / p).read_bytes() for p in tree(tmp_path / "ckpt")
              if (tmp_path / "ckpt" / p).is_file()}
    calls = []
    real = files._write_adapter

    def fail_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        real(*args)

    monkeypatch.setattr(files, "_write_adapter", fail_second)
    with pytest.raises(OSError):
        surgeon.save_pretrained(model, tmp_path / "ckpt")
    after = {p: (tmp_path / "ckpt" / p).read_bytes() for p in tree(tmp_path / "ckpt")
             if (tmp_path / "ckpt" / p).is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_into_a_file_or_symlink_is_refused(tmp_path):
    model = _two_adapters()
    (tmp_path / "file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for target in ("file", "link"):
        with pytest.raises(UserError):
            surgeon.save_pretrained(model, tmp_path / target)
    assert (tmp_path / "link").is_symlink() and list((tmp_path / "real").iterdir()) == []
