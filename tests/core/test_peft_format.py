"""The checkpoint key mapping against PEFT itself, and the file layer (atomic writes, pickles).

In-memory names are PEFT's, so a PEFT model's own state_dict and module tree must give, through
`surgeon.peft_format.checkpoint`, exactly the tensors `get_peft_model_state_dict` returns.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from transformers import PreTrainedModel

from surgeon.peft_format import checkpoint as pf
from surgeon.peft_format import files
from tests.models import CASES


def peft_layout(pm) -> pf.Layout:
    base = pm.base_model.model
    adapted = tuple(n for n, m in base.named_modules() if isinstance(m, LoraLayer))
    saved = tuple((n, tuple(m.modules_to_save)) for n, m in base.named_modules()
                  if isinstance(m, ModulesToSaveWrapper))
    embeds = ()
    if isinstance(base, PreTrainedModel):
        io = (base.get_input_embeddings(), base.get_output_embeddings())
        embeds = tuple(n for n, m in base.named_modules()
                       if isinstance(m, LoraLayer) and any(m is e for e in io))
    return pf.Layout(adapted, saved, tuple(pm.peft_config), embeds)


LAYOUT_CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules=["q_proj", "embed_tokens"], use_dora=True, bias="all")),
    ("llama", dict(target_modules=r".*\.(q_proj|embed_tokens)")),
    ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only")),
    ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"], bias="all")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], bias="all")),
    ("convnet", dict(target_modules=["conv1", "head"], use_dora=True)),
    ("nested", dict(target_modules=["embed", "enc.proj"], modules_to_save=["dec.out"])),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case,config", LAYOUT_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_adapter_state_dict_equals_peft(case, config):
    c = CASES[case]
    pm = get_peft_model(c.build(), LoraConfig(**config))
    pm.add_adapter("other", LoraConfig(target_modules=list(c.qv), r=4))
    state = pm.base_model.model.state_dict()
    layout = peft_layout(pm)
    for name in ("default", "other"):
        ref = get_peft_model_state_dict(pm, adapter_name=name)
        mine = pf.adapter_state_dict(state, layout, name, pm.peft_config[name].to_dict())
        assert sorted(mine) == sorted(ref)
        assert all(mine[k] is ref[k] or torch.equal(mine[k], ref[k]) for k in ref)
        # loading maps every adapter-owned checkpoint key back to the model key PEFT uses
        back = pf.match_checkpoint(ref, state, layout, name)
        assert all(torch.equal(back[k], state[k]) for k in back)


@pytest.mark.parametrize("key,adapter,ckpt", [
    ("a.q.lora_A.default.weight", "default", "base_model.model.a.q.lora_A.weight"),
    ("a.e.lora_embedding_A.other", "other", "base_model.model.a.e.lora_embedding_A"),
    ("a.q.lora_magnitude_vector.default.weight", "default", "base_model.model.a.q.lora_magnitude_vector"),
    ("default.q.lora_B.default.weight", "default", "base_model.model.default.q.lora_B.weight"),
    ("a.q.base_layer.bias", "default", "base_model.model.a.q.base_layer.bias"),
])
def test_checkpoint_key(key, adapter, ckpt):
    assert pf.checkpoint_key(key, adapter) == ckpt


def test_mismatches_are_reported_together():
    layout = pf.Layout(("lin",), (), ("default",))
    state = {"lin.base_layer.weight": torch.zeros(4, 4), "lin.lora_A.default.weight": torch.zeros(2, 4),
             "lin.lora_B.default.weight": torch.zeros(4, 2)}
    ckpt = {"base_model.model.lin.lora_A.weight": torch.zeros(3, 4),
            "base_model.model.nothing.weight": torch.zeros(1)}
    with pytest.raises(files.CheckpointError) as err:
        pf.match_checkpoint(ckpt, state, layout, "default")
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "shape mismatch" in msg and "unexpected key" in msg and "missing key" in msg


def test_write_is_atomic_and_peft_shaped(tmp_path, monkeypatch):
    tensors = {"base_model.model.lin.lora_A.weight": torch.ones(2, 4)}
    cfg = {"peft_type": "LORA", "r": 2}
    files.write_checkpoint(tmp_path / "out", {"default": (cfg, tensors), "b": (cfg, tensors)}, "# card\n")
    assert (tmp_path / "out" / files.WEIGHTS_NAME).is_file()
    assert json.loads((tmp_path / "out" / "b" / files.CONFIG_NAME).read_text())["r"] == 2
    before = (tmp_path / "out" / files.CONFIG_NAME).read_text()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError):
        files.write_checkpoint(tmp_path / "out", {"default": ({"r": 9}, tensors)}, "x")
    with pytest.raises(OSError):
        files.write_checkpoint(tmp_path / "new", {"default": ({"r": 9}, tensors)}, "x")
    assert (tmp_path / "out" / files.CONFIG_NAME).read_text() == before
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_pickle_needs_opt_in(tmp_path):
    (tmp_path / files.CONFIG_NAME).write_text("{}")
    torch.save({"k": torch.ones(2)}, tmp_path / files.PICKLE_NAME)
    with pytest.raises(files.CheckpointError, match="allow_pickle"):
        files.read_checkpoint(tmp_path)
    _, tensors = files.read_checkpoint(tmp_path, allow_pickle=True)
    assert torch.equal(tensors["k"], torch.ones(2))


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / files.CONFIG_NAME).write_text("{}")
    torch.save({"k": Evil()}, tmp_path / files.PICKLE_NAME)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        files.read_checkpoint(tmp_path, allow_pickle=True)


def test_folder_layout_and_atomic_dir_modes(tmp_path):
    tensors = {"base_model.model.lin.lora_A.weight": torch.ones(2, 4)}
    files.write_checkpoint(tmp_path / "out", {"default": ({}, tensors), "b": ({}, tensors)}, "# card\n")
    assert files.adapters_in(tmp_path / "out") == {"default": tmp_path / "out", "b": tmp_path / "out" / "b"}
    assert files.adapters_in(tmp_path / "nowhere") == {}
    (tmp_path / "plain").mkdir()
    mode = (tmp_path / "plain").stat().st_mode
    assert (tmp_path / "out").stat().st_mode == mode  # ordinary permissions, not mkdtemp's 0700

    (tmp_path / "out" / "notes.txt").write_text("mine")
    with files.atomic_dir(tmp_path / "out", replace=False) as tmp:
        (tmp / files.README_NAME).write_text("new card")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # merged: other files stay
    assert (tmp_path / "out" / files.README_NAME).read_text() == "new card"
    with files.atomic_dir(tmp_path / "out", replace=True) as tmp:
        (tmp / "only.txt").write_text("x")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["only.txt"]  # swapped whole
    assert (tmp_path / "out").stat().st_mode == mode
    with pytest.raises(KeyError), files.atomic_dir(tmp_path / "deep" / "er" / "new") as tmp:
        raise KeyError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]  # parents made are undone
