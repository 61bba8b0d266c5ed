"""What can go wrong with a snapshot, as exceptions whose message says what to do."""


class SnapshotError(Exception):
    """A snapshot could not be taken or restored; nothing was changed."""


class CorruptSnapshot(SnapshotError):
    """A state or memory file is truncated, damaged or not a snapshot at all."""


class IncompatibleSnapshot(SnapshotError):
    """A sound snapshot this VMM, CPU or host cannot restore."""
