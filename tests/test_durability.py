"""Crash safety of the whole daemon: kill -9 mid-write, restart, nothing applied is lost."""

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from exo.cluster.store import ClusterStore
from exo.shared.apply import fold
from exo.shared.types.state import State
from tests.conftest import BUILTIN
from tests.daemon import Daemon

pytestmark = pytest.mark.slow


def replay(home: Path) -> tuple[State, list[str]]:
    """The committed state and entries a restart of this node would start from."""
    store = ClusterStore(home / "data" / "cluster", fsync=False)
    try:
        restored = store.restored()
        assert restored is not None
        assert restored.snapshot is None  # too few events here for a checkpoint
        committed = [e for e in restored.entries if e.index <= restored.hard_state.commit]
        return fold(State(), committed), [e.model_dump_json() for e in committed]
    finally:
        store.close()


def test_kill_9_mid_write_then_restart_replays_the_surviving_log(
    tmp_path: Path, shared_models: Path
) -> None:
    node = Daemon(tmp_path / "node", shared_models).start()
    node.wait_ready(BUILTIN)

    def chat() -> None:
        try:
            httpx.post(
                f"{node.url}/v1/chat/completions",
                json={
                    "model": BUILTIN,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 64,
                },
                timeout=60,
            )
        except httpx.HTTPError:
            pass  # the daemon dies under this request

    workers = [threading.Thread(target=chat) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(2.5)  # tasks are being created, started and streamed: the log is being written
    node.kill()
    for w in workers:
        w.join(60)

    survived, survived_log = replay(node.home)
    assert survived.last_index >= 0
    assert fold(State(), []).last_index == -1
    assert survived.state_hash() == replay(node.home)[0].state_hash()  # replay is repeatable

    node.start()
    node.wait_ready(BUILTIN)  # the instance resumes: its runner is spawned again
    reply = httpx.post(
        f"{node.url}/v1/chat/completions",
        json={"model": BUILTIN, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        timeout=120,
    )
    assert reply.status_code == 200
    live = node.get("/state")
    assert node.stop(signal.SIGTERM) == 0

    after, after_log = replay(node.home)
    assert after_log[: len(survived_log)] == survived_log  # the surviving prefix is untouched
    assert after.last_index >= live["last_index"]
    assert after.last_index > survived.last_index
    # Tasks in flight at the crash did not survive as zombies.
    assert after.tasks == {}
