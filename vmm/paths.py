"""Where sm keeps its caches on the user's machine, and where its shipped data lives."""

import os
from pathlib import Path


def sm_home() -> Path:
    """``$SM_HOME``, or ``~/.cache/sm``."""
    return Path(os.environ.get("SM_HOME") or Path.home() / ".cache" / "sm")


def share_dir() -> Path:
    """The project's ``share/`` folder (guest init, recipes), next to the ``vmm`` package."""
    return Path(__file__).resolve().parent.parent / "share"


def snapshots_dir() -> Path:
    """``$SM_SNAPSHOTS``, or ``$SM_HOME/snapshots``: snapshots are mapped into guests,
    so a local disk beats a network share for them."""
    return Path(os.environ.get("SM_SNAPSHOTS") or sm_home() / "snapshots")
