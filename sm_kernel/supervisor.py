"""Runs inside the guest (stdlib only, python3 >= 3.8): starts or adopts the guest's
kernel process, passes signals to it, and says when it is ready and when it ends.

    python3 supervisor.py launch LOG PORT -- ARGV...   start ARGV in its own session
    python3 supervisor.py attach PID PORT              adopt a running kernel (after a restore)

The kernel runs in a session of its own, so when this supervisor's exec connection is
cut (a snapshot restore resets every vsock connection) the agent kills the supervisor
only, never the kernel. Lines on stdout, JSON: {"pid": n}, then {"ready": true} once
127.0.0.1:PORT accepts connections, then {"exited": true, "code": n, "signal": n|null}
when the kernel is gone. Lines on stdin name a signal to send it: INT, TERM or KILL.
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL}
POLL_SECONDS = 0.05


def say(**message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def wait_ready(port, alive):
    while alive():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            say(ready=True)
            return
        except OSError:
            time.sleep(POLL_SECONDS)


def watch_child(popen):
    status = popen.wait()
    say(exited=True, code=status if status >= 0 else 128 - status, signal=-status if status < 0 else None)
    os._exit(0)


def watch_adopted(pid):
    """Not our child: wait for the pid to go away (pidfd where the kernel has it)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    while True:
        if fd is not None:
            select.select([fd], [], [])
            break
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(POLL_SECONDS)
    say(exited=True, code=None, signal=None)
    os._exit(0)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def main(argv):
    mode = argv[0]
    if mode == "launch":
        log, port, command = argv[1], int(argv[2]), argv[4:]
        with open(log, "ab") as output:
            popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                     start_new_session=True, close_fds=True)
        pid = popen.pid
        watcher = threading.Thread(target=watch_child, args=(popen,), daemon=True)
    else:
        pid, port = int(argv[1]), int(argv[2])
        watcher = threading.Thread(target=watch_adopted, args=(pid,), daemon=True)
    say(pid=pid)
    watcher.start()
    threading.Thread(target=wait_ready, args=(port, lambda: alive(pid)), daemon=True).start()
    for line in sys.stdin:
        signum = SIGNALS.get(line.strip())
        if signum is not None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    # stdin closed: the host is gone or done with us; the kernel stays.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
