"""Class 7: what used to give a silently wrong result now fails loudly (or warns, as PEFT):
peft-only LoRA variants, specs `convert` wrote but `check` rejects, merges into a tied
lm_head, and adapter-name arguments given as a string or twice."""

from __future__ import annotations

import json

import pytest
import torch

import surgeon
from surgeon.api import active_adapters
from surgeon.errors import UserError
from surgeon.lang import load_spec
from surgeon.methods import config_of
from surgeon.peft_format import files
from surgeon.planning.select import PlanError
from tests.hostile.common import assert_exit_2, cli, net
from tests.models import tiny_llama

VARIANTS = {"use_qalora": True, "alora_invocation_tokens": [1, 2], "megatron_config": {"a": 1},
            "velora_config": {"a": 1}, "kasa_config": {"a": 1}, "arrow_config": {"a": 1},
            "monteclora_config": {"a": 1}, "use_bdlora": {"a": 1}}


def test_every_unimplemented_lora_option_is_listed():
    assert set(config_of("lora").unimplemented) == set(VARIANTS)


def _spec_text(field, value) -> str:
    shown = {True: "true"}.get(value, value) if not isinstance(value, (dict, list)) else None
    if isinstance(value, dict):
        shown = "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        shown = "[" + ", ".join(map(str, value)) + "]"
    return f"adapter default = lora(r=2, {field}={shown}) {{ target head }}\n"


@pytest.mark.parametrize("field", sorted(VARIANTS))
def test_unimplemented_variant_is_refused_at_its_span(field):
    model = net()
    with pytest.raises(PlanError) as caught:
        surgeon.apply(_spec_text(field, VARIANTS[field]), model)
    message = str(caught.value)
    assert f"`{field}`" in message and "does not implement" in message and ":1:29:" in message
    assert not any("lora" in n for n, _ in model.named_modules())


@pytest.mark.parametrize("field", ["kasa_config", "use_qalora"])
def test_peft_checkpoint_of_a_variant_is_refused(tmp_path, field):
    from safetensors.torch import save_file

    (tmp_path / files.CONFIG_NAME).write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "target_modules": ["head"], field: VARIANTS[field]}))
    save_file({}, str(tmp_path / files.WEIGHTS_NAME))
    with pytest.raises(UserError, match=field):
        surgeon.load_adapter(net(), tmp_path)


@pytest.mark.parametrize("config", [
    {"task_type": "NOT_A_TASK"}, {"r": "8"}, {"lora_alpha": "16"}, {"r": -4},
    {"lora_dropout": 5.0}, {"init_lora_weights": "bogus"}, {"modules_to_save": ["a b"]},
    {"target_modules": ["q_proj", "with space"]}, {"rank_pattern": {"q": 0}},
])
def test_convert_writes_only_what_check_accepts(tmp_path, capsys, config):
    source = tmp_path / "adapter_config.json"
    source.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"], **config}))
    outcome = cli(capsys, "convert", source, "-o", tmp_path / "spec.peft")
    if outcome.rc == 0:
        load_spec(tmp_path / "spec.peft")  # what convert wrote, check accepts
    else:
        assert_exit_2(outcome, "adapter_config.json")
        assert not (tmp_path / "spec.peft").exists()


@pytest.mark.parametrize("name", ["a.b.c", "with space", "-rf"])
def test_convert_folder_with_odd_subfolder_names(tmp_path, capsys, name):
    folder = tmp_path / "ckpt"
    (folder / name).mkdir(parents=True)
    config = json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]})
    (folder / files.CONFIG_NAME).write_text(config)
    (folder / name / files.CONFIG_NAME).write_text(config)
    outcome = cli(capsys, "convert", folder)
    if outcome.rc == 0:
        load_spec(outcome.out)
    else:
        assert_exit_2(outcome)


def test_merge_into_tied_lm_head_warns_as_peft():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    surgeon.apply("adapter default = lora(r=2, init=false) { target lm_head }", model)
    with pytest.warns(UserWarning, match="shares its weight"):
        surgeon.merge(model)


def test_merge_untied_does_not_warn(recwarn):
    model = surgeon.apply("adapter default = lora(r=2) { target head }", net())
    surgeon.merge(model)
    assert not [w for w in recwarn if "shares its weight" in str(w.message)]


TWO = ("adapter default = lora(r=2, init=false) { target head }\n"
       "adapter other = lora(r=2, init=false) { target head }\n")


def test_set_adapter_twice_is_refused():
    model = surgeon.apply(TWO, net())
    with pytest.raises(UserError, match="twice"):
        surgeon.set_adapter(model, ["default", "default"])
    assert active_adapters(model) == ("default",)


def test_string_names_are_one_name_not_letters(tmp_path):
    model = surgeon.apply(TWO, net())
    x = torch.randn(3, 8)
    surgeon.set_adapter(model, "other")
    assert active_adapters(model) == ("other",)
    surgeon.set_adapter(model, "default")
    expected = model(x)
    surgeon.merge(model, "default")  # used to be split into d, e, f, ...
    torch.testing.assert_close(model(x), expected)
    surgeon.unmerge(model)
    surgeon.save_pretrained(model, tmp_path / "one", selected_adapters="other")
    assert set(files.adapters_in(tmp_path / "one")) == {"other"}
    with pytest.raises(UserError):
        surgeon.merge(model, ["default", "nope"])


def test_unknown_or_odd_names_in_api_calls_are_user_errors():
    model = surgeon.apply(TWO, net())
    for call in (lambda: surgeon.delete_adapter(model, "nope"), lambda: surgeon.delete_adapter(model, ["b"]),
                 lambda: surgeon.set_adapter(model, "nope"), lambda: surgeon.set_adapter(model, [1]),
                 lambda: surgeon.save_pretrained(model, "unused", selected_adapters=["nope"])):
        with pytest.raises(UserError):
            call()
    assert active_adapters(model) == ("default",)
