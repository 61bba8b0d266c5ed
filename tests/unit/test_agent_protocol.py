"""The agent's wire format: frame codec, fuzzing, hostile agents, Python 3.8 syntax."""

import ast
import json
import socket
import struct
import threading
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.agent_harness import AGENT_FILE, FakeAgent, answer_hello
from vmm.agent_client import (
    AgentClient,
    AgentProtocolError,
    AgentUnavailable,
    CommandNotFound,
)
from vmm.guest import agent as wire


def chunked_reader(data: bytes, sizes):
    """A FrameReader over ``data`` delivered in pieces of the given sizes."""
    position = 0
    pieces = iter(sizes)

    def recv(limit):
        nonlocal position
        size = min(limit, next(pieces, limit), len(data) - position)
        chunk = data[position:position + max(size, 1)]
        position += len(chunk)
        return chunk

    return wire.FrameReader(recv)


frames_strategy = st.lists(st.tuples(st.sampled_from(sorted(wire.FRAME_NAMES)), st.binary(max_size=3000)), max_size=20)


@given(frames=frames_strategy, sizes=st.lists(st.integers(1, 5000), max_size=50))
def test_frames_round_trip_whatever_the_chunking(frames, sizes):
    data = b"".join(wire.encode_frame(t, body) for t, body in frames)
    reader = chunked_reader(data, sizes)
    assert [reader.read() for _ in frames] == frames
    assert reader.read() is None


@settings(max_examples=500)
@given(data=st.binary(max_size=4000), sizes=st.lists(st.integers(1, 700), max_size=20))
def test_frame_parser_fuzz(data, sizes):
    """Any bytes: frames within the limit, a clean end, or ProtocolError; nothing else."""
    reader = chunked_reader(data, sizes)
    try:
        while (frame := reader.read()) is not None:
            frame_type, body = frame
            assert frame_type in wire.FRAME_NAMES and len(body) <= wire.MAX_FRAME
    except wire.ProtocolError:
        pass


@given(st.binary(max_size=200))
def test_json_bodies_fuzz(body):
    try:
        assert isinstance(wire.decode_json(wire.REPLY, body), dict)
    except wire.ProtocolError:
        pass


def test_deeply_nested_json_is_a_protocol_error():
    with pytest.raises(wire.ProtocolError):
        wire.decode_json(wire.REPLY, b"[" * 100_000 + b"]" * 100_000)


def test_oversized_frame_is_refused_from_its_header():
    reader = chunked_reader(struct.pack(">IB", wire.MAX_FRAME + 1, wire.DATA), [])
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        reader.read()


def test_frame_cut_short_is_a_protocol_error():
    data = wire.encode_frame(wire.DATA, b"x" * 100)[:50]
    with pytest.raises(wire.ProtocolError, match="closed inside a DATA frame"):
        chunked_reader(data, []).read()


def test_send_frame_refuses_oversized_bodies():
    left, right = socket.socketpair()
    with left, right, pytest.raises(ValueError):
        wire.send_frame(left, wire.DATA, bytes(wire.MAX_FRAME + 1))


def test_agent_source_is_python_3_8_syntax():
    ast.parse(AGENT_FILE.read_text(), feature_version=(3, 8))


# ---------------------------------------------------------------- hostile agents

def client_for(script, io_timeout=5):
    fake = FakeAgent(script)
    return fake, AgentClient(fake.client_sock, io_timeout=io_timeout)


def test_huge_length_from_agent_is_refused_without_allocating_it():
    def script(sock, frames):
        frames.read()
        sock.sendall(struct.pack(">IB", 0xFFFFFFFF, wire.HELLO) + b"x" * 65536)
        frames.read()

    fake, client = client_for(script)
    tracemalloc.start()
    try:
        with pytest.raises(AgentProtocolError, match="exceeds the 1048576-byte limit"):
            client.hello()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024
    fake.close()


@pytest.mark.parametrize("garbage", [b"\x00\x00\x00\x02\xffzz", b"HTTP/1.1 200 OK\r\n\r\n", b"\x00\x00\x00\x03\x01abc"])
def test_garbage_from_agent_is_a_protocol_error(garbage):
    def script(sock, frames):
        frames.read()
        sock.sendall(garbage)
        frames.read()

    fake, client = client_for(script)
    with pytest.raises(AgentProtocolError, match="broke the protocol|unknown frame type"):
        client.hello()
    fake.close()


def test_version_mismatch():
    def script(sock, frames):
        frames.read()
        wire.send_frame(sock, wire.HELLO, json.dumps({"protocol": 99}).encode())

    fake, client = client_for(script)
    with pytest.raises(AgentProtocolError, match="agent speaks protocol 99"):
        client.hello()
    fake.close()


def test_silent_agent_times_out():
    def script(sock, frames):
        frames.read()
        threading.Event().wait(3)

    fake, client = client_for(script, io_timeout=0.3)
    with pytest.raises(AgentUnavailable, match="sent nothing for 0.3 s"):
        client.hello()
    fake.close()


def exec_script(*frames_after_reply):
    def script(sock, frames):
        answer_hello(sock, frames)
        frames.read()
        wire.send_frame(sock, wire.REPLY, wire.encode_json({"pid": 7, "stdin_window": 10}))
        for frame_type, body in frames_after_reply:
            wire.send_frame(sock, frame_type, body)
        while frames.read():
            pass
    return script


@pytest.mark.parametrize("frames, message", [
    ([(wire.EXIT, b'{"signal": null}')], "EXIT frame without a valid 'exit_code'"),
    ([(wire.EXIT, b'{"exit_code": true, "signal": null}')], "EXIT frame without a valid 'exit_code'"),
    ([(wire.WINDOW, b'{"bytes": 11}')], "stdin credit it was never given"),
    ([(wire.DATA, b"x")], "sent DATA during exec"),
    ([(wire.EXIT, b"[1]")], "not a JSON object"),
])
def test_malformed_exec_frames(frames, message):
    fake, client = client_for(exec_script(*frames))
    with pytest.raises(AgentProtocolError, match=message):
        client.exec(["x"])
    fake.close()


def test_agent_error_text_is_made_one_line():
    def script(sock, frames):
        answer_hello(sock, frames)
        frames.read()
        message = {"error": "command_not_found", "message": "evil\n\x1b[31mred" + "x" * 1000}
        wire.send_frame(sock, wire.ERROR, wire.encode_json(message))
        frames.read()

    fake, client = client_for(script)
    with pytest.raises(CommandNotFound) as caught:
        client.exec(["x"])
    text = str(caught.value)
    assert "\n" not in text and "\x1b" not in text and len(text) < 400
    fake.close()


def test_agent_closing_mid_frame():
    def script(sock, frames):
        frames.read()
        sock.sendall(struct.pack(">IB", 100, wire.HELLO) + b"{")
        sock.close()

    fake, client = client_for(script)
    with pytest.raises(AgentProtocolError, match="closed inside a HELLO frame"):
        client.hello()
    fake.close()


def test_no_agent_listening(tmp_path):
    def connect():
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(tmp_path / "nothing"))
        return sock

    with pytest.raises(AgentUnavailable, match="cannot connect to the guest agent"):
        AgentClient(connect).exec(["true"])
