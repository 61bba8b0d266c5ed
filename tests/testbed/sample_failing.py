"""Run by test_runner.py inside the test bed: one test passes, one fails on purpose.

Not collected by a plain ``pytest`` run (the name has no ``test_`` prefix).
"""

from vmm import hostkvm


def test_kvm_inside_runs_guests():
    kvm = hostkvm.probe()
    assert kvm.usable, kvm.reason


def test_fails_on_purpose():
    assert "failing" == "on purpose"
