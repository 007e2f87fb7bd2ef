"""The subcommands of `surgeon`: each parses its flags, calls the public API, prints a summary.

Commands import torch (through the API) only when they run, so `surgeon check` and `--help` stay
instant. Anything the user can fix is raised as one of the exception types `surgeon.cli` turns
into exit code 2; this module never calls sys.exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surgeon.cli_output import atomic_dir, atomic_file, check_output


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help, examples for --help, flags and body."""

    help: str
    examples: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A bad argument or input file that argparse cannot see; the message says what to do."""


def _existing_file(path: str, what: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise UsageError(f"{what} '{path}': no such file")
    if file.is_dir():
        raise UsageError(f"{what} '{path}': is a directory")
    return file


def _load_spec(path: str):
    from surgeon.lang import load_spec

    return load_spec(_existing_file(path, "spec"))


def add_model_arguments(cmd: argparse.ArgumentParser, *, required: bool = True) -> None:
    """`--model MODEL` and the repeatable `--input SHAPE[:DTYPE]` it may need."""
    what = ("a local transformers directory, a Hub id, `minilm`, `tiny:MODEL_TYPE` (a tiny random "
            "model of any transformers architecture) or `py:MODULE:FACTORY` (any nn.Module factory)")
    cmd.add_argument("--model", required=required, metavar="MODEL",
                     help=what if required else f"(optional) resolve the spec against this model: {what}")
    cmd.add_argument("--input", action="append", default=[], type=_input_shape, metavar="SHAPE[:DTYPE]",
                     help="an example input for capture, e.g. 2x16:float32 or 1x8:int64 "
                          "(repeat for several positional inputs)")


def _input_shape(text: str):
    from surgeon.models import InputShape  # torch-free at import

    try:
        return InputShape.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def load_model_arg(args: argparse.Namespace):
    """The model `--model` names, with the `--input` example inputs (surgeon.models)."""
    from surgeon.models import load_model

    return load_model(args.model, inputs=tuple(args.input))


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


# --------------------------------------------------------------------------- check


def _check_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("files", nargs="+", metavar="FILE", help=".peft files to check")


def run_check(args: argparse.Namespace) -> int:
    """Every file is checked; all diagnostics are shown before the exit code says any failed."""
    from surgeon.lang import SpecError

    failed = 0
    for name in args.files:
        try:
            spec = _load_spec(name)
        except (SpecError, UsageError) as error:
            prefix = "surgeon: error: " if isinstance(error, UsageError) else ""
            print(prefix + str(error).rstrip("\n"), file=sys.stderr)
            failed += 1
            continue
        for adapter in spec.adapters:
            print(f"{Path(name).name}: {adapter_summary(adapter)}")
    if failed:
        print(f"surgeon: {failed} of {len(args.files)} files have errors", file=sys.stderr)
    return 2 if failed else 0


# Each method's rank and scale fields, by PEFT name, as the summary line shows them.
_SUMMARY_FIELDS = {
    "lora": (("r", "r"), ("alpha", "lora_alpha")),
    "adalora": (("init_r", "init_r"), ("target_r", "target_r"), ("alpha", "lora_alpha")),
    "loha": (("r", "r"), ("alpha", "alpha")),
    "lokr": (("r", "r"), ("alpha", "alpha")),
    "ia3": (),
}
_SUMMARY_FLAGS = (("use_dora", "dora"), ("use_rslora", "rslora"))


def adapter_summary(adapter) -> str:
    """`adapter 'default' lora r=16 alpha=32, 2 target rules` (flags such as dora appended)."""
    from surgeon.lang.spec import Target

    values = " ".join(f"{label}={adapter.option(field)}"
                      for label, field in _SUMMARY_FIELDS.get(adapter.method, ()))
    flags = [label for field, label in _SUMMARY_FLAGS
             if adapter.method == "lora" and adapter.option(field) is True]
    targets = len(adapter.rules_of(Target))
    rules = f"{targets} target rule{'s' if targets != 1 else ''}" if targets else "default targets"
    head = " ".join(part for part in (f"adapter '{adapter.name}'", adapter.method, values) if part)
    return ", ".join([head, *flags, rules])


# --------------------------------------------------------------------------- convert


def _convert_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("source", metavar="SOURCE",
                     help="adapter_config.json (or a PEFT checkpoint folder) to decompile, "
                          "or a .peft file to compile")
    cmd.add_argument("-o", "--output", metavar="OUT",
                     help="the .peft file to write (stdout if omitted), or the folder for "
                          "adapter_config.json files (required when compiling)")
    cmd.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    add_model_arguments(cmd, required=False)


def run_convert(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if not source.exists():
        raise UsageError(f"'{args.source}': no such file or directory")
    if source.is_dir() or source.suffix == ".json":
        return _decompile(source, args.output)
    if args.output is None:
        raise UsageError("compiling a .peft file needs -o DIR for its adapter_config.json files")
    return _compile(args, Path(args.output))


def _decompile(source: Path, output: str | None) -> int:
    from surgeon.lang import print_spec
    from surgeon.lang.spec import Spec
    from surgeon.peft_config import spec_from_peft_config

    if output is not None:
        check_output(Path(output), directory=False)
    configs = _read_configs(source)
    adapters = tuple(spec_from_peft_config(config, name=name) for name, config in configs.items())
    text = print_spec(Spec(adapters))
    if output is None:
        sys.stdout.write(text)
        return 0
    with atomic_file(Path(output)) as tmp:
        tmp.write_text(text)
    print(f"wrote {output} ({len(adapters)} adapter{'s' if len(adapters) != 1 else ''})")
    return 0


def _read_configs(source: Path) -> dict[str, dict]:
    """{adapter name: config}: one file, or a checkpoint folder with adapters in subfolders."""
    if source.is_file():
        return {"default": _read_json(source)}
    found = {}
    if (source / "adapter_config.json").is_file():
        found["default"] = _read_json(source / "adapter_config.json")
    for sub in sorted(p for p in source.iterdir() if (p / "adapter_config.json").is_file()):
        found[sub.name] = _read_json(sub / "adapter_config.json")
    if not found:
        raise UsageError(f"'{source}': no adapter_config.json in it or its subfolders")
    return found


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"'{path}': not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise UsageError(f"'{path}': expected a JSON object (a PEFT adapter_config.json)")
    return data


def _compile(args: argparse.Namespace, output: Path) -> int:
    """One adapter_config.json per adapter; with --model, exactly the planned sites."""
    spec = _load_spec(args.source)
    check_output(output, directory=True, force=args.force)
    configs = _configs_for_model(spec, args) if args.model else _configs_without_model(spec)
    with atomic_dir(output, force=args.force) as tmp:
        for name, config in configs.items():
            folder = tmp if name == "default" else tmp / name  # PEFT's layout
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in configs:
        where = output if name == "default" else output / name
        print(f"wrote {where / 'adapter_config.json'} (adapter '{name}')")
    return 0


def _configs_without_model(spec) -> dict[str, dict]:
    from surgeon.peft_config import NeedsModelError, peft_config_from_adapter

    try:
        return {a.name: peft_config_from_adapter(a) for a in spec.adapters}  # all before writing
    except NeedsModelError as error:
        raise UsageError(f"{error}; pass --model MODEL to resolve it against a model") from None


def _configs_for_model(spec, args: argparse.Namespace) -> dict[str, dict]:
    from surgeon.peft_config import peft_config_for_sites
    from surgeon.planner import plan as make_plan

    loaded = load_model_arg(args)
    plan = make_plan(spec, loaded.model, example_inputs=loaded.example_inputs)
    return {a.name: peft_config_for_sites(a.adapter, a.sites, base_model_name_or_path=loaded.reference)
            for a in plan.adapters}


# --------------------------------------------------------------------------- plan and apply


def _plan_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("spec", metavar="SPEC", help="the .peft file")
    add_model_arguments(cmd)
    cmd.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args: argparse.Namespace) -> int:
    from surgeon.planner import plan as make_plan

    spec = _load_spec(args.spec)
    loaded = load_model_arg(args)
    plan = make_plan(spec, loaded.model, example_inputs=loaded.example_inputs)
    if args.json:
        print_json(plan.to_json())
    else:
        print(plan)
    return 0


def _apply_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("spec", metavar="SPEC", help="the .peft file")
    add_model_arguments(cmd)
    cmd.add_argument("-o", "--output", required=True, metavar="DIR", help="where to write the checkpoint")
    cmd.add_argument("--adapter", metavar="NAME", help="apply only this adapter of the spec")
    cmd.add_argument("--seed", type=int, default=0, help="seed for the adapter initialisation (default 0)")
    cmd.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def run_apply(args: argparse.Namespace) -> int:
    spec = _only_adapter(_load_spec(args.spec), args.adapter)
    output = Path(args.output)
    check_output(output, directory=True, force=args.force)  # before the slow part (torch too)

    import torch

    from surgeon.api import apply, save_pretrained
    from surgeon.transaction import state_of
    from surgeon.planner import plan as make_plan

    loaded = load_model_arg(args)
    _warn_unmatched(make_plan(spec, loaded.model, example_inputs=loaded.example_inputs))
    torch.manual_seed(args.seed)
    apply(spec, loaded.model, example_inputs=loaded.example_inputs)
    with atomic_dir(output, force=args.force) as tmp:
        save_pretrained(loaded.model, tmp)
    installed = state_of(loaded.model).adapters
    sites = sum(len(a.sites) for a in installed)
    params = list(loaded.model.parameters())
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    # PEFT's print_trainable_parameters numbers: adapter parameters count in the total
    print(f"{loaded.name}: {sites} sites; trainable params: {trainable:,} || all params: {total:,} "
          f"|| trainable%: {100 * trainable / total:.4f}")
    for a in installed:
        where = output if a.adapter.name == "default" else output / a.adapter.name
        print(f"wrote adapter '{a.adapter.name}' ({a.adapter.method}, {len(a.sites)} sites) to {where}")
    return 0


def _warn_unmatched(plan) -> None:
    """Rules that selected nothing: not errors (PEFT ignores them too), but likely mistakes."""
    for u in plan.unmatched:
        where = f"{u.location}: " if u.location else ""
        print(f"{where}warning: `{u.text}` ({u.rule} rule of adapter '{u.adapter}') matched nothing",
              file=sys.stderr)


def _only_adapter(spec, name: str | None):
    """The spec, or a spec holding only adapter `name`."""
    from dataclasses import replace

    if name is None:
        return spec
    names = [a.name for a in spec.adapters]
    if name not in names:
        raise UsageError(f"--adapter '{name}': the spec has {', '.join(repr(n) for n in names)}")
    return replace(spec, adapters=(spec.adapter(name),))


# --------------------------------------------------------------------------- the commands

CHECK = Command(
    "check .peft files and summarise each adapter",
    "  surgeon check examples/*.peft\n"
    "  surgeon check examples/lora_qv.peft\n"
    "      lora_qv.peft: adapter 'default' lora r=8 alpha=16, 1 target rule\n",
    _check_arguments, run_check)
PLAN = Command(
    "dry run: every site a spec selects on a model, with rank, alpha and parameters",
    "  surgeon plan examples/lora_qv.peft --model tiny:llama\n"
    "  surgeon plan spec.peft --model minilm --json\n"
    "  surgeon plan spec.peft --model py:mypkg.nets:build --input 2x16:float32\n",
    _plan_arguments, run_plan)
APPLY = Command(
    "compile a spec against a model and write the initialised adapter as a PEFT checkpoint",
    "  surgeon apply examples/lora_qv.peft --model tiny:llama -o out/adapter\n"
    "  surgeon apply spec.peft --model ./my-model --adapter other --seed 1 -o out/other\n",
    _apply_arguments, run_apply)
CONVERT = Command(
    "translate between PEFT adapter_config.json files and .peft specs",
    "  surgeon convert out/adapter/adapter_config.json -o spec.peft   # decompile\n"
    "  surgeon convert out/adapter                                    # every adapter, to stdout\n"
    "  surgeon convert spec.peft -o out/configs                       # one config per adapter\n"
    "  surgeon convert examples/lora_qv.peft --model tiny:llama -o cfg # roles resolved: exact targets\n",
    _convert_arguments, run_convert)
