"""Resumable test runs: a suite that the test bed's death cut short picks up where it stopped.

The emulated test bed sometimes wedges or panics mid-suite (docs/testbed.md). Its runner then
boots it again and runs the same command; with ``$SM_TESTBED_PROGRESS`` naming a file that
survives the reboot, this plugin records every test as it starts and finishes, and a rerun
leaves out the tests that already finished: their failures still fail the run, and are shown
again in its summary. A test that was running when the test bed died gets one more try; if
the test bed dies under it twice, it fails without a third.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

PROGRESS_VARIABLE = "SM_TESTBED_PROGRESS"
TRIES = 2


class Progress:
    """What earlier attempts recorded, and the record this attempt appends to."""

    def __init__(self, path: Path):
        self.path = path
        self.finished: dict[str, dict] = {}     # node id → {"outcome", "report"}
        interrupted: Counter[str] = Counter()
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue    # the line the test bed died writing
                if "started" in entry:
                    interrupted[entry["started"]] += 1
                elif "finished" in entry:
                    self.finished[entry["finished"]] = entry
                    interrupted.pop(entry["finished"], None)
        for node_id, count in interrupted.items():
            if count >= TRIES:
                self.finished[node_id] = {
                    "outcome": "failed",
                    "report": f"the test bed died {count} times while this test ran"}
        self.earlier_failures = {node_id: entry["report"]
                                 for node_id, entry in self.finished.items()
                                 if entry["outcome"] == "failed"}
        self._failures: dict[str, str] = {}    # this attempt's: node id → report text

    def _append(self, entry: dict) -> None:
        with self.path.open("a") as record:
            record.write(json.dumps(entry) + "\n")

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not self.finished:
            return
        done = [item for item in items if item.nodeid in self.finished]
        items[:] = [item for item in items if item.nodeid not in self.finished]
        config.hook.pytest_deselected(items=done)
        print(f"\nprogress: resuming a run the test bed's death cut short: {len(done)} tests "
              f"finished earlier ({len(self.earlier_failures)} failed) are left out", flush=True)

    def pytest_runtest_logstart(self, nodeid, location):
        self._append({"started": nodeid})

    def pytest_runtest_logreport(self, report):
        if report.failed:
            text = self._failures.get(report.nodeid, "")
            self._failures[report.nodeid] = text + report.longreprtext
        if report.when == "teardown":
            failed = report.nodeid in self._failures
            self._append({"finished": report.nodeid, "outcome": "failed" if failed else "passed",
                          "report": self._failures.get(report.nodeid, "")})

    def pytest_terminal_summary(self, terminalreporter):
        if not self.earlier_failures:
            return
        terminalreporter.section("failed in an earlier attempt (before the test bed died)")
        for node_id, text in self.earlier_failures.items():
            terminalreporter.write_line(f"FAILED {node_id}")
            if text:
                terminalreporter.write_line(text)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        if self.earlier_failures and session.exitstatus in (pytest.ExitCode.OK,
                                                            pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
    path = os.environ.get(PROGRESS_VARIABLE)
    if path:
        config.pluginmanager.register(Progress(Path(path)), "sm-progress")
