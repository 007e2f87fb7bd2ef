"""The model-side subcommands: `merge` (adapter folded into a full model) and `roles`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from surgeon.cli.arguments import (
    Command,
    UsageError,
    adapter_arg,
    add_adapter_arguments,
    add_model_arguments,
    load_model_arg,
    print_json,
)
from surgeon.cli.output import atomic_dir, check_output
from surgeon.cli.progress import LARGE_MODEL_PARAMS, bar, stage
from surgeon.peft_format import files
from surgeon.runtime.base_kinds import layer_weight, main_weight

# Tokenizer and processor files copied next to a merged transformers model.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model", "preprocessor_config.json", "processor_config.json",
                    "chat_template.jinja", "chat_template.json")


# --------------------------------------------------------------------------- merge


def _merge_arguments(cmd: argparse.ArgumentParser) -> None:
    add_model_arguments(cmd)
    add_adapter_arguments(cmd)
    cmd.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the merged model")
    cmd.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    cmd.add_argument("--safe-merge", action="store_true",
                     help="check every merged weight for NaN/inf and write nothing if one has any "
                          "(PEFT's safe_merge)")


def run_merge(args: argparse.Namespace) -> int:
    adapter = adapter_arg(args)
    if not (adapter / files.CONFIG_NAME).is_file():
        raise UsageError(f"--adapter '{args.adapter}': {_why_not_an_adapter(adapter)}")
    output = Path(args.output)
    check_output(output, directory=True, force=args.force)  # before the slow part (torch too)

    from surgeon.api import load_adapter

    with stage(f"loading {args.model}"):
        loaded = load_model_arg(args)
    total = sum(p.numel() for p in loaded.model.parameters())
    with stage(f"loading adapter {adapter}"):
        load_adapter(loaded.model, adapter)
    with stage("merging"):
        merged = _merge_and_unload(loaded.model, large=total >= LARGE_MODEL_PARAMS,
                                   safe=args.safe_merge)
    with stage(f"saving {total:,} parameters"), atomic_dir(output, force=args.force) as tmp:
        _save_model(merged, tmp, loaded.source_dir if loaded.is_transformers else None)
    print(f"merged {adapter} into {loaded.name} ({total:,} parameters)")
    print(f"wrote {output}")
    return 0


def _why_not_an_adapter(folder: Path) -> str:
    if not folder.is_dir():
        return "no such directory"
    named = sorted(files.adapters_in(folder))  # PEFT keeps non-default adapters in subfolders
    if named:
        return f"no {files.CONFIG_NAME} in it; its subfolders hold adapters {named}: pass one of them"
    return f"no {files.CONFIG_NAME} in it"


def _merge_and_unload(model, *, large: bool, safe: bool = False):
    """surgeon.api.merge_and_unload, one layer at a time so that a large model shows a bar.
    With `safe`, a merged weight holding NaN or inf stops the command before anything is written
    (PEFT's safe_merge checks the same thing)."""
    import torch

    from surgeon.api import unload, warn_if_tied
    from surgeon.runtime.state import require_state
    from surgeon.runtime.wrappers import adapted_layers

    active = require_state(model).active
    layers = list(adapted_layers(model))
    warn_if_tied(model, [(p, layer) for p, layer in layers if any(a in layer.sites for a in active)])
    for path, layer in bar(layers, total=len(layers), label="merging", large=large):
        names = [a for a in active if a in layer.sites and a not in layer.merged_adapters]
        if names:  # (a nested layer, an MHA's out_proj, is merged by its parent already)
            layer.merge(names)
            bias = getattr(layer.base_layer, "bias", None)  # an MHA has in_proj_bias instead
            finite = torch.isfinite(layer_weight(layer)).all() and (bias is None or torch.isfinite(bias).all())
            if safe and not finite:
                raise UsageError(f"--safe-merge: merging {names} into `{path}` gives NaN or inf "
                                 "weights; the adapter seems broken, nothing was written")
    return unload(model)  # merges stay; the adapted layers give way to their base layers


def _save_model(model, folder: Path, source_dir: Path | None) -> None:
    """Safetensors weights; a transformers model with its config and tokenizer files."""
    from surgeon.layer_kinds import is_transformers_model

    if is_transformers_model(model):
        model.save_pretrained(folder)
        for name in _TOKENIZER_FILES if source_dir is not None else ():
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, folder / name)
        return
    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"))  # dedupes tied weights as safetensors wants


MERGE = Command(
    "fold a PEFT adapter into its base model and save the full model (safetensors)",
    "  surgeon merge --model minilm --adapter out/adapter -o out/merged\n"
    "  surgeon merge --model meta-llama/Llama-3.2-1B --adapter ./peft-ckpt -o merged/\n"
    "  surgeon merge --model minilm --adapter out/adapter -o out/merged --safe-merge\n",
    _merge_arguments, run_merge)


# --------------------------------------------------------------------------- roles


def _roles_arguments(cmd: argparse.ArgumentParser) -> None:
    add_model_arguments(cmd)
    cmd.add_argument("--json", action="store_true", help="print the roles as JSON")


def run_roles(args: argparse.Namespace) -> int:
    from surgeon.capture.infer import analyse
    from surgeon.layer_kinds import kind_of

    loaded = load_model_arg(args)
    found = analyse(loaded.model, example_inputs=loaded.example_inputs)
    modules = dict(loaded.model.named_modules())
    rows = [{"path": path, "kind": kind_of(modules[path]) or type(modules[path]).__name__,
             "shape": _shape(modules[path]), "role": str(role), "evidence": role.evidence,
             "uncertain": role.uncertain}
            for path, role in found.roles.items()]
    # MoE expert stacks: 3-D parameters no module applies (`@moe.up` / `@moe.down` select them)
    params = dict(loaded.model.named_parameters())
    rows += [{"path": path, "kind": "Parameter", "shape": "x".join(str(n) for n in params[path].shape),
              "role": str(role), "evidence": role.evidence, "uncertain": role.uncertain}
             for path, role in found.parameters.items()]
    if args.json:
        print_json({"model": loaded.name, "layers": rows})
        return 0
    _print_roles(rows, loaded.name)
    return 0


def _shape(module) -> str:
    from surgeon.layer_kinds import kind_of

    weight = main_weight(module, kind_of(module))
    return "x".join(str(n) for n in weight.shape)


def _print_roles(rows: list[dict], name: str) -> None:
    table = [("path", "kind", "shape", "role", "evidence")] + [
        (r["path"], r["kind"], r["shape"], "@" + r["role"] + ("?" if r["uncertain"] else ""),
         r["evidence"] + (f" [uncertain: {r['uncertain']}]" if r["uncertain"] else ""))
        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["role"]] = counts.get(r["role"], 0) + 1
    summary = ", ".join(f"{n} @{role}" for role, n in counts.items())
    stacks = sum(1 for r in rows if r["kind"] == "Parameter")
    layers = f"{len(rows) - stacks} adaptable layers" + (f" and {stacks} expert stacks" if stacks else "")
    print(f"{name}: {layers}: {summary}")


ROLES = Command(
    "every adaptable layer of a model with the role inferred from its dataflow, and why",
    "  surgeon roles --model tiny:llama\n"
    "  surgeon roles --model minilm --json\n"
    "  surgeon roles --model py:mypkg.nets:build --input 1x8:int64\n",
    _roles_arguments, run_roles)
