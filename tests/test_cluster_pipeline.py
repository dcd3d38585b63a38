"""A pipeline across nodes of a real 3-daemon cluster, through the openai client.

Stage 0 (MLX) on one node, stage 1 (torch) on another, the client on the third: the
activations cross between the stage runners, the tokens cross the mesh to the client's
node. Then a stage's runner dies mid-stream, then a stage's whole node: each time the
client gets an error promptly and the next request succeeds on what is left.
"""

import threading
import time
from typing import Any

import httpx
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import BUILTIN
from tests.daemon import Daemon
from tests.test_cluster import converged, views, wait_until

pytestmark = pytest.mark.slow


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", timeout=300, max_retries=0)


def place_split(via: Daemon, first: str, second: str) -> str:
    body = {
        "model": BUILTIN,
        "stages": [
            {"node_id": first, "engine": "mlx", "start_layer": 0, "end_layer": 15},
            {"node_id": second, "engine": "torch", "start_layer": 15, "end_layer": 30},
        ],
    }
    placed = httpx.post(f"{via.url}/instances", json=body, timeout=30)
    assert placed.status_code == 201, placed.text
    instance_id = str(placed.json()["instance_id"])
    wait_until(
        "the pipeline serving",
        lambda: via.get(f"/instances/{instance_id}")["status"] == "serving",
        240,
    )
    return instance_id


def stream_until_failure(daemon: Daemon, kill: Any) -> float:
    """Stream a long answer; call `kill()` after a few tokens; return the seconds from
    the kill to the client's error."""
    stream = client(daemon).chat.completions.create(
        model=BUILTIN,
        messages=user("Write a long story about a lighthouse."),
        max_tokens=400,
        temperature=0.0,
        stream=True,
    )
    killed_at = 0.0
    with pytest.raises(openai.APIError):  # noqa: PT012
        for i, _chunk in enumerate(stream):
            if i == 3:
                kill()
                killed_at = time.monotonic()
    assert killed_at
    return time.monotonic() - killed_at


def test_a_pipeline_spans_two_nodes_and_survives_losing_a_stage(
    cluster: list[Daemon],
) -> None:
    wait_until("one cluster of three", lambda: converged(cluster, 3), 90)
    first, second, asker = cluster
    ids = [v["node_id"] for v in views(cluster)]
    instance_id = place_split(first, ids[0], ids[1])
    state = asker.get("/state")["state"]
    endpoints = [
        state["runner_endpoints"][s["runner_id"]] for s in state["instances"][instance_id]["shards"]
    ]
    assert [e["node_id"] for e in endpoints] == ids[:2]

    # Streamed, with the client on the third node; then concurrent requests from all.
    parts: list[str] = []
    for chunk in client(asker).chat.completions.create(
        model=BUILTIN, messages=user("Name three colours."), max_tokens=16, stream=True
    ):
        parts.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(parts).strip()
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int, via: Daemon) -> None:
        try:
            reply = client(via).chat.completions.create(
                model=BUILTIN, messages=user(f"Count to {i + 2}."), max_tokens=8
            )
            results[i] = reply.choices[0].message.content or ""
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i, cluster[i % 3])) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3] and all(results.values())

    # The second stage's runner dies mid-stream: an error within seconds; the next
    # request is served again (the model re-placed).
    runners = second.runner_pids()
    assert runners
    waited = stream_until_failure(asker, lambda: psutil.Process(runners[0]).kill())
    assert waited < 10.0
    reply = client(asker).chat.completions.create(model=BUILTIN, messages=user("Hi"), max_tokens=4)
    assert reply.choices[0].message.content

    # Now only across the two nodes again, and the second stage's whole node dies.
    for old in asker.get("/state")["state"]["instances"]:
        httpx.delete(f"{asker.url}/instances/{old}", timeout=30).raise_for_status()
    place_split(first, ids[0], ids[1])
    waited = stream_until_failure(asker, second.kill)
    assert waited < 10.0
    survivors = [first, asker]
    wait_until("the survivors agree", lambda: converged(survivors, 2), 60)

    def served_by_survivors() -> bool:
        instances = asker.get("/state")["state"]["instances"].values()
        return any(
            i["failed_reason"] is None and all(s["node_id"] != ids[1] for s in i["shards"])
            for i in instances
        )

    wait_until("the model back on the survivors", served_by_survivors, 120)
    reply = client(asker).chat.completions.create(model=BUILTIN, messages=user("Hi"), max_tokens=4)
    assert reply.choices[0].message.content
