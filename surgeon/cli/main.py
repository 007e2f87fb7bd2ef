"""`surgeon`: the command line, a thin face over the Python API.

    surgeon check examples/*.peft
    surgeon plan spec.peft --model tiny:llama
    surgeon apply spec.peft --model minilm -o out/adapter
    surgeon merge --model minilm --adapter out/adapter -o out/merged
    surgeon convert adapter_config.json -o spec.peft
    surgeon roles --model tiny:llama
    surgeon viz spec.peft --model tiny:llama -o model.html

Exit codes: 0 success; 2 the user can fix it (spec, model, flags, files), with one clear message
(spec errors as rendered diagnostics); 1 an internal error, with a traceback only under --debug.
Only the parser is imported up front, so `surgeon check` never imports torch.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence

from surgeon.errors import UserError

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2
# OSErrors about the machine, not the program: the user frees space or picks another place.
_MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)

def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script passes it to sys.exit)."""
    if not sys.stderr.isatty():  # weight-loading bars are noise in logs and pipes
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER
    restore = _catch_signals()
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("surgeon: interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:  # temporaries were removed on the way out, as for Ctrl-C
        print(f"surgeon: terminated by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:  # `surgeon roles ... | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as error:  # noqa: BLE001 - the one boundary where errors become exit codes
        return _report(error, debug=args.debug)
    finally:
        restore()


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised where the program is, so every `finally` and cleanup
    (atomic writes remove their temporary folders) runs, as it does for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _catch_signals():
    """Turn SIGTERM/SIGHUP into `Terminated` while a command runs; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    wanted = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    old = {s: signal.signal(s, raise_terminated) for s in wanted}
    return lambda: [signal.signal(s, h) for s, h in old.items()]


def _report(error: Exception, *, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    if isinstance(error, UserError):
        if error.rendered:
            print(str(error).rstrip("\n"), file=sys.stderr)  # already rendered diagnostics
        else:
            print(f"surgeon: error: {error}", file=sys.stderr)
        return EXIT_USER
    if isinstance(error, NotImplementedError):  # a known limitation, stated in the message
        print(f"surgeon: error: {error}", file=sys.stderr)
        return EXIT_USER
    if isinstance(error, OSError) and error.filename is not None:
        print(f"surgeon: error: '{error.filename}': {error.strerror or error}", file=sys.stderr)
        return EXIT_USER
    if isinstance(error, OSError) and error.errno in _MACHINE_ERRNOS:  # disk full, read-only, ...
        print(f"surgeon: error: {os.strerror(error.errno)}",
              file=sys.stderr)
        return EXIT_USER
    if not debug:
        print(f"surgeon: internal error: {type(error).__name__}: {error}\n"
              "rerun with --debug to see the traceback", file=sys.stderr)
    return EXIT_INTERNAL


# --------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each subcommand's --help ends with examples."""
    from surgeon.cli import commands as c
    from surgeon.cli import model_commands as m
    from surgeon.cli.viz_command import VIZ

    commands = {"check": c.CHECK, "plan": c.PLAN, "apply": c.APPLY, "merge": m.MERGE,
                "convert": c.CONVERT, "roles": m.ROLES, "viz": VIZ}
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = argparse.ArgumentParser(
        prog="surgeon", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile declarative .peft specs into PEFT-compatible adapters.",
        epilog="Run `surgeon COMMAND --help` for each command's options and examples.",
    )
    parser.set_defaults(debug=False, command=None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, command in commands.items():
        cmd = sub.add_parser(name, parents=[common], help=command.help, description=command.help,
                             epilog="examples:\n" + command.examples,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(cmd)
        cmd.set_defaults(command=name, run=command.run)
    return parser


if __name__ == "__main__":
    sys.exit(main())
