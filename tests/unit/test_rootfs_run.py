"""What `sm run` hands to init (RunSpec, from the image config) and how it relays the console."""

from __future__ import annotations

import io
import subprocess

import pytest

from vmm.guest.cmdline import RUN_SPEC_FILE, RunSpec, RunSpecError
from vmm.guest.initramfs import with_files
from vmm.images.run import DEFAULT_PATH, CommandOutput, image_run_spec

IMAGE = {"config": {"Entrypoint": ["/entry", "-x"], "Cmd": ["default", "arg"],
                    "Env": ["PATH=/opt/bin:/bin", "LANG=C.UTF-8"], "WorkingDir": "/work",
                    "User": "app:staff"}}


def test_entrypoint_and_cmd_as_docker_combines_them():
    spec = image_run_spec(IMAGE)
    assert spec.argv == ["/entry", "-x", "default", "arg"]
    assert spec.env == ["PATH=/opt/bin:/bin", "LANG=C.UTF-8"]
    assert (spec.workdir, spec.user, spec.interactive) == ("/work", "app:staff", False)


def test_a_given_command_replaces_cmd_but_keeps_the_entrypoint():
    assert image_run_spec(IMAGE, ["ls", "/"]).argv == ["/entry", "-x", "ls", "/"]


def test_entrypoint_override_drops_the_image_cmd_and_empty_removes_it():
    assert image_run_spec(IMAGE, entrypoint="/bin/sh").argv == ["/bin/sh"]
    assert image_run_spec(IMAGE, ["true"], entrypoint="").argv == ["true"]


def test_env_overrides_and_defaults():
    spec = image_run_spec(IMAGE, env=["LANG=de_DE.UTF-8", "NEW=1"], workdir="/tmp", user="0")
    assert spec.env == ["PATH=/opt/bin:/bin", "LANG=de_DE.UTF-8", "NEW=1"]
    assert (spec.workdir, spec.user) == ("/tmp", "0")
    bare = image_run_spec({"config": {"Cmd": ["sh"]}})
    assert bare.env == [DEFAULT_PATH] and bare.workdir == "/" and bare.user == ""
    assert image_run_spec({}, ["true"]).argv == ["true"]


@pytest.mark.parametrize("config, message", [
    ({"config": {}}, "names no command"),
    ({"config": {"Cmd": "ls -l"}}, "Cmd is not a list"),
    ({"config": {"Cmd": ["ls"], "Env": ["NOEQUALS"]}}, "not NAME=VALUE"),
    ({"config": {"Cmd": ["ls"], "WorkingDir": "relative"}}, "not an absolute path"),
    ({"config": {"Cmd": ["ls"], "User": "bad user"}}, "is not NAME"),
    ({"config": {"Cmd": ["ls\0"]}}, "NUL"),
    ({"config": {"Cmd": ["ls"], "User": 5}}, "User is not a string"),
    ({"config": []}, "not an object"),
])
def test_bad_image_configs_are_named_errors(config, message):
    with pytest.raises(RunSpecError, match=message):
        image_run_spec(config)


def test_the_spec_survives_busybox_sh_quoting(tmp_path):
    nasty = ["it's", 'say "hi"', "$(touch /tmp/pwned)", "`id`", "line\nbreak", "back\\slash", ""]
    spec = RunSpec(argv=["prog", *nasty], env=["PATH=/bin", "X=a b'c"], workdir="/w d",
                   user="1000:1000", interactive=True)
    path = tmp_path / "run"
    path.write_bytes(spec.to_shell())
    script = ('. "$1"; i=1; while [ $i -le $sm_argc ]; do eval "printf \'%s\\0\' \\"\\$sm_arg_$i\\""; '
              'i=$((i+1)); done; printf "%s\\0" "$sm_env_2" "$sm_workdir" "$sm_user" '
              '"$sm_interactive" "$sm_env_count"')
    out = subprocess.run(["busybox", "sh", "-c", script, "sh", str(path)], check=True,
                         capture_output=True).stdout
    assert out.split(b"\0")[:-1] == [a.encode() for a in
                                     ["prog", *nasty, "X=a b'c", "/w d", "1000:1000", "1", "2"]]


def test_the_spec_is_appended_as_a_second_aligned_cpio_archive(tmp_path):
    base = tmp_path / "base.cpio"
    base.write_bytes(b"070701" + b"0" * 106)   # stands in for the cached archive (4-aligned)
    spec = RunSpec(argv=["true"], env=["PATH=/bin"])
    data = with_files(base, {RUN_SPEC_FILE: spec.to_shell()})
    assert data.startswith(base.read_bytes())
    appended = data[len(base.read_bytes()):]
    assert appended.startswith(b"070701") and len(data) % 4 == 0
    assert RUN_SPEC_FILE.encode() + b"\0" in appended and spec.to_shell() in appended


def relay(*chunks: bytes) -> tuple[bytes, CommandOutput]:
    out = io.BytesIO()
    output = CommandOutput(out)
    for chunk in chunks:
        output(chunk)
    output.close()
    return out.getvalue(), output


CONSOLE = (b"[    0.5] kernel noise\r\nsm: init started\r\nsm: command started\n"
           b"hello\nworld\n\nsm: exit-status 3\n[    4.9] reboot: Power down\r\n")


def test_only_the_command_output_reaches_stdout():
    out, output = relay(CONSOLE)
    assert out == b"hello\nworld\n"
    assert output.started and output.finished and b"kernel noise" in output.boot_log


def test_the_relay_works_byte_by_byte():
    out, _ = relay(*(CONSOLE[i:i + 1] for i in range(len(CONSOLE))))
    assert out == b"hello\nworld\n"


@pytest.mark.parametrize("body, expected", [
    (b"no newline at the end\nsm: exit-status 0\n", b"no newline at the end"),
    (b"crlf\r\n\r\nsm: exit-status 0\r\n", b"crlf\r\n"),
    (b"\nsm: exit-status 1\n", b""),
    (b"sm: exit-status look-alike\n\nsm: exit-status 0\n", b"sm: exit-status look-alike\n"),
    (b"ends with cr\r", b"ends with cr\r"),   # the guest stopped before init's line
])
def test_exit_line_is_dropped_whatever_the_output_ends_with(body, expected):
    out, _ = relay(b"sm: command started\n" + body)
    assert out == expected


def test_nothing_is_relayed_when_the_command_never_started():
    out, output = relay(b"sm: init started\nsm: init failed: user nobody is not in the image's\n")
    assert out == b"" and not output.started
    assert b"init failed" in output.boot_log
