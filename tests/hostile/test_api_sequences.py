"""Class 10: random sequences of API calls (apply, load, set_adapter, merge, unmerge, delete,
save and reload) on surgeon and on peft, run side by side as two models of the same state:
after every step both give the same outputs, and their saved adapters hold the same tensors.

peft gets each adapter by loading what surgeon saved, so both start from identical weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import surgeon
from surgeon.api import active_adapters
from surgeon.peft_format import files
from tests.hostile.common import net

peft = pytest.importorskip("peft")

NAMES = ("default", "b", "c")
TARGETS = {"default": "head", "b": "query_projection_matrix", "c": "head, value_projection_matrix"}
STEPS = st.lists(st.tuples(st.sampled_from(("add", "set", "merge", "unmerge", "delete", "save")),
                           st.integers(0, 2)), min_size=1, max_size=8)
X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


class Pair:
    """The same adapter state in surgeon (`ours`) and peft (`theirs`)."""

    def __init__(self, folder: Path):
        self.folder, self.count = folder, 0
        self.ours = surgeon.apply(self.spec("default"), net())
        self.theirs = peft.PeftModel.from_pretrained(net(), self.save_ours(), adapter_name="default")

    @staticmethod
    def spec(name: str) -> str:
        rank = 2 + NAMES.index(name)
        return f"adapter {name} = lora(r={rank}, alpha=4, init=false) {{ target {TARGETS[name]} }}"

    def save_ours(self, **kwargs) -> Path:
        self.count += 1
        out = self.folder / f"s{self.count}"
        surgeon.save_pretrained(self.ours, out, **kwargs)
        return out

    def merged(self) -> bool:
        return any(layer.merged for _, layer in surgeon.api.adapted_layers(self.ours))

    def step(self, op: str, pick: int) -> None:
        """One call on both; `pick` chooses a new name for `add`, an existing one otherwise."""
        have = surgeon.api.require_state(self.ours).names
        new = [n for n in NAMES if n not in have]
        name = new[pick % len(new)] if op == "add" and new else have[pick % len(have)]
        if op == "add" and name not in have:
            surgeon.apply(self.spec(name), self.ours)
            saved = files.adapter_dir(self.save_ours(selected_adapters=[name]), name)
            self.theirs.load_adapter(saved, adapter_name=name)
        elif op == "set" and name in have and not self.merged():
            surgeon.set_adapter(self.ours, name)
            self.theirs.set_adapter(name)
        elif op == "merge" and not self.merged():
            surgeon.merge(self.ours)
            self.theirs.merge_adapter()
        elif op == "unmerge":
            surgeon.unmerge(self.ours)
            self.theirs.unmerge_adapter()
        elif op == "delete" and name in have and len(have) > 1 and not self.merged():
            surgeon.delete_adapter(self.ours, name)
            self.theirs.delete_adapter(name)
        elif op == "save" and not self.merged():
            self.compare_saved()

    def compare_outputs(self) -> bool:
        """False when PEFT itself cannot run any more: deleting the active adapter can leave its
        model-level record naming a deleted adapter (its first layer's pick), and its forward
        then raises KeyError; nothing is left to compare against."""
        with torch.no_grad():
            try:
                theirs = self.theirs(X)
            except KeyError:
                assert self.theirs.active_adapter not in self.theirs.peft_config
                return False
            torch.testing.assert_close(self.ours(X), theirs, atol=1e-5, rtol=1e-5)
        assert set(active_adapters(self.ours)) == set(self.theirs.active_adapters)
        return True

    def compare_saved(self) -> None:
        ours = self.save_ours()
        theirs = self.folder / f"p{self.count}"
        self.theirs.save_pretrained(theirs)
        assert set(files.adapters_in(ours)) == set(files.adapters_in(theirs))
        for name, folder in files.adapters_in(ours).items():
            a = load_file(folder / files.WEIGHTS_NAME)
            b = load_file(files.adapters_in(theirs)[name] / files.WEIGHTS_NAME)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        # what each saved loads back, in the other's loader too, with the same outputs (each
        # adapter's folder: with `default` deleted, none sits at the top)
        for folder in (ours, theirs):
            sub = next(iter(files.adapters_in(folder).values()))
            back = surgeon.load_adapter(net(), sub)
            oracle = peft.PeftModel.from_pretrained(net(), sub)
            with torch.no_grad():
                torch.testing.assert_close(back(X), oracle(X), atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(STEPS)
def test_random_api_sequences_match_peft(steps):
    with tempfile.TemporaryDirectory() as tmp:
        pair = Pair(Path(tmp))
        pair.compare_outputs()
        for op, pick in steps:
            pair.step(op, pick)
            if not pair.compare_outputs():
                break
