"""plan() and apply() for pipeline instances: endpoints, links, dispatch once all serve."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exo.shared.apply import fold
from exo.shared.types.events import (
    Event,
    InstanceCreated,
    InstanceDeleted,
    RunnerEndpointReported,
    RunnerStatusChanged,
    TaskCreated,
)
from exo.shared.types.instances import Instance
from exo.shared.types.runners import RunnerEndpoint, RunnerReady, RunnerWarmingUp
from exo.shared.types.state import State
from exo.worker.cores import cpu_share, physical_count
from exo.worker.plan import DispatchTask, LinkStage, SpawnRunner, WorkerView, plan
from exo.worker.runner.protocol import RUNNER_CPUS_ENV, RUNNER_THREADS_ENV
from exo.worker.supervisor import SHARED_CORES_SPINS, runner_env
from tests.factories import INSTANCES, NODES, TASKS, indexed, instance, runner_of, task

ME, OTHER = NODES
INST = INSTANCES[0]
R0, R1 = runner_of(INST, 0), runner_of(INST, 1)


def state_of(*events: Event) -> State:
    return fold(State(), indexed(list(events)))


def two_nodes() -> Instance:
    """Stage 0 on ME, stage 1 on OTHER."""
    base = instance(INST, ME, stages=2)
    shards = (base.shards[0], base.shards[1].model_copy(update={"node_id": OTHER}))
    return base.model_copy(update={"shards": shards})


def endpoint(runner: str, node: str, port: int) -> RunnerEndpointReported:
    return RunnerEndpointReported(
        runner_id=runner,  # pyright: ignore[reportArgumentType]
        endpoint=RunnerEndpoint(node_id=node, host=f"10.0.0.{port - 5000}", port=port),  # pyright: ignore[reportArgumentType]
    )


def test_endpoints_are_folded_into_state_and_leave_with_the_instance() -> None:
    created = InstanceCreated(instance=two_nodes())
    state = state_of(created, endpoint(R0, ME, 5000), endpoint(R1, OTHER, 5001))
    assert state.runner_endpoints[R1].port == 5001
    gone = fold(state, indexed([InstanceDeleted(instance_id=INST, reason="x")], start=3))
    assert gone.runner_endpoints == {}
    # A late report for a deleted instance's runner changes nothing.
    late = fold(gone, indexed([endpoint(R0, ME, 5002)], start=4))
    assert late.runner_endpoints == {}


def test_stages_are_spawned_as_pipeline_stages() -> None:
    state = state_of(InstanceCreated(instance=instance(INST, ME, stages=2)))
    actions = plan(state, WorkerView(node_id=ME))
    assert [a.pipeline for a in actions if isinstance(a, SpawnRunner)] == [True, True]
    single = state_of(InstanceCreated(instance=instance(INST, ME)))
    assert [
        a.pipeline for a in plan(single, WorkerView(node_id=ME)) if isinstance(a, SpawnRunner)
    ] == [False]


def test_cpu_stages_of_one_instance_on_this_node_get_slots() -> None:
    both_here = state_of(InstanceCreated(instance=instance(INST, ME, stages=2)))
    spawns = [a for a in plan(both_here, WorkerView(node_id=ME)) if isinstance(a, SpawnRunner)]
    assert [(a.cpu_slot, a.cpu_slots) for a in spawns] == [(0, 2), (1, 2)]
    split = state_of(InstanceCreated(instance=two_nodes()))
    spawns = [a for a in plan(split, WorkerView(node_id=ME)) if isinstance(a, SpawnRunner)]
    assert [(a.cpu_slot, a.cpu_slots) for a in spawns] == [(0, 1)]


TWO_CORES = {0: (0, 0), 1: (0, 1)}
# Two cores with two hyperthreads each, numbered as Linux does (siblings n and n + 2).
HYPERTHREADED = {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)}


def test_cpu_shares_are_whole_cores_split_as_evenly_as_they_go() -> None:
    assert [cpu_share(TWO_CORES, i, 2) for i in range(2)] == [{0}, {1}]
    assert [cpu_share(HYPERTHREADED, i, 2) for i in range(2)] == [{0, 2}, {1, 3}]
    three = {0: (0, 0), 1: (0, 1), 2: (1, 0)}
    assert [cpu_share(three, i, 2) for i in range(2)] == [{0}, {1, 2}]
    assert cpu_share(HYPERTHREADED, 0, 3) is None  # fewer cores than stages
    assert cpu_share(TWO_CORES, 2, 2) is None


def test_runner_env_gives_co_located_cpu_stages_their_own_cores() -> None:
    first = runner_env("cpu", 0, 2, cores=HYPERTHREADED)
    second = runner_env("cpu", 1, 2, cores=HYPERTHREADED)
    assert (first[RUNNER_CPUS_ENV], second[RUNNER_CPUS_ENV]) == ("0,2", "1,3")
    assert first["CUDA_VISIBLE_DEVICES"] == ""
    # A lone stage, and a GPU stage, run wherever the node's runners may.
    assert RUNNER_CPUS_ENV not in runner_env("cpu", cores=TWO_CORES)
    assert RUNNER_CPUS_ENV not in runner_env("cuda:0", 0, 2, cores=TWO_CORES)
    if "OMP_WAIT_POLICY" not in os.environ:
        assert "OMP_WAIT_POLICY" not in first
        assert "OMP_WAIT_POLICY" not in runner_env("cpu", cores=TWO_CORES)


def test_co_located_torch_stages_run_on_every_core_with_two_thread_counts() -> None:
    """A torch stage steps with all the cores while the other stages have nothing to do,
    with its share otherwise (TorchEngine.use_cores): it is not pinned, it gets counts."""
    for slot in range(2):
        env = runner_env("cpu", slot, 2, cores=HYPERTHREADED, engine="torch")
        assert RUNNER_CPUS_ENV not in env
        assert env[RUNNER_THREADS_ENV] == "1,2"  # physical cores: hyperthreads count once
        if "GOMP_SPINCOUNT" not in os.environ:
            assert env["GOMP_SPINCOUNT"] == str(SHARED_CORES_SPINS)
    three = {0: (0, 0), 1: (0, 1), 2: (1, 0)}
    assert [
        runner_env("cpu", i, 2, cores=three, engine="torch")[RUNNER_THREADS_ENV] for i in (0, 1)
    ] == ["1,3", "2,3"]
    # An MLX stage keeps its own cores; a lone torch stage, and one with fewer cores than
    # stages, get no counts.
    assert runner_env("cpu", 1, 2, cores=TWO_CORES, engine="mlx")[RUNNER_CPUS_ENV] == "1"
    assert RUNNER_THREADS_ENV not in runner_env("cpu", cores=TWO_CORES, engine="torch")
    crowded = runner_env("cpu", 1, 3, cores=TWO_CORES, engine="torch")
    assert RUNNER_THREADS_ENV not in crowded and crowded["OMP_WAIT_POLICY"] == "PASSIVE"
    assert physical_count(HYPERTHREADED, {0, 1, 2, 3}) == 2


def test_only_the_supervisor_pins_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RUNNER_CPUS_ENV, "0")
    monkeypatch.setenv(RUNNER_THREADS_ENV, "1,2")
    assert RUNNER_CPUS_ENV not in runner_env("cpu", cores=TWO_CORES)
    assert RUNNER_THREADS_ENV not in runner_env("cpu", cores=TWO_CORES, engine="torch")
    assert runner_env("cpu", 1, 2, cores=TWO_CORES)[RUNNER_CPUS_ENV] == "1"


def test_stages_with_fewer_cores_than_stages_share_them_with_sleeping_threads() -> None:
    env = runner_env("cpu", 1, 3, cores=TWO_CORES)
    assert RUNNER_CPUS_ENV not in env
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
@pytest.mark.parametrize("value", ["first", "not-a-cpu", "99999"])
def test_a_runner_pins_itself_to_its_cpus_and_ignores_a_bad_value(value: str) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    wanted = str(cpus[-1]) if value == "first" else value
    code = (
        "import os; from exo.worker.runner.__main__ import pin_cpus; pin_cpus(); "
        "print(sorted(os.sched_getaffinity(0)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, RUNNER_CPUS_ENV: wanted},
        capture_output=True,
        text=True,
        check=True,
    )
    expected = [cpus[-1]] if value == "first" else cpus
    assert result.stdout.strip() == str(expected)
    if value != "first":
        assert "ignoring EXO_RUNNER_CPUS" in result.stderr


def test_runner_env_keeps_compiled_graphs_in_the_nodes_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache = tmp_path / "torchinductor"
    assert runner_env("cpu", compile_cache=cache)["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    assert "TORCHINDUCTOR_CACHE_DIR" not in runner_env("cpu")
    # A folder the user chose wins.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/srv/inductor")
    assert runner_env("cuda:0", compile_cache=cache)["TORCHINDUCTOR_CACHE_DIR"] == "/srv/inductor"


def test_each_stage_links_to_its_successor_in_the_ring() -> None:
    state = state_of(
        InstanceCreated(instance=two_nodes()), endpoint(R0, ME, 5000), endpoint(R1, OTHER, 5001)
    )
    mine = WorkerView(node_id=ME, spawned=frozenset({R0}), alive=frozenset({R0}))
    theirs = WorkerView(node_id=OTHER, spawned=frozenset({R1}), alive=frozenset({R1}))
    # Another node's stage is reached at its advertised host; one on this node by loopback.
    assert plan(state, mine) == [LinkStage(runner_id=R0, host="10.0.0.1", port=5001)]
    assert plan(state, theirs) == [LinkStage(runner_id=R1, host="10.0.0.0", port=5000)]
    local = state_of(
        InstanceCreated(instance=instance(INST, ME, stages=2)),
        endpoint(R0, ME, 5000),
        endpoint(R1, ME, 5001),
    )
    both = WorkerView(node_id=ME, spawned=frozenset({R0, R1}), alive=frozenset({R0, R1}))
    assert plan(local, both) == [
        LinkStage(runner_id=R0, host="127.0.0.1", port=5001),
        LinkStage(runner_id=R1, host="127.0.0.1", port=5000),
    ]
    # Told once; not before the successor reported where it listens.
    assert plan(state, mine.model_copy(update={"linked": frozenset({R0})})) == []
    early = state_of(InstanceCreated(instance=two_nodes()), endpoint(R0, ME, 5000))
    assert plan(early, mine) == []


def test_a_pipeline_takes_tasks_once_every_stage_serves() -> None:
    events: list[Event] = [
        InstanceCreated(instance=two_nodes()),
        TaskCreated(task=task(TASKS[0], INST, OTHER)),
        RunnerStatusChanged(runner_id=R0, status=RunnerReady()),
        RunnerStatusChanged(runner_id=R1, status=RunnerWarmingUp()),
    ]
    view = WorkerView(
        node_id=ME, spawned=frozenset({R0}), alive=frozenset({R0}), linked=frozenset({R0})
    )
    assert plan(state_of(*events), view) == []
    events.append(RunnerStatusChanged(runner_id=R1, status=RunnerReady()))
    assert plan(state_of(*events), view) == [DispatchTask(task_id=TASKS[0], runner_id=R0)]
    # Only the first stage's node dispatches; the others learn of it in-band.
    other = WorkerView(
        node_id=OTHER, spawned=frozenset({R1}), alive=frozenset({R1}), linked=frozenset({R1})
    )
    assert plan(state_of(*events), other) == []
