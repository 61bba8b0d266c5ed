"""python -m tests.testbed {build,run,auto} — see docs/testbed.md."""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from vmm import hostkvm

from . import image, runner


def _testbed_wanted() -> tuple[bool, str]:
    forced = os.environ.get("SM_TESTBED")
    if forced in ("0", "1"):
        return forced == "1", f"SM_TESTBED={forced}"
    kvm = hostkvm.probe()
    return not kvm.usable, kvm.reason


@contextmanager
def _run_slot(directory: Path) -> Iterator[None]:
    """One of ``$SM_TESTBED_SLOTS`` (default 1) places to run: emulated machines on a
    small host starve each other, so by default one test bed runs at a time."""
    slots = max(1, int(os.environ.get("SM_TESTBED_SLOTS", "1")))
    names = [".run-lock"] + [f".run-lock-{n}" for n in range(1, slots)]
    with ExitStack() as stack:
        for name in names:
            lock = stack.enter_context(open(directory / name, "w"))
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                continue
        else:
            print("testbed: waiting for another test bed run to finish", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _forward(text: str) -> runner.Forward:
    try:
        return runner.Forward.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _run_in_testbed(args: argparse.Namespace) -> int:
    bed = image.build()
    with _run_slot(bed.directory.parent):
        try:
            return runner.run(bed, args.command, memory_mib=args.memory, timeout=args.timeout,
                              boot_timeout=args.boot_timeout, stall_timeout=args.stall_timeout,
                              forwards=tuple(args.forward))
        except runner.TestbedError as error:
            print(f"testbed: {error}", file=sys.stderr, flush=True)
            return error.status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed")
    commands = parser.add_subparsers(dest="action", required=True)
    build = commands.add_parser("build", help="build (or find cached) the test bed image")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    for name, text in (("run", "run CMD inside the test bed"),
                       ("auto", "run CMD directly if this host's KVM runs guests, else in the test bed")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--memory", type=int, default=6144, metavar="MiB")
        sub.add_argument("--timeout", type=float, default=3600, metavar="S",
                         help="limit on the command's run time, over every attempt")
        sub.add_argument("--boot-timeout", type=float, default=300, metavar="S")
        sub.add_argument("--stall-timeout", type=float, default=600, metavar="S",
                         help="no output for S seconds: the test bed is wedged; boot it again "
                              "(3 attempts in all, as when it crashes)")
        sub.add_argument("--forward", type=_forward, action="append", default=[],
                         metavar="HOSTPORT:GUESTPORT",
                         help="forward the host's 127.0.0.1:HOSTPORT to GUESTPORT inside the test "
                              "bed, its only network (repeatable; a direct run listens on the "
                              "host itself, so use one number for both)")
        sub.add_argument("command", nargs="+", metavar="CMD")
    args = parser.parse_args(argv)

    if args.action == "build":
        print(image.build(force=args.force).directory)
        return 0
    if args.action == "auto":
        wanted, why = _testbed_wanted()
        if not wanted:
            print(f"testbed: not needed ({why}); running directly", file=sys.stderr, flush=True)
            # `python` in CMD means the interpreter running us (the project venv's).
            path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
            return subprocess.run(args.command, env={**os.environ, "PATH": path}).returncode
        print(f"testbed: needed ({why})", file=sys.stderr, flush=True)
    return _run_in_testbed(args)


if __name__ == "__main__":
    sys.exit(main())
