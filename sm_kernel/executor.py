"""The built-in executor: runs in the guest (stdlib only, python3 >= 3.8) when the image
has python3 but no ipykernel. It keeps one namespace and runs cells sent by the host.

    python3 -I executor.py PORT

listens on 127.0.0.1:PORT (the host reaches it through the agent's forward operation)
and serves one connection at a time; after a restore the host connects again and the
namespace is still there. Both ways, one JSON object per line.

host:     {"op": "execute", "code": str}  {"op": "complete", "code": str, "cursor_pos": n}
          {"op": "is_complete", "code": str}
executor: {"type": "stream", "name": "stdout"|"stderr", "text": str}
          {"type": "display" | "result", "data": {mime: value}}
          {"type": "error", "ename": str, "evalue": str, "traceback": [str]}
          {"type": "done", "status": "ok"|"error", "execution_count": n}       (ends an execute)
          {"type": "complete", "matches": [str], "cursor_start": n, "cursor_end": n}
          {"type": "is_complete", "status": "complete"|"incomplete"|"invalid"}
SIGINT raises KeyboardInterrupt in the running cell, as in any Python.
"""

import ast
import base64
import builtins
import codeop
import io
import json
import re
import rlcompleter
import socket
import sys
import threading
import time
import traceback

# Stream text is sent when this much is buffered, or this long after the first write.
STREAM_BUFFER = 64 * 1024
STREAM_DELAY = 0.05
REPR_METHODS = [("_repr_html_", "text/html"), ("_repr_markdown_", "text/markdown"),
                ("_repr_svg_", "image/svg+xml"), ("_repr_png_", "image/png"), ("_repr_jpeg_", "image/jpeg"),
                ("_repr_latex_", "text/latex"), ("_repr_json_", "application/json")]


class Channel:
    def __init__(self):
        self.sock = None
        self.lock = threading.Lock()

    def send(self, **message):
        line = (json.dumps(message) + "\n").encode("utf-8", "surrogateescape")
        with self.lock:
            if self.sock is not None:
                try:
                    self.sock.sendall(line)
                except OSError:
                    self.sock = None  # the host is gone (or a restore cut it); output is dropped


channel = Channel()


class Stream(io.TextIOBase):
    """sys.stdout / sys.stderr of the cells: buffered text sent as stream messages."""

    def __init__(self, name):
        self.name = name
        self._parts = []
        self._size = 0
        self._first = None
        self._lock = threading.Lock()

    def writable(self):
        return True

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            self._parts.append(text)
            self._size += len(text)
            self._first = self._first or time.monotonic()
            due = self._size >= STREAM_BUFFER or time.monotonic() - self._first >= STREAM_DELAY
        if due:
            self.flush()
        return len(text)

    def flush(self):
        with self._lock:
            text, self._parts, self._size, self._first = "".join(self._parts), [], 0, None
        if text:
            channel.send(type="stream", name=self.name, text=text)


class NoInput(io.TextIOBase):
    def readable(self):
        return True

    def readline(self, size=-1):
        raise RuntimeError("input() is not available: this image has no ipykernel, so cells run in sm's "
                           "built-in executor")

    read = readline


def mimebundle(obj):
    data = {"text/plain": repr(obj)}
    for method, mime in REPR_METHODS:
        try:
            value = getattr(obj, method)()
        except Exception:  # noqa: BLE001 - a broken _repr_ falls back to the others
            continue
        if value is None:
            continue
        if isinstance(value, tuple):
            value = value[0]
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        data[mime] = value
    return data


def display(*objects):
    flush_streams()
    for obj in objects:
        channel.send(type="display", data=mimebundle(obj))


def flush_streams():
    sys.stdout.flush()
    sys.stderr.flush()


class Executor:
    def __init__(self):
        self.namespace = {"__name__": "__main__", "__builtins__": builtins, "display": display}
        self.count = 0

    def execute(self, code):
        self.count += 1
        filename = f"<cell {self.count}>"
        status = "ok"
        try:
            tree = ast.parse(code, filename, "exec")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, filename, "exec"), self.namespace)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), filename, "eval"), self.namespace)
                if value is not None:
                    self.namespace["_"] = value
                    flush_streams()
                    channel.send(type="result", data=mimebundle(value))
        except BaseException as error:  # noqa: BLE001 - the user's error, shown to the user
            if isinstance(error, SystemExit) and error.code in (None, 0):
                pass
            else:
                status = "error"
                flush_streams()
                frames = traceback.format_exception(type(error), error, error.__traceback__)
                # Drop this file's frames: the user's code starts at "<cell n>".
                shown = [frames[0]] + [f for f in frames[1:] if __file__ not in f]
                channel.send(type="error", ename=type(error).__name__, evalue=str(error),
                             traceback=["".join(shown).rstrip()])
        flush_streams()
        channel.send(type="done", status=status, execution_count=self.count)

    def complete(self, code, cursor_pos):
        match = re.search(r"[\w.]*$", code[:cursor_pos])
        token = match.group(0)
        completer = rlcompleter.Completer(self.namespace)
        matches = []
        while len(matches) < 200:
            found = completer.complete(token, len(matches))
            if found is None:
                break
            matches.append(found.rstrip("("))
        channel.send(type="complete", matches=matches, cursor_start=match.start(), cursor_end=cursor_pos)

    @staticmethod
    def is_complete(code):
        try:
            status = "complete" if codeop.compile_command(code, "<cell>", "exec") is not None or \
                code.endswith("\n\n") else "incomplete"
        except (SyntaxError, ValueError, OverflowError):
            status = "invalid"
        channel.send(type="is_complete", status=status)


def serve(executor, conn):
    reader = conn.makefile("rb")
    with channel.lock:
        channel.sock = conn
    while True:
        try:
            line = reader.readline()
            if not line:
                return
            request = json.loads(line)
            op = request.get("op")
            if op == "execute":
                executor.execute(str(request.get("code", "")))
            elif op == "complete":
                executor.complete(str(request.get("code", "")), int(request.get("cursor_pos", 0)))
            elif op == "is_complete":
                executor.is_complete(str(request.get("code", "")))
            elif op == "reseed":    # restored from the warm kernel snapshot: numbers of its own
                import random
                random.seed()
        except KeyboardInterrupt:
            continue  # an interrupt between cells
        except (OSError, ValueError):
            return


def main(argv):
    port = int(argv[0])
    sys.stdout, sys.stderr, sys.stdin = Stream("stdout"), Stream("stderr"), NoInput()
    listener = socket.create_server(("127.0.0.1", port))
    executor = Executor()
    while True:
        try:
            conn, _ = listener.accept()
        except KeyboardInterrupt:
            continue
        serve(executor, conn)
        with channel.lock:
            channel.sock = None
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1:])
