"""share/guest/init and its command-line contract (vmm/guest/cmdline.py)."""

from __future__ import annotations

import base64
import subprocess

import pytest

from vmm.guest import cmdline
from vmm.guest.initramfs import init_script


@pytest.mark.parametrize("shell", ["sh", "busybox"])
def test_init_script_parses(shell):
    argv = [shell, "sh", "-n"] if shell == "busybox" else [shell, "-n"]
    result = subprocess.run([*argv, str(init_script())], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_init_script_prints_the_markers_the_vmm_parses():
    text = init_script().read_text()
    assert text.startswith("#!/bin/busybox sh\n")
    assert f'echo "{cmdline.INIT_STARTED}"' in text
    assert f'echo "{cmdline.EXIT_STATUS}$?"' in text
    assert f'echo "{cmdline.INIT_FAILED}$*"' in text
    assert f"cmdline_arg {cmdline.INIT_CMD_PARAM})" in text


def test_init_cmd_is_one_base64_word():
    command = "echo 'a b' \"c\"\nexit 3 # ünïcode"
    arg = cmdline.init_cmd_arg(command)
    key, _, value = arg.partition("=")
    assert key == "sm.init_cmd" and " " not in arg and '"' not in arg
    assert base64.b64decode(value, validate=True).decode() == command


def test_init_cmd_too_long_for_the_kernel_is_refused():
    with pytest.raises(ValueError, match="too long"):
        cmdline.init_cmd_arg("x" * 2000)


def test_root_args():
    assert cmdline.root_args() == ["root=/dev/vda"]
    assert cmdline.root_args("/dev/vdb", "erofs", "/sm/agent") == \
        ["root=/dev/vdb", "rootfstype=erofs", "init=/sm/agent"]


def test_exit_status_is_parsed_from_console_lines():
    console = b"[ 1.0] boot\r\nsm: init started\r\nout: sm: exit-status 9\r\nsm: exit-status 3\r\n"
    assert cmdline.parse_exit_status(console) == 3
    assert cmdline.parse_exit_status("sm: exit-status 0\nsm: exit-status 127\n") == 127
    assert cmdline.parse_exit_status("sm: init started\n") is None
    assert cmdline.parse_exit_status("sm: exit-status x\n") is None
