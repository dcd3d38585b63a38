"""Builders of valid control-plane values for tests (real types, no mocks)."""

from hypothesis import strategies as st

from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
from exo.shared.types.events import (
    DeviceInventoryReported,
    DeviceMetricsReported,
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    LinkProfileMeasured,
    MasterElected,
    MemberJoined,
    MemberLeft,
    MemberTimedOut,
    ModelFilesRemoved,
    ModelStoreProgress,
    NodeStarted,
    RunnerStatusChanged,
    TaskCancelled,
    TaskCreated,
    TaskFailed,
    TaskFinished,
    TaskFirstToken,
    TaskStarted,
)
from exo.shared.types.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance, ShardAssignment
from exo.shared.types.runners import (
    RunnerFailed,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerStatus,
    RunnerStopped,
    RunnerWarmingUp,
)
from exo.shared.types.tasks import Task
from exo.shared.types.telemetry import (
    DeviceMetrics,
    DeviceSpec,
    DeviceStatus,
    LinkProfile,
    PerfFigure,
)

NODES = [NodeId("node-a"), NodeId("node-b")]
INSTANCES = [InstanceId("inst-1"), InstanceId("inst-2")]
TASKS = [TaskId(f"task-{i}") for i in range(4)]
MODEL = ModelId("smollm2-135m-instruct")


def runner_of(instance_id: InstanceId, stage: int = 0) -> RunnerId:
    return RunnerId(f"run-{instance_id}-{stage}")


def chat_params(text: str = "hi", max_tokens: int = 8) -> ChatParams:
    return ChatParams(
        messages=(ChatMessage(role="user", content=text),),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
    )


def instance(
    instance_id: InstanceId, node: NodeId, stages: int = 1, n_layers: int = 30
) -> Instance:
    bounds = [n_layers * i // stages for i in range(stages + 1)]
    shards = tuple(
        ShardAssignment(
            runner_id=runner_of(instance_id, i),
            node_id=node,
            device="cpu",
            engine="mlx",
            start_layer=bounds[i],
            end_layer=bounds[i + 1],
            n_layers=n_layers,
        )
        for i in range(stages)
    )
    return Instance(instance_id=instance_id, model_id=MODEL, shards=shards, created_at_ms=0)


def task(task_id: TaskId, instance_id: InstanceId, owner: NodeId) -> Task:
    return Task(
        task_id=task_id, instance_id=instance_id, owner=owner, params=chat_params(), created_at_ms=1
    )


def indexed(events: list[Event], term: int = 1, start: int = 0) -> list[IndexedEvent]:
    return [
        IndexedEvent(index=start + i, term=term, origin="test", origin_seq=start + i, event=e)
        for i, e in enumerate(events)
    ]


nodes = st.sampled_from(NODES)
instance_ids = st.sampled_from(INSTANCES)
task_ids = st.sampled_from(TASKS)


@st.composite
def statuses(draw: st.DrawFn) -> RunnerStatus:
    choice = draw(st.integers(0, 5))
    options: list[RunnerStatus] = [
        RunnerLoading(progress=draw(st.floats(0.0, 1.0))),
        RunnerWarmingUp(),
        RunnerReady(),
        RunnerRunning(),
        RunnerStopped(),
        RunnerFailed(reason=draw(st.text(max_size=8))),
    ]
    return options[choice]


def device(
    device_id: str, name: str = "NVIDIA H100 80GB HBM3", pool: str | None = None
) -> DeviceSpec:
    kind = "cpu" if device_id == "cpu" else "metal" if device_id.startswith("metal") else "cuda"
    return DeviceSpec(
        device_id=device_id,
        kind=kind,
        name=name,
        index=0,
        memory_total_bytes=80 << 30,
        memory_pool=pool or device_id,
        memory_bandwidth=PerfFigure(value=3.35e12, source="spec_table", detail="test"),
        compute=PerfFigure(value=9.9e14, source="spec_table", detail="test"),
    )


DEVICE_IDS = ["cpu", "cuda:0", "cuda:1"]


@st.composite
def device_metrics(draw: st.DrawFn) -> DeviceMetrics:
    status: DeviceStatus = draw(st.sampled_from(["ok", "ok", "error", "lost"]))
    return DeviceMetrics(
        status=status,
        memory_used_bytes=draw(st.integers(0, 80 << 30)),
        memory_free_bytes=draw(st.integers(0, 80 << 30)),
        utilization_pct=draw(st.none() | st.floats(0.0, 100.0)),
    )


@st.composite
def telemetry_events(draw: st.DrawFn) -> Event:
    node = draw(nodes)
    choice = draw(st.integers(0, 2))
    if choice == 0:
        ids = draw(st.lists(st.sampled_from(DEVICE_IDS), unique=True, max_size=3))
        return DeviceInventoryReported(
            node_id=node,
            devices=tuple(device(i) for i in ids),
            reported_at_ms=draw(st.integers(0, 10**6)),
        )
    if choice == 1:
        ids = draw(st.lists(st.sampled_from(DEVICE_IDS), unique=True, max_size=3))
        return DeviceMetricsReported(
            node_id=node,
            metrics={i: draw(device_metrics()) for i in ids},
            reported_at_ms=draw(st.integers(0, 10**6)),
        )
    return LinkProfileMeasured(
        source=node,
        target=draw(nodes),
        profile=LinkProfile(
            rtt_ms=draw(st.floats(0.0, 100.0)),
            rtt_min_ms=0.0,
            bandwidth_bytes_per_s=draw(st.floats(0.0, 1e10)),
            ping_samples=10,
            bulk_bytes=4 << 20,
            measured_at_ms=0,
        ),
    )


@st.composite
def cluster_events(draw: st.DrawFn, node: NodeId) -> Event:
    options: list[Event] = [
        MemberJoined(node_id=node),
        MemberLeft(node_id=node),
        MemberTimedOut(node_id=node, silent_ms=5000),
        MasterElected(node_id=node, term=1),
    ]
    return draw(st.sampled_from(options))


@st.composite
def events(draw: st.DrawFn) -> Event:
    node = draw(nodes)
    inst = draw(instance_ids)
    task_id = draw(task_ids)
    choice = draw(st.integers(0, 13))
    if choice == 12:
        return draw(telemetry_events())
    if choice == 13:
        return draw(cluster_events(node))
    options: list[Event] = [
        NodeStarted(
            node_id=node,
            session=draw(st.sampled_from(["s1", "s2"])),
            hostname="h",
            api_port=52415,
            started_at_ms=0,
        ),
        InstanceCreated(instance=instance(inst, node, draw(st.integers(1, 3)))),
        InstanceDeleted(instance_id=inst, reason="r"),
        RunnerStatusChanged(
            runner_id=runner_of(inst, draw(st.integers(0, 2))), status=draw(statuses())
        ),
        TaskCreated(task=task(task_id, inst, node)),
        TaskStarted(task_id=task_id),
        TaskFirstToken(task_id=task_id, time_to_first_token_ms=3.0),
        TaskFinished(
            task_id=task_id,
            finish_reason="stop",
            prompt_tokens=3,
            completion_tokens=draw(st.integers(0, 100)),
            decode_tokens_per_s=9.0,
        ),
        TaskFailed(task_id=task_id, reason="boom"),
        TaskCancelled(task_id=task_id, reason="client left"),
        ModelStoreProgress(
            node_id=node, model_id=MODEL, done_bytes=50, total_bytes=100, complete=False
        ),
        ModelFilesRemoved(node_id=node, model_id=MODEL),
    ]
    return options[choice]
