"""`examples/adalora_whisper_int8.py` runs: AdaLoRA with its rank allocator on an 8-bit Whisper,
ranks pruned to the target budget, and peft 0.21 reads the checkpoint back with equal logits."""

from __future__ import annotations

import importlib.util
import json
import warnings

from tests.cli.runner import EXAMPLES
from tests.quantized.common import bnb  # noqa: F401  (skips without bitsandbytes)


def test_adalora_on_an_8bit_whisper_round_trips_through_peft(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("adalora_whisper_int8",
                                                  EXAMPLES / "adalora_whisper_int8.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diff = example.main(tmp_path)
    assert diff < 1e-5
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    kept = sum(sum(mask) for mask in config["rank_pattern"].values())
    assert config["peft_type"] == "ADALORA" and kept == 4 * len(config["rank_pattern"])
