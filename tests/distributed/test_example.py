"""`examples/finetune_fsdp.py` runs end to end under torchrun (FSDP2, 2 ranks, gloo, a few steps).

The example asserts its own oracle check (peft loads rank 0's checkpoint on an unsharded base
model and gives the sharded model's logits); this test checks that it ran, sharded, and that
rank 0 alone wrote one checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_finetune_fsdp_example(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "examples/finetune_fsdp.py", "--steps", "2", "--out", str(tmp_path / "adapter")]
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "fsdp on 2 ranks" in done.stdout and "parameters sharded: True" in done.stdout, done.stdout
    assert "peft.PeftModel.from_pretrained agrees" in done.stdout, done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
