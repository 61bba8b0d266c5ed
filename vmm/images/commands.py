"""``sm pull``, ``sm import``, ``sm images`` and ``sm rmi``.

``vmm/cli.py`` calls :func:`add_subcommands` on its subparsers; each command sets
``handler(args) -> exit status`` and raises an :class:`ImageError` (one line) when it fails.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from vmm.images.errors import ImageError
from vmm.images.reference import parse_reference
from vmm.images.store import ImageRecord, Store

__all__ = ["ImageError", "add_subcommands"]


def human_size(size: int) -> str:
    """Docker's style: decimal units, three significant digits."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.3g}{unit}"
        value /= 1000
    return f"{value:.3g}TB"


def human_age(created: str, now: datetime | None = None) -> str:
    """``"3 days ago"`` for an RFC 3339 time; the text itself when it is not one."""
    try:
        when = datetime.fromisoformat(created)
    except ValueError:
        return created or "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    for unit, length in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
                         ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


def short_digest(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def display_name(record: ImageRecord) -> str:
    return parse_reference(record.name).familiar


def _describe(record: ImageRecord) -> str:
    return (f"{display_name(record)}  {short_digest(record.manifest_digest)}  "
            f"{human_size(record.size)}")


# The registry client and importer load on use: `requests` alone costs every other
# `sm` command a noticeable start-up.

def pull_command(args: argparse.Namespace) -> int:
    from vmm.images.registry import pull

    record = pull(args.ref)
    print(f"pulled {_describe(record)}")
    return 0


def import_command(args: argparse.Namespace) -> int:
    from vmm.images.importer import import_image

    for record in import_image(Path(args.file), name=args.name):
        print(f"imported {_describe(record)}")
    return 0


def images_command(args: argparse.Namespace) -> int:
    rows = [("NAME", "DIGEST", "SIZE", "CREATED")]
    rows += [(display_name(r), short_digest(r.manifest_digest), human_size(r.size),
              human_age(r.created)) for r in Store().images()]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        print("   ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "   " + row[3])
    return 0


def rmi_command(args: argparse.Namespace) -> int:
    from vmm.images.rootfs import prune_rootfs

    store = Store()
    for ref in args.refs:
        store.remove(ref)
        print(f"removed {ref}")
    prune_rootfs(store)
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pull``, ``import``, ``images`` and ``rmi`` to the ``sm`` command's subparsers."""
    pull_cmd = subparsers.add_parser(
        "pull", help="pull an image from a registry",
        description="Pull REF from its registry into the store (as docker does: python:3.12-slim "
                    "is docker.io/library/python:3.12-slim). Credentials come from "
                    "~/.docker/config.json; loopback registries and those in "
                    "$SM_INSECURE_REGISTRIES are spoken to over plain HTTP.")
    pull_cmd.add_argument("ref", metavar="REF")
    pull_cmd.set_defaults(handler=pull_command)
    import_cmd = subparsers.add_parser(
        "import", help="import a `docker save` archive or an OCI image layout",
        description="Import FILE: a `docker save` tar, or an OCI image layout (directory or tar).")
    import_cmd.add_argument("file", metavar="FILE")
    import_cmd.add_argument("--name", metavar="NAME", help="name the image (default: the names "
                                                           "the archive carries)")
    import_cmd.set_defaults(handler=import_command)
    subparsers.add_parser("images", help="list the images in the store").set_defaults(
        handler=images_command)
    rmi_cmd = subparsers.add_parser(
        "rmi", help="remove images", description="Untag each REF (a name, or a digest for "
                                                 "all its names), then delete unused blobs.")
    rmi_cmd.add_argument("refs", nargs="+", metavar="REF")
    rmi_cmd.set_defaults(handler=rmi_command)
