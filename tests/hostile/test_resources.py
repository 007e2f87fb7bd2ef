"""Class 2 and 3: sizes are checked before anything is allocated (ranks, spec files, example
inputs, seeds), and token indices against the vocabulary at plan time; refusals give numbers."""

from __future__ import annotations

import os

import pytest

from surgeon.errors import UserError
from surgeon.lang import load_spec
from surgeon.planning.planner import plan
from surgeon.planning.select import PlanError
from tests.hostile.common import assert_exit_2, cli, net
from tests.models import tiny_llama

MODEL = "py:tests/hostile/common.py:net"


@pytest.mark.parametrize("rank", ["1000000000", "99999999999999999999999"])
def test_huge_rank_is_refused_with_numbers_at_the_option(rank):
    text = f"adapter default = lora(r={rank}) {{ target query_projection_matrix }}\n"
    with pytest.raises(PlanError) as caught:
        plan(text, net())
    message = str(caught.value)
    assert "trainable parameters" in message and "GiB" in message and f"r={rank}" in message


def test_huge_rank_rule_is_refused_before_apply_allocates():
    import surgeon

    model = net()
    text = "adapter default = lora(r=2) { target query_projection_matrix  rank 2000000000 on head }"
    text = text.replace("target query_projection_matrix", "target query_projection_matrix, head")
    with pytest.raises(PlanError, match="more than this machine"):
        surgeon.apply(text, model)
    assert not any("lora" in n for n, _ in model.named_modules())


def test_dev_zero_spec_is_refused(capsys):
    with pytest.raises(UserError, match="not a regular file"):
        load_spec("/dev/zero")
    from pathlib import Path

    with pytest.raises(UserError, match="not a regular file"):
        load_spec(Path("/dev/zero"))
    assert_exit_2(cli(capsys, "check", "/dev/zero"), "not a regular file")


def test_fifo_spec_does_not_block(tmp_path, capsys):
    fifo = tmp_path / "spec.peft"
    os.mkfifo(fifo)
    assert_exit_2(cli(capsys, "check", fifo), "not a regular file")


def test_oversized_spec_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("surgeon.lang.parser.MAX_SPEC_BYTES", 64)
    spec = tmp_path / "big.peft"
    spec.write_text("# " + "x" * 100 + "\n")
    with pytest.raises(UserError, match="larger than"):
        load_spec(spec)


def test_huge_example_input_is_refused_before_allocating(capsys):
    outcome = cli(capsys, "roles", "--model", MODEL, "--input", "100000x100000")
    assert_exit_2(outcome, "10,000,000,000 elements")


@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", "seven"])
def test_bad_seed_exits_2(tmp_path, capsys, seed):
    spec = tmp_path / "s.peft"
    spec.write_text("adapter default = lora(r=2) { target head }\n")
    outcome = cli(capsys, "apply", spec, "--model", MODEL, "-o", tmp_path / "out", "--seed", seed)
    assert_exit_2(outcome, "seed")
    assert not (tmp_path / "out").exists()


def test_token_index_past_the_vocabulary_fails_at_plan_time():
    model = tiny_llama()
    vocab = model.get_input_embeddings().num_embeddings
    text = f"adapter default = lora(r=2) {{\n  target q_proj\n  tokens embed_tokens [0, {vocab}]\n}}\n"
    with pytest.raises(PlanError) as caught:
        plan(text, model)
    assert f"token index {vocab}" in str(caught.value) and ":3:" in str(caught.value)
    plan(text.replace(f", {vocab}]", f", {vocab - 1}]"), model)  # the last row is fine
