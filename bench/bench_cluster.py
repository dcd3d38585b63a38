"""Control-plane benchmarks of the cluster, on loopback with real sockets and real disks.

Each node is the real `ClusterService` (consensus core + durable log with fsync + the
authenticated mesh), several in one process; a "crash" cancels a node's task group,
which closes its sockets like a killed process (the daemon-level kill -9 is in
tests/test_cluster.py).

1. Throughput: local events per second from 3 worker nodes through the master to every
   node's applied state.
2. Failover: time from the master's crash to a new master deciding a command, median of
   repeated runs (target < 2 s with default timeouts).
3. Catch-up: time for a fresh node to join a cluster whose log holds N events (100k
   by default).

    uv run python bench/bench_cluster.py [--events 30000] [--failovers 7] [--catchup 100000]
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio.abc import TaskGroup
from loguru import logger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio.lowlevel

from exo.cluster.service import ClusterService
from exo.cluster.store import ClusterStore
from exo.master.decide import Decision, Rejection
from exo.routing.consensus import ConsensusConfig
from exo.routing.mesh import Mesh, MeshConfig
from exo.routing.router import Router
from exo.shared.types.commands import CommandEnvelope, DeleteInstance
from exo.shared.types.events import ModelStoreProgress
from exo.shared.types.ids import InstanceId, ModelId, NodeId, new_command_id
from exo.shared.types.state import State


def decide(state: State, envelope: CommandEnvelope) -> Decision | Rejection:
    return Rejection(code="not_found", message="bench: decided")


class BenchNode:
    def __init__(self, root: Path, name: str, *, fsync: bool) -> None:
        self.node_id = NodeId(f"node-{name}")
        self.store = ClusterStore(root / name, fsync=fsync)
        self.mesh = Mesh(MeshConfig(node_id=self.node_id, host="127.0.0.1", port=0))
        self.service = ClusterService(
            node_id=self.node_id,
            session="bench",
            store=self.store,
            mesh=self.mesh,
            router=Router(),
            decide=decide,
            config=ConsensusConfig(snapshot_every=10_000),
            bootstrap_wait_s=0.5,
            rng=random.Random(),
        )
        self.scope: anyio.CancelScope | None = None
        self.port = 0

    async def run(self, peers: list[int], *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.CancelScope() as scope:
            self.scope = scope
            try:
                async with anyio.create_task_group() as tg:
                    self.port = await tg.start(self.mesh.run)
                    for port in peers:
                        self.mesh.add_peer("127.0.0.1", port)
                    await tg.start(self.service.run)
                    task_status.started()
            finally:
                self.store.close()

    def crash(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


async def start(tg: TaskGroup, nodes: list[BenchNode]) -> None:
    for node in nodes:
        await tg.start(node.run, [n.port for n in nodes if n.port])


async def until(check: Callable[[], bool], timeout_s: float, poll_s: float = 0.005) -> None:
    with anyio.fail_after(timeout_s):
        while not check():  # noqa: ASYNC110 (polls other services' state; no event to wait on)
            await anyio.sleep(poll_s)


def formed(nodes: list[BenchNode]) -> bool:
    hashes = {n.service.state.state_hash() for n in nodes}
    return len(hashes) == 1 and all(
        len(n.service.status().voters) == len(nodes) and n.service.status().master is not None
        for n in nodes
    )


def progress_event(node: BenchNode, i: int) -> ModelStoreProgress:
    return ModelStoreProgress(
        node_id=node.node_id,
        model_id=ModelId(f"bench-{i % 7}"),
        done_bytes=i,
        total_bytes=10**12,
        complete=False,
    )


async def throughput(root: Path, n_events: int, fsync: bool) -> float:
    nodes = [BenchNode(root, f"t{i}", fsync=fsync) for i in range(3)]
    elapsed, per_node = 0.0, n_events // 3
    async with anyio.create_task_group() as tg:
        await start(tg, nodes)
        await until(lambda: formed(nodes), 30)
        targets = {n.service.origin: 0 for n in nodes}
        t0 = time.perf_counter()
        for i in range(per_node):
            for node in nodes:
                targets[node.service.origin] = await node.service.emit(progress_event(node, i))
            if i % 500 == 0:
                await anyio.lowlevel.checkpoint()

        def all_applied() -> bool:
            return all(
                n.service.state.origin_seqs.get(origin, -1) >= seq
                for n in nodes
                for origin, seq in targets.items()
            )

        await until(all_applied, 300, 0.01)
        elapsed = time.perf_counter() - t0
        for node in nodes:
            node.crash()
        tg.cancel_scope.cancel()
    return per_node * 3 / elapsed


async def failover_once(root: Path, run: int) -> float:
    nodes = [BenchNode(root, f"f{run}-{i}", fsync=True) for i in range(3)]
    elapsed = 0.0
    async with anyio.create_task_group() as tg:
        await start(tg, nodes)
        await until(lambda: formed(nodes), 30)
        master = next(n for n in nodes if n.service.status().role == "leader")
        survivor = next(n for n in nodes if n is not master)
        master.crash()
        t0 = time.perf_counter()
        while True:
            envelope = CommandEnvelope(
                command_id=new_command_id(),
                origin=survivor.node_id,
                command=DeleteInstance(instance_id=InstanceId("none")),
            )
            with anyio.move_on_after(0.2):
                reply = await survivor.service.send_command(envelope, 15)
                if reply.kind == "rejected" and reply.code == "not_found":
                    break  # decided by a master
        elapsed = time.perf_counter() - t0
        for node in nodes:
            if node is not master:
                node.crash()
        tg.cancel_scope.cancel()
    return elapsed


async def catchup(root: Path, n_events: int) -> tuple[float, int]:
    nodes = [BenchNode(root, f"c{i}", fsync=True) for i in range(2)]
    elapsed, target = 0.0, -1
    async with anyio.create_task_group() as tg:
        await start(tg, nodes)
        await until(lambda: formed(nodes), 30)
        last = 0
        for i in range(n_events):
            last = await nodes[i % 2].service.emit(progress_event(nodes[i % 2], i))
            if i % 1000 == 0:
                await anyio.lowlevel.checkpoint()
        origin = nodes[(n_events - 1) % 2].service.origin
        await until(lambda: nodes[0].service.state.origin_seqs.get(origin, -1) >= last, 600, 0.05)
        target = nodes[0].service.state.last_index
        late = BenchNode(root, "late", fsync=True)
        t0 = time.perf_counter()
        await tg.start(late.run, [n.port for n in nodes])
        await until(lambda: late.service.state.last_index >= target, 600, 0.01)
        elapsed = time.perf_counter() - t0
        for node in [*nodes, late]:
            node.crash()
        tg.cancel_scope.cancel()
    return elapsed, target


async def main(args: argparse.Namespace) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tempfile.TemporaryDirectory(prefix="exo-bench-cluster-") as tmp:
        root = Path(tmp)
        if args.events:
            rate = await throughput(root, args.events, fsync=True)
            print(f"throughput: {rate:,.0f} events/s (3 producers -> master -> 3 nodes, fsync)")
        if args.failovers:
            times = [await failover_once(root, run) for run in range(args.failovers)]
            print(
                f"failover: median {statistics.median(times) * 1000:.0f} ms, "
                f"min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f} "
                f"over {len(times)} runs (crash of the master -> a command decided)"
            )
        if args.catchup:
            elapsed, target = await catchup(root, args.catchup)
            print(f"catch-up: {elapsed:.2f} s for a fresh node to apply a log at index {target:,}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--failovers", type=int, default=7)
    parser.add_argument("--catchup", type=int, default=100_000)
    anyio.run(main, parser.parse_args())
