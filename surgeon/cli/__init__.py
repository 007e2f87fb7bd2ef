"""The command line: argument parsing and output only, a thin face over the Python API.

    main.py            `main()`, the parser and exit codes (user errors -> 2)
    arguments.py       what commands share: `Command`, `UsageError`, --model/--input, JSON output
    commands.py        check, plan, apply, convert
    model_commands.py  merge, roles
    output.py          output paths checked before slow work (writes: surgeon.peft_format.files)
    progress.py        progress bars for long loads
"""
from surgeon.cli.main import main

__all__ = ["main"]
