"""Fine-tune a causal LM with a surgeon LoRA adapter on several processes: FSDP2, DDP or accelerate.

    torchrun --standalone --nproc_per_node 2 examples/finetune_fsdp.py                # FSDP2
    torchrun --standalone --nproc_per_node 2 examples/finetune_fsdp.py --engine ddp   # DDP
    torchrun --standalone --nproc_per_node 2 examples/finetune_fsdp.py --engine accelerate  # CPU: DDP
    accelerate launch --num_processes 8 --use_fsdp --fsdp_version 2 \\
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP examples/finetune_fsdp.py --engine accelerate  # GPUs

surgeon adds nothing to the training loop: apply the spec to the whole model first, then hand
the model to the engine (`fully_shard` per decoder block and then the root, `DistributedDataParallel`,
or `accelerator.prepare`). Every rank then calls `surgeon.save_pretrained`: it gathers only the
adapter tensors and rank 0 writes one PEFT checkpoint. Finally rank 0 loads that checkpoint with
`peft.PeftModel.from_pretrained` on an unsharded base model and checks it gives the sharded
model's logits.

accelerate's FSDP plugin shards only on accelerator devices (CUDA, XPU, ...); on a CPU machine
accelerate (told `cpu=True` here) runs DDP over gloo instead, however it is launched.

`--model` is anything `surgeon apply --model` takes (default `tiny:llama`, a small random model,
so this runs on CPU with the gloo backend in seconds); the text is `examples/data/`'s sentences,
tokenized by the model's tokenizer when its folder has one, else as UTF-8 bytes. On GPUs the same
script runs unchanged (`nccl` is picked when CUDA is available); see the README's "Training on
many devices" for nodes.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
import torch.distributed as dist

import surgeon
import surgeon.distributed
from surgeon.models.load import load_model

HERE = Path(__file__).resolve().parent


def token_batches(loaded, seq: int) -> torch.Tensor:
    """Every sentence of the training split as one row of `seq` token ids (truncated/padded)."""
    with open(HERE / "data" / "sentiment_train.tsv", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f, delimiter="\t")]
    vocab = loaded.model.config.vocab_size
    if loaded.source_dir is not None and (loaded.source_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(loaded.source_dir)
        rows = [tok(t)["input_ids"] for t in texts]
    else:
        rows = [[3 + b % (vocab - 3) for b in t.encode()] for t in texts]  # 0-2: special ids
    return torch.tensor([(r * (seq // len(r) + 1))[:seq] for r in rows])  # repeat short rows


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: transformers names their class `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap(model: torch.nn.Module, engine: str, optimizer_of):
    """(model as trained, optimizer, the adapted model itself, accelerator or None)."""
    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in decoder_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model, optimizer_of(model), model, None
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        return ddp, optimizer_of(ddp), ddp.module, None
    from accelerate import Accelerator

    # `accelerate launch` flags configure it; on CPU accelerate has no FSDP and runs DDP (gloo)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    trained, optimizer = accelerator.prepare(model, optimizer_of(model))
    return trained, optimizer, accelerator.unwrap_model(trained), accelerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("fsdp", "ddp", "accelerate"), default="fsdp")
    parser.add_argument("--model", default="tiny:llama")
    parser.add_argument("--spec", default=str(HERE / "lora_qv.peft"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="rows per step, over all ranks")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", default="out/finetune_fsdp", help="the checkpoint folder")
    args = parser.parse_args()

    if args.engine != "accelerate":  # accelerate starts the process group itself
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            torch.set_default_device("cuda")
    loaded = load_model(args.model)
    model = surgeon.apply(args.spec, loaded.model.train())  # on the whole model, before sharding
    data = token_batches(loaded, args.seq)
    adam = lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    trained, optimizer, adapted, accelerator = wrap(model, args.engine, adam)
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = args.batch // world
    device = accelerator.device if accelerator is not None else data.device
    sharded = surgeon.distributed.is_sharded(adapted.parameters())
    if world > 1 and not sharded and type(trained).__name__ != "DistributedDataParallel":
        raise SystemExit(f"{args.engine} left the model unwrapped on {world} ranks: gradients would "
                         "not be averaged (check the launch flags)")
    if rank == 0:
        print(f"{args.engine} on {world} ranks: {type(trained).__name__}, parameters sharded: {sharded}")

    for step in range(args.steps):
        start = (step * args.batch) % (len(data) - args.batch)
        ids = data[start + rank * per_rank:start + (rank + 1) * per_rank].to(device)
        loss = trained(input_ids=ids, labels=ids).loss
        (loss.backward() if accelerator is None else accelerator.backward(loss))
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:3d}  loss {mean.item() / world:.4f}")

    out = Path(args.out)
    surgeon.save_pretrained(adapted, out)  # every rank: gathers adapter tensors, rank 0 writes
    trained.eval()
    with torch.no_grad():
        logits = trained(input_ids=data[:2].to(device)).logits  # every rank (FSDP gathers per block)
    if rank == 0:
        check_with_peft(args.model, out, data[:2], logits)
    dist.barrier()
    dist.destroy_process_group()


def check_with_peft(model_name: str, out: Path, ids: torch.Tensor, logits: torch.Tensor) -> None:
    """The checkpoint on an unsharded base model, loaded by peft, gives the sharded logits."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(load_model(model_name).model.to(logits.device), out).eval()
    with torch.no_grad():
        diff = (peft(input_ids=ids.to(logits.device)).logits - logits).abs().max().item()
    print(f"rank 0 wrote {out}")
    print(f"peft.PeftModel.from_pretrained agrees with the trained model: max |diff| {diff:.2e}")
    assert diff < 1e-4, diff


if __name__ == "__main__":
    main()
