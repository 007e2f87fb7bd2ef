"""What every subcommand shares: the `Command` record, `UsageError`, the `--model`/`--input`
flags and the model they name, and JSON output.

`commands.py` (check, plan, apply, convert) and `model_commands.py` (merge, roles) both build on
this module and not on each other. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import UserError


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help, examples for --help, flags and body."""

    help: str
    examples: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class UsageError(UserError):
    """A bad argument or input file that argparse cannot see; the message says what to do."""


def _existing_file(path: str, what: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise UsageError(f"{what} '{path}': no such file")
    if file.is_dir():
        raise UsageError(f"{what} '{path}': is a directory")
    return file


def load_spec_arg(path: str):
    """The spec in the .peft file `path`, or a UsageError when there is no such file."""
    from surgeon.lang import load_spec

    return load_spec(_existing_file(path, "spec"))


def check_spec_arg(path: str):
    """`(spec, text, warnings)` of the .peft file `path` (`surgeon check` shows the warnings)."""
    from surgeon.lang.parser import check_file

    return check_file(_existing_file(path, "spec"))


def add_model_arguments(cmd: argparse.ArgumentParser, *, required: bool = True) -> None:
    """`--model MODEL` and the repeatable `--input SHAPE[:DTYPE]` it may need."""
    what = ("a local transformers directory, a Hub id, `minilm`, `tiny:MODEL_TYPE` (a tiny random "
            "model of any transformers architecture) or `py:MODULE:FACTORY` (any nn.Module factory)")
    cmd.add_argument("--model", required=required, metavar="MODEL",
                     help=what if required else f"(optional) resolve the spec against this model: {what}")
    cmd.add_argument("--input", action="append", default=[], type=_input_shape, metavar="SHAPE[:DTYPE]",
                     help="an example input for capture, e.g. 2x16:float32 or 1x8:int64 "
                          "(repeat for several positional inputs)")
    cmd.add_argument("--load-in", choices=("4bit", "8bit"), default=None,
                     help="load a directory or Hub --model quantised by bitsandbytes: 4bit (nf4, "
                          "QLoRA) or 8bit (LLM.int8)")



def add_adapter_arguments(cmd: argparse.ArgumentParser) -> None:
    """`--adapter DIR_OR_ID` (a PEFT checkpoint folder or a Hub id `user/repo`) and `--revision`."""
    cmd.add_argument("--adapter", required=True, metavar="ADAPTER",
                     help="a PEFT checkpoint folder (written by peft or by surgeon), or a Hub id "
                          "`user/repo` (fetched through the Hugging Face cache; offline-aware)")
    cmd.add_argument("--revision", default=None, metavar="REV",
                     help="with a Hub id for --adapter: the branch, tag or commit (default: main)")


def adapter_arg(args: argparse.Namespace) -> Path:
    """The local folder `--adapter` names: itself, or the Hub snapshot of `--adapter` at
    `--revision` (a `HubError`, one sentence, when it cannot be had)."""
    from surgeon.integrations.hub import adapter_folder

    return adapter_folder(args.adapter, revision=args.revision)

def _input_shape(text: str):
    from surgeon.models.load import InputShape  # torch-free at import

    try:
        return InputShape.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def seed(text: str) -> int:
    """`--seed`: an int torch.manual_seed accepts (0 <= seed < 2**64), checked by argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed '{text}': a whole number") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range: 0 <= seed < 2**64")
    return value


def load_model_arg(args: argparse.Namespace):
    """The model `--model` names, with the `--input` example inputs (surgeon.models.load)."""
    from surgeon.models.load import load_model

    return load_model(args.model, inputs=tuple(args.input), load_in=vars(args).get("load_in"))


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
