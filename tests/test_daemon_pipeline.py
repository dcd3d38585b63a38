"""A manual 2-stage split on one real daemon, through its real API and the openai client."""

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam

from exo.worker.cores import cpu_cores, cpu_share
from tests.conftest import BUILTIN
from tests.daemon import Daemon

pytestmark = pytest.mark.slow


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, compiled_models: Path) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("pipeline"), compiled_models, compiled=True).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{daemon.url}/v1", api_key="unused", timeout=300.0, max_retries=0
    )


def split(daemon: Daemon, *stages: tuple[str, int, int]) -> httpx.Response:
    node_id = daemon.get("/state")["node_id"]
    body = {
        "model": BUILTIN,
        "stages": [
            {"node_id": node_id, "engine": engine, "start_layer": start, "end_layer": end}
            for engine, start, end in stages
        ],
    }
    return httpx.post(f"{daemon.url}/instances", json=body, timeout=30.0)


def wait_serving(daemon: Daemon, instance_id: str, timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = daemon.get(f"/instances/{instance_id}")
        if view["status"] == "serving":
            return daemon.get("/state")["state"]
        assert view["status"] != "failed", view
        time.sleep(0.25)
    raise TimeoutError(f"{instance_id} did not serve:\n{daemon.output()}")


def test_bad_splits_are_rejected_with_a_typed_reason(node: Daemon) -> None:
    gap = split(node, ("mlx", 0, 10), ("mlx", 12, 30))
    assert gap.status_code == 400
    error = gap.json()["error"]
    assert error["code"] == "invalid_split"
    assert "not_contiguous" in error["message"]
    engine = split(node, ("mlx", 0, 10), ("onnx", 10, 30))
    assert engine.status_code == 400 and "unknown_engine" in engine.json()["error"]["message"]


def test_a_two_stage_split_streams_and_serves_concurrent_requests(node: Daemon) -> None:
    placed = split(node, ("mlx", 0, 15), ("mlx", 15, 30))
    assert placed.status_code == 201, placed.text
    instance_id = placed.json()["instance_id"]
    state = wait_serving(node, instance_id)
    shards = state["instances"][instance_id]["shards"]
    assert [(s["start_layer"], s["end_layer"]) for s in shards] == [(0, 15), (15, 30)]
    for shard in shards:  # each stage reported where it listens, on loopback here
        endpoint = state["runner_endpoints"][shard["runner_id"]]
        assert endpoint["host"] == "127.0.0.1" and endpoint["port"] > 0
    # Two CPU stages on one node: each runs on cores of its own where there are enough.
    shares = [cpu_share(cpu_cores(), slot, 2) for slot in range(2)]
    affinities = [set(psutil.Process(pid).cpu_affinity()) for pid in node.runner_pids()]
    if all(shares):
        assert sorted(affinities, key=min) == shares
    else:
        assert all(a == set(cpu_cores()) for a in affinities)

    c = client(node)
    parts: list[str] = []
    for chunk in c.chat.completions.create(
        model=BUILTIN,
        messages=user("Name three colours."),
        max_tokens=16,
        temperature=0.0,
        stream=True,
    ):
        parts.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(parts).strip()

    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            reply = c.chat.completions.create(
                model=BUILTIN, messages=user(f"Count to {i + 2}."), max_tokens=8, temperature=0.0
            )
            results[i] = reply.choices[0].message.content or ""
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert sorted(results) == [0, 1, 2, 3] and all(results.values())
    counters = node.get("/state")["state"]["counters"]
    assert counters["finished"] >= 5


def test_a_killed_stage_fails_the_stream_promptly_and_the_model_is_re_placed(
    node: Daemon,
) -> None:
    state = node.get("/state")["state"]
    serving = [
        i for i in state["instances"].values() if len(i["shards"]) == 2 and not i["failed_reason"]
    ]
    if not serving:
        placed = split(node, ("mlx", 0, 15), ("mlx", 15, 30))
        wait_serving(node, placed.json()["instance_id"])
    pids = node.runner_pids()
    assert len(pids) == 2
    c = client(node)
    stream = c.chat.completions.create(
        model=BUILTIN,
        messages=user("Write a long story about a lighthouse."),
        max_tokens=400,
        temperature=0.0,
        stream=True,
    )
    killed_at = 0.0
    with pytest.raises(openai.APIError) as failure:  # noqa: PT012
        for i, _chunk in enumerate(stream):
            if i == 2:
                psutil.Process(pids[-1]).kill()
                killed_at = time.monotonic()
    assert killed_at and time.monotonic() - killed_at < 10.0
    message = str(failure.value).lower()
    assert "runner" in message or "pipeline" in message
    state = node.get("/state")["state"]
    assert any(i["failed_reason"] for i in state["instances"].values())
    # The next request re-places the model (the automatic placement) and succeeds.
    reply = c.chat.completions.create(model=BUILTIN, messages=user("Hi"), max_tokens=4)
    assert reply.choices[0].message.content
    assert not set(node.runner_pids()) & set(pids)
