"""``python -m sm_kernel -f CONNECTION_FILE`` runs the kernel (Jupyter does this);
``python -m sm_kernel install`` registers it."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys

from sm_kernel.install import DEFAULT_NAME


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install"]:
        return install_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m sm_kernel", description="the sm Jupyter kernel")
    parser.add_argument("-f", "--connection-file", required=True, help="the connection file Jupyter wrote")
    parser.add_argument("--image", help="image to boot (default: the built-in python-default)")
    parser.add_argument("--memory", type=int, default=1024, metavar="MiB", help="guest memory (default 1024)")
    parser.add_argument("--cpus", type=int, default=1, help="guest vCPUs (default 1)")
    parser.add_argument("--builtin-executor", action="store_true",
                        help="run cells in sm's small built-in executor even when the image has ipykernel")
    parser.add_argument("--no-vm", action="store_true",
                        help="run the cells on this host through the agent, with NO isolation (tests of the relay)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SM_KERNEL_LOG", "WARNING").upper(),
                        format="sm_kernel: %(asctime)s %(message)s")
    faulthandler.enable()  # a crash in native code (KVM, cffi) says where
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is it stuck?
    with open(args.connection_file) as file:
        connection = json.load(file)
    from sm_kernel.kernel import Options, SmKernel
    kernel = SmKernel(connection, Options(image=args.image, cpus=args.cpus, memory_mib=args.memory,
                                          no_vm=args.no_vm, builtin_executor=args.builtin_executor))
    kernel.run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # daemon threads (forwards, device threads of a stopped VM) need no join


def install_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sm_kernel install", description="register the sm kernel")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="in the user's Jupyter data directory")
    where.add_argument("--sys-prefix", action="store_true", help="in this Python environment (sys.prefix)")
    where.add_argument("--prefix", help="under PREFIX/share/jupyter/kernels")
    parser.add_argument("--name", default=DEFAULT_NAME, help="kernel name (default %(default)s)")
    parser.add_argument("--image", help="image the kernel boots (default: python-default)")
    parser.add_argument("--memory", type=int, metavar="MiB", help="guest memory in MiB")
    parser.add_argument("--cpus", type=int, help="guest vCPUs")
    args = parser.parse_args(argv)
    from sm_kernel.install import install
    prefix = sys.prefix if args.sys_prefix else args.prefix
    path = install(args.name, user=args.user, prefix=prefix, image=args.image, memory_mib=args.memory,
                   cpus=args.cpus)
    print(f"installed kernelspec {args.name} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
