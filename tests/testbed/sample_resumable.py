"""Run by test_runner.py inside the test bed: the middle test crashes the whole test bed (a
kernel panic) the first time it runs; the runner boots it again and the suite resumes.

Not collected by a plain ``pytest`` run (the name has no ``test_`` prefix).
"""

import os
from pathlib import Path


def test_before():
    pass


def test_crashes_the_test_bed_once():
    marker = Path("/testbed/crashed-once")     # the run directory: it outlives the crash
    if not marker.exists():
        marker.touch()
        os.sync()
        Path("/proc/sysrq-trigger").write_text("c")


def test_after():
    pass
