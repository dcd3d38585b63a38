"""Stage links on loopback: frames arrive whole and in order, a lost link is reported, a
connection that never carried a frame is not, and the advertised address is chosen."""

import queue
import socket

import numpy as np
import pytest

from exo.worker.pipeline.frames import FrameFlag, FrameKind, encode_array, encode_token
from exo.worker.pipeline.links import (
    LinkLost,
    Received,
    StageListener,
    StageSender,
    advertised_host,
    bind_host,
    is_loopback,
    listen_socket,
)


def listener() -> tuple[StageListener, "queue.Queue[Received | LinkLost]"]:
    events: queue.Queue[Received | LinkLost] = queue.Queue()
    return StageListener(listen_socket("127.0.0.1"), events.put), events


def test_frames_arrive_in_order_and_a_closed_link_is_reported() -> None:
    stage, events = listener()
    sender = StageSender.connect("127.0.0.1", stage.port, timeout_s=5.0)
    big = np.arange(512 * 576, dtype=np.float32).reshape(1, 512, 576)
    sender.send(encode_array(FrameKind.ACTIVATION, "r", 0, FrameFlag.NONE, big))
    sender.send(encode_token("r", 512, 7, final=True))
    first, second = events.get(timeout=5), events.get(timeout=5)
    assert isinstance(first, Received) and first.frame.shape == (1, 512, 576)
    assert isinstance(second, Received) and second.frame.kind == FrameKind.TOKEN
    sender.close()
    lost = events.get(timeout=5)
    assert isinstance(lost, LinkLost) and "closed" in lost.reason
    stage.close()


def test_a_corrupt_stream_closes_the_link() -> None:
    stage, events = listener()
    with socket.create_connection(("127.0.0.1", stage.port)) as raw:
        raw.sendall(encode_token("r", 0, 1, final=False))
        raw.sendall(b"garbage that is no frame header at all....")
        assert isinstance(events.get(timeout=5), Received)
        lost = events.get(timeout=5)
    assert isinstance(lost, LinkLost) and "corrupt" in lost.reason
    stage.close()


def test_a_probe_that_sends_nothing_is_no_link() -> None:
    stage, events = listener()
    socket.create_connection(("127.0.0.1", stage.port)).close()
    sender = StageSender.connect("127.0.0.1", stage.port, timeout_s=5.0)
    sender.send(encode_token("r", 0, 1, final=False))
    assert isinstance(events.get(timeout=5), Received)  # nothing reported for the probe
    sender.close()
    stage.close()


def test_connect_gives_up_with_a_clear_error() -> None:
    with socket.socket() as held:  # bound, never listening: connections to it are refused
        held.bind(("127.0.0.1", 0))
        port = int(held.getsockname()[1])
        with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
            StageSender.connect("127.0.0.1", port, timeout_s=0.3)


def test_advertised_and_bind_hosts() -> None:
    assert advertised_host("192.168.7.9") == "192.168.7.9"
    chosen = advertised_host("0.0.0.0")
    assert chosen and chosen != "0.0.0.0"
    assert bind_host("127.0.0.1") == "127.0.0.1"
    assert bind_host("192.168.7.9") == "0.0.0.0"
    assert is_loopback("localhost") and is_loopback("::1") and not is_loopback("10.0.0.1")
