"""AdaLoRA's rank allocator: PEFT 0.21's `RankAllocator` + `AdaLoraModel.update_and_allocate`.

A training loop calls it once per step, after `loss.backward()` and `optimizer.step()`, before
`zero_grad()` (it reads the gradients):

    allocator = surgeon.methods.adalora.RankAllocator(model)
    for step in range(total_step):
        loss = model(**batch).loss + surgeon.methods.adalora.orth_loss(model)
        loss.backward(); optimizer.step()
        allocator.update_and_allocate(step)
        optimizer.zero_grad()
    surgeon.save_pretrained(model, "out/")   # PEFT's files: rank_pattern + the kept triplets
    allocator.finalize()               # optional: cut the modules to the kept triplets

Each step until `total_step - tfinal` updates every factor entry's sensitivity `|p * grad|`,
smoothed (`beta1`) and with its uncertainty (`beta2`); from step `tinit` on, every `deltaT`
steps, the budget of kept triplets falls on a cubic schedule from `init_r` per module to
`target_r` per module, and the triplets scoring lowest get their `E` entry zeroed. At
`total_step - tfinal` the final mask is fixed (`rank_pattern`), and later steps re-apply it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from surgeon.lang.spec import Option
from surgeon.lang.values import Table
from surgeon.methods.adalora.regularizer import trainable_adapter
from surgeon.runtime.state import require_state, set_state
from surgeon.runtime.wrappers import adapted_layers

_FACTORS = ("lora_A", "lora_B", "lora_E")


class RankAllocator:
    """Sensitivity-based rank pruning for one adalora adapter (see the module docstring).

    Attributes:
        rank_pattern: `{"<path>.lora_E.<adapter>": [kept, ...]}` after the last allocation
            (PEFT's `config.rank_pattern` during training), None before any.
        budget: the number of triplets kept at the last step.
    """

    def __init__(self, model: nn.Module, adapter: str | None = None) -> None:
        self.model, self.adapter = model, adapter or trainable_adapter(model)
        spec = require_state(model).get(self.adapter).adapter
        get = spec.option
        self.tinit, self.tfinal, self.total_step = get("tinit"), get("tfinal"), get("total_step")
        self.delta_t, self.target_r = get("deltaT"), get("target_r")
        self.beta1, self.beta2 = float(get("beta1")), float(get("beta2"))
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must lie strictly between 0 and 1, not "
                             f"{self.beta1} and {self.beta2}")
        self.layers = [(path, layer) for path, layer in adapted_layers(model)
                       if layer.method.name == "adalora" and self.adapter in layer.sites]
        self.init_bgt = sum(layer.lora_A[self.adapter].shape[0] for _, layer in self.layers)
        self.target_bgt = self.target_r * len(self.layers)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.budget = self.init_bgt
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def _factors(self):
        for path, layer in self.layers:
            for name in _FACTORS:
                yield (path, name), layer._modules[name][self.adapter]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """`(budget, whether to mask at this step)`: warm-up, cubic decrease, final phase."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        coeff = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (coeff ** 3) + self.target_bgt)
        return budget, step % self.delta_t == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Smoothed sensitivity and uncertainty of every factor entry, from the gradients."""
        for key, p in self._factors():
            if key not in self.ipt:
                for table in (self.ipt, self.exp_avg_ipt, self.exp_avg_unc):
                    table[key] = torch.zeros_like(p)
            self.ipt[key] = (p * p.grad).abs().detach()
            self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * self.ipt[key]
            self.exp_avg_unc[key] = (self.beta2 * self.exp_avg_unc[key]
                                     + (1 - self.beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs())

    def _score(self, path: str, name: str) -> torch.Tensor:
        return self.exp_avg_ipt[(path, name)] * self.exp_avg_unc[(path, name)]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the `E` entries of the lowest-scoring triplets so `budget` remain."""
        triplets = {}
        for path, _ in self.layers:
            a = self._score(path, "lora_A").mean(dim=1, keepdim=True)
            b = self._score(path, "lora_B").mean(dim=0).view(-1, 1)
            triplets[path] = (self._score(path, "lora_E").view(-1)
                              + torch.cat([a, b], dim=1).sum(dim=1)).view(-1, 1)
        threshold = torch.kthvalue(torch.cat([t.view(-1) for t in triplets.values()]),
                                   k=self.init_bgt - budget)[0].item()
        pattern = {}
        for path, layer in self.layers:
            pruned = triplets[path] <= threshold
            layer.lora_E[self.adapter].masked_fill_(pruned, 0.0)
            pattern[f"{path}.lora_E.{self.adapter}"] = (~pruned).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self) -> None:
        for path, layer in self.layers:
            keep = torch.tensor(self.rank_pattern[f"{path}.lora_E.{self.adapter}"])
            layer.lora_E[self.adapter].masked_fill_(~keep.to(layer.lora_E[self.adapter].device)[:, None], 0.0)

    def update_and_allocate(self, step: int) -> None:
        """One step of PEFT's `update_and_allocate(global_step)` (see the module docstring).
        Each new mask becomes the adapter's `rank_pattern` option, as PEFT sets its config's, so
        a save at any step writes PEFT's files (the checkpoint keeps only the kept triplets)."""
        final = self.total_step - self.tfinal
        if step < final:
            self.update_ipt()
            self.budget, mask = self.budget_schedule(step)
            if mask:
                self._set_pattern(self.mask_to_budget(self.budget))
        elif step == final:
            self.budget, _ = self.budget_schedule(step)
            self._set_pattern(self.mask_to_budget(self.budget))
            self.reset_ipt()
        else:
            self.mask_using_rank_pattern()

    def _set_pattern(self, pattern: dict[str, list[bool]]) -> None:
        self.rank_pattern = pattern
        record(self.model, self.adapter, {k.replace(f".{self.adapter}", ""): v for k, v in pattern.items()})

    def finalize(self) -> dict[str, list[bool]]:
        """After training, optionally: cut every module to its kept triplets (what a PEFT load of
        the saved files builds), freeing the pruned ones' memory; saving needs no finalize.
        Returns the pattern, keys without the adapter name as PEFT saves them. Outputs are
        unchanged (pruned triplets are zero); an optimizer holding the old tensors must be
        rebuilt to train further."""
        if self.rank_pattern is None:
            raise ValueError("no rank pattern yet: call update_and_allocate up to total_step - tfinal")
        saved = {k.replace(f".{self.adapter}", ""): v for k, v in self.rank_pattern.items()}
        resize(self.model, self.adapter, saved)
        return saved


def record(model: nn.Module, adapter: str, pattern: dict[str, list[bool]]) -> None:
    """Make `pattern` the adapter's `rank_pattern` option without resizing anything: the
    layers keep their tensors (pruned triplets zeroed), the saved config and checkpoint follow
    the pattern (`checkpoint_tensors` in layer.py), as PEFT's config during training."""
    state = require_state(model)
    installed = state.get(adapter)
    table = Table(tuple((k, tuple(v)) for k, v in pattern.items()))
    options = tuple(o for o in installed.adapter.options if o.name != "rank_pattern")
    spec = replace(installed.adapter, options=options + (Option("rank_pattern", table),))
    adapters = tuple(replace(a, adapter=spec) if a.name == adapter else a for a in state.adapters)
    set_state(model, replace(state, adapters=adapters))


def resize(model: nn.Module, adapter: str, pattern: dict[str, list[bool]]) -> None:
    """Cut every module to the triplets `pattern` keeps and make `pattern` the adapter's
    `rank_pattern` option (spec, sites and layers), as a PEFT load of the saved files would."""
    state = require_state(model)
    installed = state.get(adapter)
    table = Table(tuple((k, tuple(v)) for k, v in pattern.items()))
    options = tuple(o for o in installed.adapter.options if o.name != "rank_pattern")
    spec = replace(installed.adapter, options=options + (Option("rank_pattern", table),))
    sites = tuple(replace(s, options=tuple(sorted({**dict(s.options), "rank_pattern": table.items}.items())))
                  for s in installed.sites)
    by_path = {s.path: s for s in sites}
    with torch.no_grad():
        for path, layer in adapted_layers(model):
            if adapter not in layer.sites or layer.method.name != "adalora":
                continue
            keep = torch.tensor(pattern[f"{path}.lora_E"], device=layer.lora_E[adapter].device)
            for name, rows in (("lora_A", keep), ("lora_E", keep)):
                table_ = layer._modules[name]
                table_[adapter] = nn.Parameter(table_[adapter][rows].clone(), table_[adapter].requires_grad)
            old = layer.lora_B[adapter]
            layer.lora_B[adapter] = nn.Parameter(old[:, keep].clone(), old.requires_grad)
            layer.sites[adapter] = by_path[path]
            layer.relower()
    adapters = tuple(replace(a, adapter=spec, sites=sites) if a.name == adapter else a
                     for a in state.adapters)
    set_state(model, replace(state, adapters=adapters))


__all__ = ["RankAllocator", "record", "resize"]
