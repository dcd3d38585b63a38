"""Writes dashboard/src/test/fixtures/synthetic.json: events and the state exo's Python
`apply` folds them into. The Vitest suite checks the TypeScript fold gives the same state;
tests/test_dashboard_e2e.py checks the fixture still matches the Python fold. Also refreshes
the `instances` of the recorded states (state-34/36/74.json) with the Python fold.

    uv run python dashboard/scripts/gen_fixtures.py
"""

import json
from pathlib import Path

from exo.models.cards import SMOLLM2_135M_INSTRUCT
from exo.shared.apply import apply, fold
from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
from exo.shared.types.events import (
    DeviceInventoryReported,
    DeviceMetricsReported,
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    LinkProfileMeasured,
    ModelAdded,
    ModelFilesRemoved,
    ModelRemoved,
    ModelStoreProgress,
    NodeStarted,
    RunnerStatusChanged,
    TaskCancelled,
    TaskCreated,
    TaskFinished,
    TaskFirstToken,
    TaskStarted,
)
from exo.shared.types.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import (
    Instance,
    InstancePrediction,
    ShardAssignment,
    StagePrediction,
)
from exo.shared.types.runners import (
    RunnerFailed,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerStopped,
)
from exo.shared.types.state import State
from exo.shared.types.tasks import Task
from exo.shared.types.telemetry import DeviceMetrics, DeviceSpec, LinkProfile, PerfFigure

OUT = Path(__file__).resolve().parents[1] / "src" / "test" / "fixtures" / "synthetic.json"
MODEL = ModelId("smollm2-135m-instruct")
HUB_MODEL = ModelId("org/chat")
OLD_MODEL = ModelId("org/old")
A, B = NodeId("node-aaaa"), NodeId("node-bbbb")
PARAMS = ChatParams(
    messages=(ChatMessage(role="user", content="hi"),),
    sampling=SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0),
)


def shard(runner: str, node: NodeId, start: int, end: int, device: str = "cpu") -> ShardAssignment:
    return ShardAssignment(
        runner_id=RunnerId(runner),
        node_id=node,
        device=device,
        engine="mlx",
        start_layer=start,
        end_layer=end,
        n_layers=30,
    )


def task(task_id: str, instance: str, owner: NodeId, at_ms: int) -> Task:
    return Task(
        task_id=TaskId(task_id),
        instance_id=InstanceId(instance),
        owner=owner,
        params=PARAMS,
        created_at_ms=at_ms,
    )


def device(device_id: str, kind: str, name: str, total: int) -> DeviceSpec:
    return DeviceSpec.model_validate(
        {
            "device_id": device_id,
            "kind": kind,
            "name": name,
            "index": 0,
            "memory_total_bytes": total,
            "memory_pool": f"{kind}-pool",
            "memory_bandwidth": PerfFigure(value=1e11, source="spec_table", detail="table"),
            "compute": PerfFigure(value=1e12, source="measured", detail="bench"),
        }
    )


def events() -> list[tuple[str, Event]]:
    i1 = Instance(
        instance_id=InstanceId("inst-1"),
        model_id=MODEL,
        shards=(shard("run-1", A, 0, 15), shard("run-2", B, 15, 30, "cuda:0")),
        created_at_ms=1000,
    )
    i2 = Instance(
        instance_id=InstanceId("inst-2"),
        model_id=MODEL,
        shards=(shard("run-3", A, 0, 30),),
        created_at_ms=2000,
        prediction=InstancePrediction(
            objective="latency",
            solver_status="optimal",
            solve_time_s=0.002,
            tokens_per_s=50.0,
            time_per_token_s=0.02,
            throughput_tokens_per_s=50.0,
            ttft_s=0.25,
            reference_prompt_tokens=512,
            context_length=4096,
            stages=(
                StagePrediction(device_id=f"{A}/cpu", decode_s=0.02, prefill_s=0.25, handoff_s=0.0),
            ),
        ),
    )
    gib = 1 << 30
    return [
        ("a/1", NodeStarted(node_id=A, session="1", hostname="alpha", api_port=52415, started_at_ms=10)),
        ("b/1", NodeStarted(node_id=B, session="1", hostname="beta", api_port=52415, started_at_ms=11)),
        ("m", InstanceCreated(instance=i1)),
        ("a/1", RunnerStatusChanged(runner_id=RunnerId("run-1"), status=RunnerLoading(progress=0.5))),
        ("b/1", RunnerStatusChanged(runner_id=RunnerId("run-2"), status=RunnerLoading(progress=0.25))),
        ("a/1", RunnerStatusChanged(runner_id=RunnerId("run-1"), status=RunnerReady())),
        ("b/1", RunnerStatusChanged(runner_id=RunnerId("run-2"), status=RunnerReady())),
        ("m", TaskCreated(task=task("t1", "inst-1", A, 3000))),
        ("a/1", TaskStarted(task_id=TaskId("t1"))),
        ("m", TaskCreated(task=task("t2", "inst-1", B, 3100))),
        ("b/1", RunnerStatusChanged(runner_id=RunnerId("run-2"), status=RunnerFailed(reason="out of memory on cuda:0"))),
        ("a/1", RunnerStatusChanged(runner_id=RunnerId("run-1"), status=RunnerRunning())),
        ("m", InstanceCreated(instance=i2)),
        ("m", TaskCreated(task=task("t3", "inst-2", B, 4000))),
        ("b/2", NodeStarted(node_id=B, session="2", hostname="beta", api_port=52415, started_at_ms=4100)),
        ("m", TaskCreated(task=task("t4", "inst-gone", A, 4200))),
        ("m", TaskCreated(task=task("t5", "inst-2", A, 5000))),
        ("a/1", TaskFirstToken(task_id=TaskId("t5"), time_to_first_token_ms=120.5)),
        ("a/1", TaskFinished(task_id=TaskId("t5"), finish_reason="stop", prompt_tokens=10, completion_tokens=5, decode_tokens_per_s=25.0)),
        ("m", InstanceDeleted(instance_id=InstanceId("inst-1"), reason="deleted by request")),
        ("a/1", RunnerStatusChanged(runner_id=RunnerId("run-1"), status=RunnerStopped())),
        ("a/1", ModelStoreProgress(node_id=A, model_id=MODEL, done_bytes=5, total_bytes=10, complete=False)),
        ("m", TaskCancelled(task_id=TaskId("nope"), reason="x")),
        ("m", TaskCreated(task=task("t6", "inst-2", A, 6000))),
        # Telemetry: metrics before any inventory are dropped; a device that leaves the
        # inventory takes its figures with it.
        ("b/2", DeviceMetricsReported(node_id=B, metrics={"cpu": DeviceMetrics(memory_used_bytes=1)}, reported_at_ms=6100)),
        ("a/1", DeviceInventoryReported(node_id=A, devices=(device("cpu", "cpu", "AMD EPYC", 16 * gib), device("cuda:0", "cuda", "NVIDIA H100", 80 * gib)), reported_at_ms=6200)),
        ("a/1", DeviceMetricsReported(node_id=A, metrics={"cpu": DeviceMetrics(memory_used_bytes=4 * gib, memory_free_bytes=12 * gib, utilization_pct=12.5, temperature_c=51.0), "cuda:0": DeviceMetrics(memory_used_bytes=gib, memory_free_bytes=79 * gib, utilization_pct=3.0, power_w=70.5), "cuda:9": DeviceMetrics()}, reported_at_ms=6300)),
        ("a/1", DeviceInventoryReported(node_id=A, devices=(device("cpu", "cpu", "AMD EPYC", 16 * gib),), reported_at_ms=6400)),
        ("a/1", LinkProfileMeasured(source=A, target=B, profile=LinkProfile(rtt_ms=0.4, rtt_min_ms=0.3, bandwidth_bytes_per_s=1.2e9, ping_samples=10, bulk_bytes=1 << 24, measured_at_ms=6500))),
        ("b/2", LinkProfileMeasured(source=B, target=A, profile=LinkProfile(rtt_ms=0.5, rtt_min_ms=0.3, bandwidth_bytes_per_s=1.1e9, ping_samples=10, bulk_bytes=1 << 24, measured_at_ms=6600))),
        # Measured tokens/s per instance: a one-token task has no decode rate (not counted).
        ("m", TaskCreated(task=task("t7", "inst-2", A, 7000))),
        ("a/1", TaskFinished(task_id=TaskId("t7"), finish_reason="length", prompt_tokens=10, completion_tokens=1, decode_tokens_per_s=0.0)),
        ("a/1", TaskFirstToken(task_id=TaskId("t6"), time_to_first_token_ms=95.0)),
        ("a/1", TaskFinished(task_id=TaskId("t6"), finish_reason="stop", prompt_tokens=10, completion_tokens=40, decode_tokens_per_s=31.3)),
        # A model added from the hub (its card read from the hub by the API's node).
        ("m", ModelAdded(card=SMOLLM2_135M_INSTRUCT.model_copy(update={"model_id": HUB_MODEL, "display_name": "chat", "source": f"hf:{HUB_MODEL}@{'a' * 40}"}))),
        ("m", ModelAdded(card=SMOLLM2_135M_INSTRUCT.model_copy(update={"model_id": OLD_MODEL, "display_name": "old", "source": f"hf:{OLD_MODEL}@{'b' * 40}"}))),
        ("m", ModelRemoved(model_id=OLD_MODEL)),
        # Both nodes hold the hub model; B removes its files to stay within its store's limit.
        ("a/1", ModelStoreProgress(node_id=A, model_id=HUB_MODEL, done_bytes=10, total_bytes=10, complete=True)),
        ("b/2", ModelStoreProgress(node_id=B, model_id=HUB_MODEL, done_bytes=10, total_bytes=10, complete=True)),
        ("b/2", ModelFilesRemoved(node_id=B, model_id=HUB_MODEL)),
        ("b/2", ModelFilesRemoved(node_id=B, model_id=OLD_MODEL)),
    ]  # fmt: skip


def refresh_recorded() -> None:
    """The recorded states' `instances`, refolded by today's Python apply.

    Instances gained fields after the recording (`prediction`, `measured`); a daemon of
    this version returns them for the same events. Everything else stays as recorded.
    """
    fixtures = OUT.parent
    lines = (fixtures / "events.jsonl").read_text().splitlines()
    events = [IndexedEvent.model_validate_json(line) for line in lines if line.strip()]
    for index in (34, 36, 74):
        path = fixtures / f"state-{index}.json"
        recorded = json.loads(path.read_text())
        state = fold(State(), events[: index + 1])
        recorded["state"]["instances"] = json.loads(state.model_dump_json())["instances"]
        path.write_text(json.dumps(recorded, indent=1) + "\n")
        print(f"refreshed the instances of {path}")


def main() -> None:
    refresh_recorded()
    seqs: dict[str, int] = {}
    state = State()
    out: list[object] = []
    for index, (origin, event) in enumerate(events()):
        seqs[origin] = seqs.get(origin, -1) + 1
        indexed = IndexedEvent(
            index=index,
            term=1 if index < 12 else 2,
            origin=origin,
            origin_seq=seqs[origin],
            event=event,
        )
        state = apply(state, indexed)
        out.append(json.loads(indexed.model_dump_json()))
    fixture = {"events": out, "state": json.loads(state.model_dump_json())}
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {OUT} ({len(out)} events)")


if __name__ == "__main__":
    main()
