"""What every ``sm`` subcommand shares: one-line failures, exit statuses, argument types,
and telling the user how a guest stopped."""

from __future__ import annotations

import argparse
import sys

from vmm.vcpu import StopKind, StopReason

# As docker run and timeout(1) do; otherwise the guest command's own status.
EXIT_TIMEOUT = 124
EXIT_SM_FAILED = 125


class CommandFailed(Exception):
    """One line for the user (what happened, what to do) and the exit status."""

    def __init__(self, message: str, status: int = EXIT_SM_FAILED):
        super().__init__(message)
        self.status = status


def say(message: str) -> None:
    print(f"sm: {message}", file=sys.stderr, flush=True)


def at_least(minimum: int):
    """An argparse type: an int no smaller than ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


def check_stop(reason: StopReason | None, elapsed: float, timeout: float | None,
               what: str = "the guest did not power off") -> StopReason:
    """``reason`` if the guest powered off or rebooted; otherwise the one line saying why not."""
    if reason is None:
        raise CommandFailed(f"{what} within {timeout:g} s; stopped it", EXIT_TIMEOUT)
    if reason.kind is StopKind.CRASH:
        raise CommandFailed(f"the guest kernel panicked after {elapsed:.2f} s: {reason.detail}")
    if reason.kind not in (StopKind.POWEROFF, StopKind.REBOOT):
        raise CommandFailed(f"the guest stopped: {reason.kind.value} on vCPU {reason.vcpu} "
                            f"({reason.detail}) after {elapsed:.2f} s")
    return reason
