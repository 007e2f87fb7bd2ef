"""`surgeon viz [SPEC] --model MODEL -o OUT`: a picture of the model, adapted or not.

The format is the suffix of OUT: .html (interactive, self-contained), .svg and .png (Graphviz's
`dot`), .dot (the Graphviz source). The suffix and output folder are checked before the model
loads, so a typo fails in milliseconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from surgeon.cli.arguments import Command, UsageError, add_model_arguments, load_model_arg, load_spec_arg
from surgeon.cli.output import check_output

_FORMATS = (".svg", ".html", ".dot", ".png")


def _arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("spec", nargs="?", metavar="SPEC",
                     help="a .peft file: draw the model as it would adapt it (nothing is applied)")
    add_model_arguments(cmd)
    cmd.add_argument("--adapter", metavar="DIR",
                     help="a PEFT checkpoint folder: draw the model as it adapts it")
    cmd.add_argument("-o", "--output", required=True, metavar="OUT",
                     help="the picture: .html (interactive), .svg or .png (need Graphviz), or .dot")
    cmd.add_argument("--expand", nargs="?", const="", metavar="LAYER",
                     help="draw the inside of an adapted layer before and after merge (a path or a "
                          "suffix such as q_proj; the first adapted layer when no value is given)")
    cmd.add_argument("--title", help="the caption (default: the model's class)")


def run_viz(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix.lower() not in _FORMATS:
        raise UsageError(f"-o '{args.output}': the name must end in {', '.join(_FORMATS)}")
    check_output(output, directory=False, force=True)
    if output.suffix.lower() in (".svg", ".png"):
        from surgeon.pictures.dot import require_dot

        require_dot(output.suffix.lower()[1:])  # before loading the model: the package to install
    spec = load_spec_arg(args.spec) if args.spec else None
    from surgeon.pictures import viz

    loaded = load_model_arg(args)
    picture = viz(loaded.model, spec, args.adapter, example_inputs=loaded.example_inputs,
                  expand=args.expand, title=args.title or loaded.name)
    picture.save(output)
    scene = picture.scene
    took = sum(scene.stats.get("seconds", {}).values())
    for note in scene.notes:
        print(f"surgeon: note: {note}", file=sys.stderr)
    print(f"drew {loaded.name}: {len(scene.nodes)} nodes, {scene.stats['blocks']} blocks in "
          f"{len(scene.groups)} group(s), {scene.stats['layers']} adapted layers ({took:.1f} s)")
    print(f"wrote {output}")
    return 0


VIZ = Command(
    "draw a model's dataflow with its adapters (html, svg, png or dot)",
    "  surgeon viz examples/lora_qv.peft --model tiny:llama -o model.html\n"
    "  surgeon viz --model tiny:llama -o roles.svg                 # roles only, no spec\n"
    "  surgeon viz --model minilm --adapter out/adapter -o adapter.svg\n"
    "  surgeon viz examples/lora_qv.peft --model tiny:llama --expand q_proj -o lora.svg\n",
    _arguments, run_viz)
