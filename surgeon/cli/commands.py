"""The subcommands of `surgeon`: each parses its flags, calls the public API, prints a summary.

Commands import torch (through the API) only when they run, so `surgeon check` and `--help` stay
instant. Anything the user can fix is raised as one of the exception types `surgeon.cli.main` turns
into exit code 2; this module never calls sys.exit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from surgeon.cli.arguments import (
    Command,
    UsageError,
    add_model_arguments,
    check_spec_arg,
    load_model_arg,
    load_spec_arg,
    print_json,
    seed,
)
from surgeon.cli.output import atomic_dir, atomic_file, check_output
from surgeon.cli.progress import stage
from surgeon.peft_format import files

# --------------------------------------------------------------------------- check


def _check_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("files", nargs="+", metavar="FILE", help=".peft files to check")


def run_check(args: argparse.Namespace) -> int:
    """Every file is checked; all diagnostics are shown before the exit code says any failed."""
    from surgeon.lang import SpecError, render

    failed = 0
    for name in args.files:
        try:
            spec, text, warnings = check_spec_arg(name)
        except (SpecError, UsageError) as error:
            prefix = "surgeon: error: " if isinstance(error, UsageError) else ""
            print(prefix + str(error).rstrip("\n"), file=sys.stderr)
            failed += 1
            continue
        if warnings:
            print(render(warnings, text), file=sys.stderr)
        for adapter in spec.adapters:
            print(f"{Path(name).name}: {adapter_summary(adapter)}")
    if failed:
        print(f"surgeon: {failed} of {len(args.files)} files have errors", file=sys.stderr)
    return 2 if failed else 0


# Each method's rank and scale fields, by PEFT name, as the summary line shows them.
def adapter_summary(adapter) -> str:
    """`adapter 'default' lora r=16 alpha=32, 2 target rules` (flags such as dora appended)."""
    from surgeon.lang.spec import Target
    from surgeon.lang.vocabulary import alias_of
    from surgeon.methods import config_of

    config = config_of(adapter.method)
    values = " ".join(f"{alias_of(adapter.method, field)}={adapter.option(field)}" for field in config.summary)
    flags = [alias_of(adapter.method, field) for field in config.summary_flags if adapter.option(field) is True]
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
    cmd.add_argument("--force", action="store_true", help="replace an existing output file or folder")
    add_model_arguments(cmd, required=False)


def run_convert(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if not source.exists():
        raise UsageError(f"'{args.source}': no such file or directory")
    if source.is_dir() or source.suffix == ".json":
        return _decompile(source, args.output, force=args.force)
    if args.output is None:
        raise UsageError("compiling a .peft file needs -o DIR for its adapter_config.json files")
    return _compile(args, Path(args.output))


def _decompile(source: Path, output: str | None, *, force: bool) -> int:
    from surgeon.lang import print_spec
    from surgeon.lang.spec import Spec

    if output is not None:
        check_output(Path(output), directory=False, force=force)
    configs = _read_configs(source)
    adapters = tuple(_decompile_one(config, name, source) for name, config in configs.items())
    text = print_spec(Spec(adapters))
    _must_check(text, source)
    if output is None:
        sys.stdout.write(text)
        return 0
    with atomic_file(Path(output), force=force) as tmp:
        tmp.write_text(text)
    print(f"wrote {output} ({len(adapters)} adapter{'s' if len(adapters) != 1 else ''})")
    return 0


def _decompile_one(config: dict, name: str, source: Path):
    from surgeon.peft_format.config import ConversionError, spec_from_peft_config

    where = source if source.is_file() else files.adapter_config_path(files.adapter_dir(source, name))
    try:
        files.check_adapter_name(name)
        return spec_from_peft_config(config, name=name)
    except ConversionError as error:
        raise UsageError(f"'{where}': {error}") from None


def _must_check(text: str, source: Path) -> None:
    """convert writes only what `surgeon check` accepts: the printed spec is parsed again."""
    from surgeon.lang import SpecError, load_spec

    try:
        load_spec(text)
    except SpecError as error:
        first = error.diagnostics[0].message if error.diagnostics else str(error)
        raise UsageError(f"'{source}' has no valid .peft equivalent: {first}") from None


def _read_configs(source: Path) -> dict[str, dict]:
    """{adapter name: config}: one file, or a checkpoint folder with adapters in subfolders."""
    if source.is_file():
        return {files.DEFAULT: _read_json(source)}
    found = {name: _read_json(folder / files.CONFIG_NAME) for name, folder in files.adapters_in(source).items()}
    if not found:
        raise UsageError(f"'{source}': no {files.CONFIG_NAME} in it or its subfolders")
    return found


def _read_json(path: Path) -> dict:
    return files.read_config(path)  # a CheckpointError names the file and what is wrong


def _compile(args: argparse.Namespace, output: Path) -> int:
    """One adapter_config.json per adapter; with --model, exactly the planned sites."""
    spec = load_spec_arg(args.source)
    check_output(output, directory=True, force=args.force)
    configs = _configs_for_model(spec, args) if args.model else _configs_without_model(spec)
    with atomic_dir(output, force=args.force) as tmp:
        for name, config in configs.items():
            files.write_config(files.adapter_dir(tmp, name), config)
    for name in configs:
        print(f"wrote {files.adapter_dir(output, name) / files.CONFIG_NAME} (adapter '{name}')")
    return 0


def _configs_without_model(spec) -> dict[str, dict]:
    from surgeon.peft_format.config import NeedsModelError, peft_config_from_adapter

    try:
        return {a.name: peft_config_from_adapter(a) for a in spec.adapters}  # all before writing
    except NeedsModelError as error:
        raise UsageError(f"{error}; pass --model MODEL to resolve it against a model") from None


def _configs_for_model(spec, args: argparse.Namespace) -> dict[str, dict]:
    from surgeon.peft_format.config import peft_config_for_sites
    from surgeon.planning.planner import plan as make_plan

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
    from surgeon.planning.planner import plan as make_plan

    spec = load_spec_arg(args.spec)
    with _progress(f"loading {args.model}"):
        loaded = load_model_arg(args)
    with _progress("planning"):  # role selectors capture the graph here
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
    cmd.add_argument("--seed", type=seed, default=0, help="seed for the adapter initialisation (default 0)")
    cmd.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def run_apply(args: argparse.Namespace) -> int:
    spec = _only_adapter(load_spec_arg(args.spec), args.adapter)
    output = Path(args.output)
    check_output(output, directory=True, force=args.force)  # before the slow part (torch too)

    import torch

    from surgeon.api import apply, save_pretrained
    from surgeon.planning.planner import plan as make_plan
    from surgeon.runtime.state import state_of

    with _progress(f"loading {args.model}"):
        loaded = load_model_arg(args)
    with _progress("planning"):  # role selectors capture the graph here
        _warn_unmatched(make_plan(spec, loaded.model, example_inputs=loaded.example_inputs))
    torch.manual_seed(args.seed)
    with _progress("applying"):
        apply(spec, loaded.model, example_inputs=loaded.example_inputs)
    with _progress(f"saving {output}"), atomic_dir(output, force=args.force) as tmp:
        save_pretrained(loaded.model, tmp)
    installed = state_of(loaded.model).adapters
    sites = sum(len(a.sites) for a in installed)
    params = list(loaded.model.parameters())
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    # PEFT's print_trainable_parameters numbers: adapter parameters count in the total
    print(f"{loaded.name}: {sites} sites; trainable params: {trainable:,} || all params: {total:,} "
          f"|| trainable%: {100 * trainable / total:.4f}")
    for a in installed:
        print(f"wrote adapter '{a.adapter.name}' ({a.adapter.method}, {len(a.sites)} sites) "
              f"to {files.adapter_dir(output, a.adapter.name)}")
    return 0


def _progress(label: str):
    """`label ... 1.2 s` on stderr when it is a terminal; piped or redirected output (and so
    `--json` consumers and logs) stays exactly the command's results."""
    return stage(label, quiet=not sys.stderr.isatty())


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
