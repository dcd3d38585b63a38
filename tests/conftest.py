import getpass
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from exo.worker.engines.torch.compile_env import SAVED_GRAPHS_ENV
from tests.daemon import Daemon, start_cluster
from tests.fake_hub import FakeRepo

# Property tests check our code, not how fast their strategies draw: on a busy 2-core
# machine the first draws of a strategy that builds pydantic models took 1.3 s and failed
# Hypothesis's generation-speed check (test_apply, 2026-12-07). No per-example deadline
# either, for the same reason.
settings.register_profile("exo", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("exo")

BUILTIN = "smollm2-135m-instruct"
# Every daemon of the session shares one inductor cache (warmed by `compiled_models`) instead
# of its own under its EXO_HOME, which would cost each a cold compile (~70 s). The folder
# is torch's own default, so runs of the suite on one machine keep it warm.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"),
)
# Runners load saved decode steps but start no background saver (minutes of a core and ~1 GB
# each, beside every compiled daemon of the suite); tests/test_saved_graphs.py runs savers.
os.environ.setdefault(SAVED_GRAPHS_ENV, "load")


@pytest.fixture(scope="session")
def shared_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted copy of the built-in model for every daemon in the session."""
    from exo.models.store import ModelStore

    root = tmp_path_factory.mktemp("models")
    ModelStore(root).ensure(BUILTIN, lambda done, total: None)  # pyright: ignore[reportArgumentType]
    return root


@pytest.fixture(scope="session")
def compiled_models(shared_models: Path) -> Path:
    """`shared_models`, its torch decode steps compiled once here: inductor's on-disk cache
    then serves the runners of the daemons that compile (`Daemon(compiled=True)`), whose
    loads would otherwise start with a cold compile (~70 s, more on a busy machine), and
    whose idle-time compiles of the larger batches' steps would be cold too."""
    from exo.worker.engines.base import ShardSpec
    from exo.worker.engines.torch.engine import TorchEngine

    engine = TorchEngine.load(shared_models / BUILTIN, ShardSpec(0, 30, 30), lambda _: None)
    while engine.idle_work():
        pass
    del engine
    return shared_models


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, compiled_models: Path) -> Iterator[Daemon]:
    node = Daemon(tmp_path_factory.mktemp("node"), compiled_models, compiled=True).start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def cluster(tmp_path: Path, shared_models: Path) -> Iterator[list[Daemon]]:
    """Three daemons on loopback that know each other by --peer (tests/test_cluster*.py)."""
    daemons = start_cluster(tmp_path, shared_models, 3)
    try:
        yield daemons
    finally:
        for daemon in daemons:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.stop()


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in model converted into a store of its own."""
    from exo.models.store import ModelStore

    return ModelStore(tmp_path_factory.mktemp("builtin")).ensure(BUILTIN)


@pytest.fixture
def repo(builtin_dir: Path) -> FakeRepo:
    """The built-in model's converted files as a hub repository (tests/fake_hub.py), plus a
    README the store must not download."""
    from exo.models.convert import MARKER_NAME

    files = {
        p.name: p.read_bytes()
        for p in builtin_dir.iterdir()
        if p.is_file() and p.name != MARKER_NAME
    }
    files["README.md"] = b"# not downloaded\n"
    return FakeRepo(files)
