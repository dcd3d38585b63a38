"""The `exo` console script."""

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import cast

import anyio
from loguru import logger

from exo.config import (
    DEFAULT_API_PORT,
    DEFAULT_HF_ENDPOINT,
    DEFAULT_MESH_PORT,
    MAX_REQUEST_BYTES,
    NodeConfig,
    cache_dir_default,
    data_dir_default,
)
from exo.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="exo", description="Run an exo node: pool this machine into an LLM cluster."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on the console")
    p.add_argument(
        "--api-port",
        type=int,
        default=int(os.environ.get("EXO_API_PORT", DEFAULT_API_PORT)),
        help="HTTP API and dashboard port (env EXO_API_PORT, default %(default)s)",
    )
    p.add_argument(
        "--api-host",
        default=os.environ.get("EXO_API_HOST", "0.0.0.0"),
        help="address the API binds (env EXO_API_HOST, default %(default)s)",
    )
    p.add_argument(
        "--model",
        default=os.environ.get("EXO_MODEL"),
        help="place this model at start-up, e.g. smollm2-135m-instruct, or a hub repository "
        "id (owner/name), added to the cluster first (env EXO_MODEL)",
    )
    p.add_argument(
        "--hf-endpoint",
        default=os.environ.get("HF_ENDPOINT", DEFAULT_HF_ENDPOINT),
        help="Hugging Face hub (or mirror) that models added by repository id come from "
        "(env HF_ENDPOINT, default %(default)s); HF_TOKEN opens gated or private ones",
    )
    p.add_argument(
        "--no-share-models",
        action="store_true",
        default=os.environ.get("EXO_SHARE_MODELS", "1") == "0",
        help="do not serve this node's hub downloads to peers over the API "
        "(env EXO_SHARE_MODELS=0); peers then download from the hub themselves",
    )
    p.add_argument(
        "--model-store-max-gb",
        type=float,
        default=os.environ.get("EXO_MODEL_STORE_MAX_GB"),
        help="keep downloaded hub models within this many GB: before a download, remove "
        "whole models no instance on this node runs, least recently used first "
        "(env EXO_MODEL_STORE_MAX_GB; default: no limit)",
    )
    p.add_argument(
        "--engine",
        choices=["mlx", "torch"],
        default=os.environ.get("EXO_ENGINE"),
        help="inference engine for runners on this node (env EXO_ENGINE)",
    )
    p.add_argument(
        "--dashboard-dir",
        type=Path,
        default=os.environ.get("EXO_DASHBOARD_DIR"),
        help="built dashboard to serve at / (default: dashboard/dist of the checkout)",
    )
    p.add_argument(
        "--no-fsync",
        action="store_true",
        help="do not fsync the event log (faster, loses the tail on power loss; tests only)",
    )
    p.add_argument(
        "--runner-load-timeout",
        type=float,
        default=float(os.environ.get("EXO_RUNNER_LOAD_TIMEOUT", "300")),
        help="seconds a runner may take to load its shard (default %(default)s)",
    )
    p.add_argument(
        "--command-timeout",
        type=float,
        default=float(os.environ.get("EXO_COMMAND_TIMEOUT", "10")),
        help="seconds the API waits for the master to accept or refuse a command "
        "(env EXO_COMMAND_TIMEOUT, default %(default)s)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=float(os.environ.get("EXO_STALL_TIMEOUT", "120")),
        help="seconds a running request may go without a token before it is cancelled "
        "(504; env EXO_STALL_TIMEOUT, default %(default)s)",
    )
    p.add_argument(
        "--generation-timeout",
        type=float,
        default=float(os.environ.get("EXO_GENERATION_TIMEOUT", "1800")),
        help="seconds one request may take in all, queueing included "
        "(env EXO_GENERATION_TIMEOUT, default %(default)s)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=int(os.environ.get("EXO_MAX_REQUEST_BYTES", str(4 * 1024 * 1024))),
        help=f"largest request body the API reads (413 past it; at most {MAX_REQUEST_BYTES}; "
        "env EXO_MAX_REQUEST_BYTES, default %(default)s)",
    )
    p.add_argument(
        "--telemetry-interval",
        type=float,
        default=float(os.environ.get("EXO_TELEMETRY_INTERVAL", "5")),
        help="seconds between device samples; events only on change (default %(default)s)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="measure every device's bandwidth and compute at start, not only unknown ones",
    )
    cluster = p.add_argument_group("cluster")
    cluster.add_argument(
        "--peer",
        action="append",
        default=[p for p in os.environ.get("EXO_PEERS", "").split(",") if p],
        metavar="HOST:PORT",
        help="mesh address of another node (repeatable; env EXO_PEERS, comma-separated); "
        "for networks where mDNS does not reach",
    )
    cluster.add_argument(
        "--mesh-port",
        type=int,
        default=int(os.environ.get("EXO_MESH_PORT", DEFAULT_MESH_PORT)),
        help="port the mesh listens on (env EXO_MESH_PORT, default %(default)s)",
    )
    cluster.add_argument(
        "--mesh-host",
        default=os.environ.get("EXO_MESH_HOST"),
        help="address the mesh binds (env EXO_MESH_HOST, default: every interface)",
    )
    cluster.add_argument(
        "--secret",
        default=os.environ.get("EXO_SECRET"),
        help="cluster secret: only nodes that know it can join (env EXO_SECRET, preferred: "
        "a flag shows in the process list)",
    )
    cluster.add_argument(
        "--namespace",
        default=os.environ.get("EXO_NAMESPACE", "default"),
        help="cluster name: nodes of another namespace are ignored (env EXO_NAMESPACE)",
    )
    cluster.add_argument(
        "--no-discovery",
        action="store_true",
        default=os.environ.get("EXO_DISCOVERY", "1") == "0",
        help="do not announce or browse mDNS (env EXO_DISCOVERY=0); use --peer",
    )
    cluster.add_argument(
        "--discovery-interface",
        action="append",
        default=[],
        metavar="IP",
        help="run mDNS only on this interface address (repeatable; default: all)",
    )
    cluster.add_argument(
        "--election-timeout",
        type=float,
        default=float(os.environ.get("EXO_ELECTION_TIMEOUT", "0.5")),
        help="seconds of silence from the master before a follower stands for election "
        "(randomized up to twice this; env EXO_ELECTION_TIMEOUT, default %(default)s)",
    )
    cluster.add_argument(
        "--member-timeout",
        type=float,
        default=float(os.environ.get("EXO_MEMBER_TIMEOUT", "5")),
        help="seconds of silence before a member is marked down and its instances re-placed "
        "(env EXO_MEMBER_TIMEOUT, default %(default)s)",
    )
    cluster.add_argument(
        "--link-interval",
        type=float,
        default=float(os.environ.get("EXO_LINK_INTERVAL", "600")),
        help="seconds between link measurements to each peer (default %(default)s)",
    )
    cluster.add_argument(
        "--bootstrap-wait",
        type=float,
        default=float(os.environ.get("EXO_BOOTSTRAP_WAIT", "2")),
        help="seconds a new node looks for an existing cluster before founding its own "
        "(default %(default)s; 0 when it has no way to find peers)",
    )
    return p


def _check_cluster_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import re

    from exo.routing.discovery import PeerAddressError, parse_peer
    from exo.routing.mesh.messages import NAMESPACE_PATTERN

    for text in args.peer:
        try:
            parse_peer(str(text), default_port=int(args.mesh_port))
        except PeerAddressError as exc:
            parser.error(str(exc))
    if not re.fullmatch(NAMESPACE_PATTERN, str(args.namespace)):
        parser.error(f"--namespace {args.namespace!r} must match {NAMESPACE_PATTERN}")
    if not 0 <= int(args.mesh_port) < 65536:
        parser.error(f"--mesh-port {args.mesh_port} is not a port number")
    if not 0.1 <= float(args.election_timeout) <= 60:
        parser.error("--election-timeout must be between 0.1 and 60 seconds")
    if float(args.member_timeout) <= 2 * float(args.election_timeout):
        parser.error("--member-timeout must exceed twice --election-timeout")
    if float(args.link_interval) <= 0:
        parser.error("--link-interval must be positive")


def _default_dashboard_dir() -> Path | None:
    candidate = Path(__file__).resolve().parents[2] / "dashboard" / "dist"
    return candidate if candidate.is_dir() else None


def node_config_of(argv: list[str]) -> NodeConfig:
    """The node's configuration from its flags (and environment). A value out of range is
    the operator's mistake, answered like any other bad flag (usage and one line, exit 2),
    not with a traceback."""
    from pydantic import ValidationError

    parser = _parser()
    args = parser.parse_args(argv)
    _check_cluster_args(parser, args)

    dashboard: Path | None = args.dashboard_dir or _default_dashboard_dir()
    fields = dict(
        api_host=args.api_host,
        api_port=args.api_port,
        data_dir=data_dir_default(),
        cache_dir=cache_dir_default(),
        dashboard_dir=dashboard,
        preload_model=args.model,
        hf_endpoint=args.hf_endpoint,
        hf_token=os.environ.get("HF_TOKEN") or None,
        share_models=not args.no_share_models,
        model_store_max_bytes=(
            None if args.model_store_max_gb is None else int(args.model_store_max_gb * 1e9)
        ),
        verbose=args.verbose,
        fsync=not args.no_fsync,
        runner_load_timeout_s=args.runner_load_timeout,
        command_timeout_s=args.command_timeout,
        generation_stall_timeout_s=args.stall_timeout,
        generation_timeout_s=args.generation_timeout,
        max_request_bytes=args.max_request_bytes,
        engine=args.engine,
        telemetry_interval_s=args.telemetry_interval,
        profile_devices=args.profile,
        peers=tuple(args.peer),
        mesh_port=args.mesh_port,
        mesh_host=args.mesh_host,
        secret=args.secret or None,
        namespace=args.namespace,
        discovery=not args.no_discovery,
        discovery_interfaces=tuple(args.discovery_interface),
        bootstrap_wait_s=args.bootstrap_wait if (args.peer or not args.no_discovery) else 0.0,
        election_timeout_s=args.election_timeout,
        member_timeout_s=args.member_timeout,
        link_interval_s=args.link_interval,
    )
    try:
        return NodeConfig.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_flag_of(str(error['loc'][0]))}: {error['msg']}" for error in exc.errors()
        )
        parser.error(problems)


# NodeConfig fields whose flag is not the field's name (less a trailing "_s").
_FLAGS = {
    "generation_stall_timeout_s": "--stall-timeout",
    "preload_model": "--model",
    "model_store_max_bytes": "--model-store-max-gb",
}


def _flag_of(field: str) -> str:
    return _FLAGS.get(field) or "--" + field.removesuffix("_s").replace("_", "-")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "place":  # offline placement: `exo place --cluster C --model M`
        from exo.place_cli import place_main

        sys.exit(place_main(argv[1:]))
    if argv and argv[0] == "devices":  # this machine's inventory: `exo devices [--json]`
        from exo.worker.telemetry.cli import devices_main

        sys.exit(devices_main(argv[1:]))
    config = node_config_of(argv)
    setup_logging(config.log_dir, config.verbose)
    logger.info(f"data in {config.data_dir}, cache in {config.cache_dir}")
    from exo.node import Node  # after logging is set up: importing the node is not free

    # asyncio's runner would cancel the main task on SIGINT; the node handles SIGINT itself.
    signal.signal(signal.SIGINT, lambda _signum, _frame: None)
    try:
        anyio.run(Node(config).run)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        mistake = _operator_mistake(exc)
        if mistake is not None:  # one clear line, no traceback
            logger.error(str(mistake))
            sys.exit(2)
        stored = _unusable_log(exc)
        if stored is not None:
            logger.error(_unusable_log_advice(stored, config.cluster_dir))
            sys.exit(2)
        storage = _storage_failure(exc)
        if storage is not None:
            logger.error(
                f"exo stopped: {storage}. Make room (or mend the disk) under "
                f"{config.data_dir} and start it again."
            )
            sys.exit(1)
        logger.exception(f"exo stopped on an error: {exc}")
        sys.exit(1)


def _operator_mistake(exc: BaseException) -> Exception | None:
    """The operator's mistake behind `exc` (a busy event log, an unusable identity, a port
    it cannot listen on), also when it comes wrapped in a task group's exception group."""
    from exo.identity import IdentityError
    from exo.shared.eventlog import EventLogBusy
    from exo.shared.listen import ListenError

    return _find(exc, (IdentityError, EventLogBusy, ListenError))


def _unusable_log(exc: BaseException) -> Exception | None:
    """The node's stored log is damaged, or was written by a version of exo this one
    cannot read: the node will not start on it (replaying past it would lose events)."""
    from exo.shared.eventlog import EventLogCorrupt, EventLogUnreadable

    return _find(exc, (EventLogCorrupt, EventLogUnreadable))


def _unusable_log_advice(exc: Exception, cluster_dir: Path) -> str:
    """One line: what is wrong, and how to start afresh without losing the evidence."""
    from exo.shared.eventlog import EventLogCorrupt, EventLogUnreadable

    path = exc.path if isinstance(exc, (EventLogCorrupt, EventLogUnreadable)) else cluster_dir
    move = cluster_dir if path.is_relative_to(cluster_dir) else path
    cause = (
        "Run the version of exo that wrote it, or start"
        if isinstance(exc, EventLogUnreadable)
        else "Replaying past damage would lose events. Start"
    )
    return (
        f"exo cannot start: {exc}. {cause} this node's log afresh: move it aside "
        f"(mv {move} {move}.old) and start exo again; it then rejoins its cluster from its "
        "peers, which hold the cluster's log (alone, it founds a new one)."
    )


def _storage_failure(exc: BaseException) -> Exception | None:
    """The node's replicated log could not be written (disk full, I/O error): the node
    stops rather than diverge, and says so in a line."""
    from exo.cluster.service import StorageFailed

    return _find(exc, (StorageFailed,))


def _find(exc: BaseException, kinds: tuple[type[Exception], ...]) -> Exception | None:
    """`exc` if it is one of `kinds`, or the first such inside its exception groups."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        group = cast(BaseExceptionGroup[BaseException], exc)
        for inner in group.exceptions:
            found = _find(inner, kinds)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    main()
