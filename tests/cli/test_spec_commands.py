"""`surgeon --help`, `check` and `convert` (no model): exit codes, messages, files left behind.

These commands do not import torch, so each subprocess takes a fraction of a second; the one
check against PEFT (its LoraConfig reads what `convert` wrote) runs in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.runner import EXAMPLES, assert_user_error, listing, surgeon

COMMANDS = ("check", "plan", "apply", "merge", "convert", "roles")

NAMES_SPEC = """\
adapter default = lora(r=8, alpha=16, dropout=0.05) {
    target q_proj, v_proj
    rank 4 on v_proj
    save lm_head
}
adapter other = ia3() {
    target k_proj, down_proj
    feedforward down_proj
}
"""

BAD_SPEC = """\
adapter default = lora(r=8, alpah=16) {
    target @attn.qq
}
"""


def test_help_lists_every_command_and_each_has_examples(tmp_path: Path):
    top = surgeon("--help", cwd=tmp_path)
    assert top.rc == 0, top
    for name in COMMANDS:
        assert f"    {name} " in top.out, top
    for name in COMMANDS:
        sub = surgeon(name, "--help", cwd=tmp_path)
        assert sub.rc == 0 and "examples:" in sub.out and f"surgeon {name}" in sub.out, sub
    bare = surgeon(cwd=tmp_path)
    assert bare.rc == 2 and "COMMAND" in bare.err, bare


def test_check_summarises_valid_files_and_renders_diagnostics(tmp_path: Path):
    (tmp_path / "names.peft").write_text(NAMES_SPEC)
    (tmp_path / "bad.peft").write_text(BAD_SPEC)
    ok = surgeon("check", "names.peft", EXAMPLES / "two_adapters.peft", cwd=tmp_path)
    assert ok.rc == 0, ok
    assert ok.out.splitlines() == [
        "names.peft: adapter 'default' lora r=8 alpha=16, 1 target rule",
        "names.peft: adapter 'other' ia3, 1 target rule",
        "two_adapters.peft: adapter 'default' lora r=8 alpha=16, 1 target rule",
        "two_adapters.peft: adapter 'summarise' lora r=32 alpha=32, 1 target rule",
    ], ok
    bad = surgeon("check", "bad.peft", "names.peft", "missing.peft", cwd=tmp_path)
    assert_user_error(bad, "bad.peft:1:29: error:", "did you mean 'alpha'?", "bad.peft:2:12: error:",
                      "^^^^^^^^", "missing.peft", "2 of 3 files")
    assert "names.peft: adapter 'default'" in bad.out, bad  # the good file is still summarised


def test_check_shows_warnings_for_options_plan_and_apply_refuse(tmp_path: Path):
    """A spec `plan`/`apply` would refuse (a PEFT variant surgeon lacks) passes `check` with a
    located warning, not silently; the planner refuses the same option at the same column."""
    (tmp_path / "qalora.peft").write_text("adapter a = lora(r=8, use_qalora=true) { target q_proj }\n")
    checked = surgeon("check", "qalora.peft", cwd=tmp_path)
    assert checked.rc == 0, checked
    assert "qalora.peft:1:23: warning: the option 'use_qalora'" in checked.err, checked
    assert "^^^^^^^^^^" in checked.err and "refuse it" in checked.err, checked
    planned = surgeon("plan", "qalora.peft", "--model", "tiny:llama", cwd=tmp_path)
    assert planned.rc == 2 and "qalora.peft:1:23" in planned.err, planned


def test_convert_spec_to_peft_configs_and_back(tmp_path: Path):
    from peft import IA3Config, LoraConfig

    (tmp_path / "names.peft").write_text(NAMES_SPEC)
    made = surgeon("convert", "names.peft", "-o", "out/configs", cwd=tmp_path)
    assert made.rc == 0, made
    folder = tmp_path / "out" / "configs"
    assert listing(folder) == ["adapter_config.json", "other", "other/adapter_config.json"]
    lora = LoraConfig.from_pretrained(folder)  # PEFT is the oracle of its own format
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.05)
    assert set(lora.target_modules) == {"q_proj", "v_proj"} and lora.modules_to_save == ["lm_head"]
    assert list(lora.rank_pattern.values()) == [4]
    ia3 = IA3Config.from_pretrained(folder / "other")
    assert set(ia3.target_modules) == {"k_proj", "down_proj"}

    back = surgeon("convert", "out/configs", "-o", "back.peft", cwd=tmp_path)
    assert back.rc == 0, back
    text = (tmp_path / "back.peft").read_text()
    assert "adapter default = lora(" in text and "adapter other = ia3" in text, text
    to_stdout = surgeon("convert", folder / "adapter_config.json", cwd=tmp_path)
    assert to_stdout.rc == 0 and to_stdout.out.startswith("adapter default = lora("), to_stdout
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_convert_failures_leave_nothing_behind(tmp_path: Path):
    (tmp_path / "names.peft").write_text(NAMES_SPEC)
    (tmp_path / "a_file").write_text("not a folder")
    before = listing(tmp_path)

    needs_model = surgeon("convert", EXAMPLES / "lora_qv.peft", "-o", "out", cwd=tmp_path)
    assert_user_error(needs_model, "lora_qv.peft:", "needs the model", "--model")
    under_file = surgeon("convert", "names.peft", "-o", "a_file/out", cwd=tmp_path)
    assert_user_error(under_file, "a_file", "not a directory")
    missing = surgeon("convert", "nothing.peft", "-o", "out", cwd=tmp_path)
    assert_user_error(missing, "nothing.peft", "no such file")
    (tmp_path / "broken.json").write_text("{not json")
    broken = surgeon("convert", "broken.json", cwd=tmp_path)
    assert_user_error(broken, "broken.json", "not valid JSON")
    no_out = surgeon("convert", "names.peft", cwd=tmp_path)
    assert_user_error(no_out, "-o DIR")
    assert listing(tmp_path) == sorted(before + ["broken.json"])


def test_existing_output_needs_force(tmp_path: Path):
    (tmp_path / "names.peft").write_text(NAMES_SPEC)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    refused = surgeon("convert", "names.peft", "-o", "out", cwd=tmp_path)
    assert_user_error(refused, "not empty", "--force")
    assert listing(tmp_path / "out") == ["keep.txt"]
    forced = surgeon("convert", "names.peft", "-o", "out", "--force", cwd=tmp_path)
    assert forced.rc == 0, forced
    assert listing(tmp_path / "out") == ["adapter_config.json", "other", "other/adapter_config.json"]
    written = [f"out/{p}" for p in listing(tmp_path / "out")]
    assert listing(tmp_path) == sorted(["names.peft", "out", *written])


def test_bad_flags_are_usage_errors(tmp_path: Path):
    shape = surgeon("plan", "x.peft", "--model", "tiny:llama", "--input", "2xq:float32", cwd=tmp_path)
    assert_user_error(shape, "--input", "bad shape '2xq'")
    dtype = surgeon("plan", "x.peft", "--model", "tiny:llama", "--input", "2x4:float13", cwd=tmp_path)
    assert_user_error(dtype, "unknown dtype 'float13'")
    missing = surgeon("apply", "x.peft", "--model", "tiny:llama", cwd=tmp_path)
    assert_user_error(missing, "-o/--output")
