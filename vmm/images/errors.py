"""The base of every image error a user can hit: its text is one line saying what happened
and what to do, printed by the ``sm`` CLI as ``sm: <line>``."""


class ImageError(Exception):
    """One line for the user: what happened and what to do."""
