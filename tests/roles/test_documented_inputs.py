"""Input shapes read from a forward's docstring (surgeon.models.documented).

Oracle: the shapes written in the docstring, worked out by hand from the config below.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from surgeon.models.documented import GUESS, documented_dims, documented_tensor, size_of


class _Documented(nn.Module):
    config = SimpleNamespace(block_size=4, target_layer_ids=[1, 2, 3], num_codebooks=9)

    def forward(self, noise_embeds, context, pooled_idx, marks, undocumented):
        r"""
        noise_embeds (`torch.Tensor` of shape `[batch_size, config.block_size, dim]`):
            Noise.
        context (`torch.Tensor` of shape `(batch_size, previous_tokens, dim * len(config.target_layer_ids))`):
            Context.
        pooled_idx (`torch.Tensor` of shape `(num_tokens, pool_h * pool_w)`):
            Indices.
        marks (`torch.LongTensor` of shape `(num_codebooks,)`):
            Marks.
        """


def test_dimensions_split_at_top_level_commas_only() -> None:
    model = _Documented()
    assert documented_dims(model, "context") == ["batch_size", "previous_tokens", "dim * len(config.target_layer_ids)"]
    assert documented_dims(model, "marks") == ["num_codebooks"]
    assert documented_dims(model, "undocumented") is None


def test_sizes_come_from_config_keys_their_lengths_and_known_names() -> None:
    config = _Documented.config
    assert size_of(config, "config.block_size", {}) == 4
    assert size_of(config, "dim * len(config.target_layer_ids)", {"dim": 16}) == 48
    assert size_of(config, "pool_h * pool_w", {}) is None  # nothing sizes them: no guess unless asked
    assert size_of(config, "pool_h * pool_w", {}, guess=True) == GUESS * GUESS


def test_documented_tensors_have_the_documented_shape_and_kind() -> None:
    model, known = _Documented(), {"batch_size": 1, "dim": 16}
    noise = documented_tensor(model, "noise_embeds", known, "cpu")
    assert noise.shape == (1, 4, 16) and noise.dtype == torch.float32
    assert documented_tensor(model, "context", known, "cpu").shape == (1, GUESS, 48)
    indices = documented_tensor(model, "pooled_idx", known, "cpu")
    assert indices.shape == (GUESS, GUESS * GUESS) and indices.dtype == torch.long  # `_idx`: indices
    marks = documented_tensor(model, "marks", known, "cpu")
    assert marks.shape == (9,) and marks.dtype == torch.long  # a LongTensor
    assert documented_tensor(model, "undocumented", known, "cpu") is None
