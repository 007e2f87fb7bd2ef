"""A surgeon-adapted tiny llama trains under FSDP2, DDP and accelerate (2 ranks, gloo, CPU)
exactly like one process.

One `torchrun --standalone --nproc_per_node 2` launch of `worker.py` trains under FSDP2
(`fully_shard` per decoder block, then the root), DDP, and `accelerate` with its FSDP plugin
(which accelerate runs as DDP on CPU: it shards only on accelerator devices); the reference
is the same worker in this process on the whole global batch. Compared: per-step losses, the saved adapter
tensors, eval logits (plain, as a mixed-adapter batch, merged into the shards and unmerged,
and after `load_adapter` into a freshly sharded base model), and peft loading each rank-0
checkpoint (the oracle for the saved weights and the mixed batch's base rows).

Control (not run in CI; the same worker with peft's LoRA instead of surgeon):
    python tests/distributed/worker.py OUT single --peft
    torchrun --standalone --nproc_per_node 2 tests/distributed/worker.py OUT fsdp ddp --peft
gives the same losses as surgeon's single-process run (difference 0.0 for one process and for
both engines), and `PeftModel.save_pretrained` on the FSDP2 model fails with "Attempted to access
the data pointer on an invalid python storage": peft leaves gathering to the caller.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.distributed import worker

# accelerate is in the dev extra; without it the other engines still run
ENGINES = ("fsdp", "ddp") + (("accelerate",) if importlib.util.find_spec("accelerate") else ())
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The folder holding `<engine>.pt` and `<engine>/` for the reference and every engine."""
    out = tmp_path_factory.mktemp("engines")
    (out / "a-file").write_text("a save to here must fail on every rank\n")
    torch.save(worker.train("single", out), out / "single.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(worker.__file__)), str(out), *ENGINES]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


def _result(runs: Path, engine: str) -> dict:
    return torch.load(runs / f"{engine}.pt")


@pytest.mark.parametrize("engine", ENGINES)
def test_losses_equal_one_process(runs: Path, engine: str):
    ours, ref = _result(runs, engine)["losses"], _result(runs, "single")["losses"]
    assert len(ours) == worker.STEPS
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-5
    assert ref[-1] < ref[0]  # the steps trained something


@pytest.mark.parametrize("engine", ENGINES)
def test_saved_adapter_equals_one_process(runs: Path, engine: str, tmp_path: Path):
    """Rank 0 wrote the full (gathered) adapter tensors, LoRA factors and the saved lm_head,
    equal to the one-process run's; every one of them trained."""
    import surgeon.api as S

    ours = load_file(runs / engine / "adapter_model.safetensors")
    ref = load_file(runs / "single" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(ref) and "base_model.model.lm_head.weight" in ref
    assert all(ours[k].shape == ref[k].shape for k in ref)
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) < 1e-5
    S.save_pretrained(worker.adapted_model(), tmp_path)
    initial = load_file(tmp_path / "adapter_model.safetensors")
    assert all(not torch.equal(ref[k], initial[k]) for k in ref)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("what", ["eval", "mixed", "merged", "unmerged", "loaded", "loaded_merged"])
def test_sharded_logits_equal_one_process(runs: Path, engine: str, what: str):
    ours, ref = _result(runs, engine)[what], _result(runs, "single")[what]
    assert ours.shape == ref.shape == (len(worker.ROWS), worker.SEQ, worker.VOCAB)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("engine", ENGINES)
def test_second_adapter_loads_into_the_sharded_model(runs: Path, engine: str):
    """`load_adapter` of a second (frozen) adapter into the trained sharded model, then a mixed
    batch over both: the rows equal one process's."""
    ours, ref = _result(runs, engine)["second"], _result(runs, "single")["second"]
    assert isinstance(ref, torch.Tensor), ref
    assert isinstance(ours, torch.Tensor), ours
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("engine", ENGINES)
def test_checkpoint_loads_in_peft_with_equal_outputs(runs: Path, engine: str):
    """peft is the oracle: its model from rank 0's checkpoint gives the sharded run's logits, and
    the mixed batch's rows are the adapter's or the base model's."""
    from peft import PeftModel

    ids = worker.batch(99, 0, 1)
    peft = PeftModel.from_pretrained(worker.tiny_llama(), runs / engine).eval()
    result = _result(runs, engine)
    with torch.no_grad():
        adapted = peft(input_ids=ids).logits
        with peft.disable_adapter():
            base = peft(input_ids=ids).logits
    assert (result["eval"] - adapted).abs().max().item() < 1e-5
    for row, name in enumerate(worker.ROWS):
        expected = base[row] if name == "__base__" else adapted[row]
        assert (result["mixed"][row] - expected).abs().max().item() < 1e-5
    assert (adapted - base).abs().max().item() > 1e-3  # the adapter changes the outputs


def test_only_rank_zero_writes_and_failures_reach_every_rank(runs: Path):
    """Each rank saved to a path of its own: only rank 0's exists. A save rank 0 cannot write
    fails on both ranks (rank 1 learns it from rank 0), with an error users can act on."""
    assert (runs / "rank0-of-2").is_dir() and not (runs / "rank1-of-2").exists()
    assert not [p for p in runs.iterdir() if p.name.endswith((".partial", ".old"))]
    for engine in ENGINES:
        raised = _result(runs, engine)["raised"]
        assert raised[0]["save_to_file"][:2] == ("CheckpointError", True)
        assert raised[1]["save_to_file"][:2] == ("DistributedError", True)
        assert "rank 0 failed" in raised[1]["save_to_file"][2]


def test_trainable_adapters_after_sharding_are_refused(runs: Path):
    """Adding trainable parameters to a sharded model would train them unsynchronised."""
    for rank_raised in _result(runs, "fsdp")["raised"]:
        for what in ("apply", "trainable"):
            name, user_error, message = rank_raised[what]
            assert (name, user_error) == ("DistributedError", True)
            assert "before `fully_shard`" in message


def test_is_main_process_decides_who_writes(tmp_path: Path):
    """peft's `is_main_process`: False writes nothing (no process group needed), True writes."""
    import surgeon.api as S

    model = S.apply(worker.SPEC, worker.tiny_llama())
    S.save_pretrained(model, tmp_path / "not-main", is_main_process=False)
    S.save_pretrained(model, tmp_path / "main", is_main_process=True)
    assert not (tmp_path / "not-main").exists()
    assert (tmp_path / "main" / "adapter_model.safetensors").is_file()


def test_dtensor_parameters_forward_and_mixed_batches_refuse(runs: Path):
    """With DTensor parameters and inputs (tensor parallelism), the whole-batch forward equals
    the plain one; a mixed-adapter batch refuses with a UserError instead of torch's error."""
    result = _result(runs, "fsdp")
    assert result["dtensor_forward"] < 1e-6
    for rank_raised in result["raised"]:
        name, user_error, message = rank_raised["dtensor_mixed"]
        assert (name, user_error) == ("DistributedError", True) and "DTensor" in message
