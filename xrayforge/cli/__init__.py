"""The ``xrayforge`` command line. It parses arguments and calls each room's public API.

One module per command group, each with its parser beside its handlers (``add_parser(sub)`` and
``_cmd_*``): data (info, prepare), train, fid, sample, evaluate (classify, evaluate), demo, bench.
``build_parser`` assembles them in that order, the order of ``xrayforge --help``.

Errors: a problem with the user's input (:class:`xrayforge.errors.UserError`, a missing or
unreadable file) is one line, ``xrayforge <command>: error: <file or value>: <problem>``, exit
status 1; a bad option is one line and exit status 2. A traceback is shown only with
``--debug`` or ``XRAYFORGE_DEBUG=1``; an error nobody foresaw says so and asks for a report.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from .. import __version__
from ..errors import UserError
from . import bench, data, demo, evaluate, fid, sample, train

GROUPS = (data, train, fid, sample, evaluate, demo, bench)


class Parser(argparse.ArgumentParser):
    """A bad option is one line naming it, and a pointer to --help (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="xrayforge",
        description="Train progressive GANs on chest radiographs, sample labelled synthetic archives "
                    "with latent class optimisation, and measure them with fast, exact FID.")
    parser.add_argument("--version", action="version", version=f"xrayforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also XRAYFORGE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for group in GROUPS:
        group.add_parser(sub)
    _global_options_everywhere(parser)
    return parser


def _global_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """-v and --debug also after the command (``xrayforge fid A B --debug``, as the error messages
    suggest); given there, they are not reset by the command's own defaults."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                   help="log at INFO level")
                child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                   help="show the Python traceback of an error")
                _global_options_everywhere(child)


def command_name(args: argparse.Namespace) -> str:
    """'train', 'evaluate reader-study make', ... of parsed arguments."""
    parts = (getattr(args, a, None) for a in ("command", "classify_command", "evaluate_command", "reader_command"))
    return " ".join(p for p in parts if p)


def check_backend_env(args: argparse.Namespace) -> None:
    """An explicit XRAYFORGE_BACKEND that cannot run on the command's device fails now, not
    after minutes of work."""
    name = os.environ.get("XRAYFORGE_BACKEND", "").strip().lower()
    if not name or name == "auto" or not hasattr(args, "device"):
        return
    import torch

    from ..ops import _backend
    _backend.get_backend()  # an unknown name
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for op in _backend.GPU_VALIDATED:
        why = _backend.unavailable_reason(name, op, dev)
        if why is not None:
            raise UserError(f"XRAYFORGE_BACKEND={name}: {op} cannot run on {dev}: {why} "
                            f"(unset it, or set it to auto or torch)")


def _peer_gone(exc: BaseException) -> bool:
    """A collective that failed because another torchrun process died or left (gloo: the
    connection was closed or reset; NCCL: the communicator was aborted)."""
    try:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
    except Exception:  # noqa: BLE001
        return False
    text = str(exc)
    if "imeout" in text or "atchdog" in text:  # this process's own wait ran out: a hang, not a peer's error
        return False
    return type(exc).__name__ in ("DistBackendError", "DistNetworkError", "RuntimeError") and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _binary_size(n: int) -> str:
    """A size in bytes in the largest binary unit it reaches (a failed 1 MiB request read "0.0 GiB")."""
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}"


def describe(exc: BaseException) -> str:
    """One line for an error."""
    text = str(exc)
    if "Original Traceback" in text:  # raised in a DataLoader worker: the original error is its last line
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, _, message = last.partition(": ")
        return " ".join((message if name.rsplit(".", 1)[-1] in ("UserError", "ValueError", "FileNotFoundError")
                         else last).split())
    if isinstance(exc, ValueError):  # UserError, and the API's checks of values it was given: as they are
        pass
    elif isinstance(exc, OSError):  # a missing file, a full disk, no permission: the file and the problem
        text = f"{exc.filename}: {exc.strerror or exc}" if exc.filename is not None else str(exc)
    elif _peer_gone(exc):
        text = ("another process of this torchrun job stopped (its own error is above); this one stopped with "
                f"it ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})")
    elif type(exc).__name__ == "OutOfMemoryError":
        text = "out of GPU memory; lower --batch (or use --amp bf16 / --checkpoint-min-res where the command has them)"
    elif isinstance(exc, MemoryError) or "can't allocate memory" in text:  # numpy's, or torch's CPU allocator
        tried = re.search(r"allocate (\d+) bytes", text)  # torch's
        said = re.search(r"Unable to allocate ([\d.]+ \w?i?B)", text)  # numpy's, with its own unit
        size = (f" ({_binary_size(int(tried.group(1)))} asked at once)" if tried
                else f" ({said.group(1)} asked at once)" if said else "")
        text = (f"out of memory{size}; lower --batch, or the sizes given to the networks (--latent-dim, "
                f"--fmap-base, --fmap-max), where the command has them")
    else:
        text = (f"{type(exc).__name__}: {str(exc).strip()} (an unexpected error; run again with --debug for the "
                f"traceback and please report it)")
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("XRAYFORGE_DEBUG", "").strip() not in ("", "0")
    name = command_name(args)
    try:
        check_backend_env(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\nxrayforge {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error is one line unless --debug
        if debug:
            raise
        print(f"xrayforge {name}: error: {describe(exc)}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group on the way out, error or not: a process that exits
    holding it aborts ('terminate called without an active exception') and torchrun then prints a
    page of tracebacks after the one-line error."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving is best effort; the command's own outcome stands
        pass
