"""tests/progress.py: a pytest run cut short (the test bed died) resumes where it stopped."""

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]

# ``dies`` kills its pytest the way a dead test bed does (no teardown, no summary) as many
# times as DEATHS says, counting in a file beside it.
SUITE = '''
import os
from pathlib import Path

DEATHS = int(os.environ["DEATHS"])

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "failed on purpose"

def test_dies():
    counter = Path(__file__).with_name("deaths")
    died = int(counter.read_text()) if counter.exists() else 0
    if died < DEATHS:
        counter.write_text(str(died + 1))
        os._exit(99)

def test_after():
    pass
'''


def run(directory: Path, deaths: int, *args: str, progress: bool = True
        ) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items()
                   if key != "SM_TESTBED_PROGRESS"}
    environment.update(DEATHS=str(deaths), PYTHONPATH=str(PROJECT))
    if progress:
        environment["SM_TESTBED_PROGRESS"] = str(directory / "progress")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.progress", "-p", "no:cacheprovider",
         "--rootdir", str(directory), str(directory / "test_suite.py"), *args],
        cwd=directory, env=environment, capture_output=True, text=True, timeout=120)


def suite(tmp_path: Path) -> Path:
    (tmp_path / "test_suite.py").write_text(SUITE)
    return tmp_path


def test_a_rerun_leaves_out_what_finished_and_still_fails_on_its_failures(tmp_path):
    directory = suite(tmp_path)
    first = run(directory, deaths=1)
    assert first.returncode == 99, first.stdout
    second = run(directory, deaths=1)
    assert "2 tests finished earlier (1 failed) are left out" in second.stdout, second.stdout
    assert "2 passed, 2 deselected" in second.stdout
    assert "FAILED test_suite.py::test_fails" in second.stdout
    assert "failed on purpose" in second.stdout    # the earlier attempt's report, shown again
    assert second.returncode == 1


def test_a_test_the_test_bed_died_under_twice_fails_without_a_third_try(tmp_path):
    directory = suite(tmp_path)
    assert run(directory, deaths=2).returncode == 99
    assert run(directory, deaths=2).returncode == 99
    third = run(directory, deaths=2)
    assert "1 passed, 3 deselected" in third.stdout, third.stdout
    assert "FAILED test_suite.py::test_dies" in third.stdout
    assert "the test bed died 2 times while this test ran" in third.stdout
    assert (directory / "deaths").read_text() == "2"
    assert third.returncode == 1


def test_without_the_variable_nothing_is_recorded(tmp_path):
    directory = suite(tmp_path)
    result = run(directory, 0, "-k", "not dies", progress=False)
    assert "1 failed, 2 passed" in result.stdout, result.stdout
    assert not (directory / "progress").exists()
