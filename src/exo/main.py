"""The `exo` console script."""

import argparse
import os
import signal
import sys
from pathlib import Path

import anyio
from loguru import logger

from exo.config import DEFAULT_API_PORT, NodeConfig, cache_dir_default, data_dir_default
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
        help="place this model at start-up, e.g. smollm2-135m-instruct (env EXO_MODEL)",
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
    return p


def _default_dashboard_dir() -> Path | None:
    candidate = Path(__file__).resolve().parents[2] / "dashboard" / "dist"
    return candidate if candidate.is_dir() else None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "place":  # offline placement: `exo place --cluster C --model M`
        from exo.place_cli import place_main

        sys.exit(place_main(argv[1:]))
    if argv and argv[0] == "devices":  # this machine's inventory: `exo devices [--json]`
        from exo.worker.telemetry.cli import devices_main

        sys.exit(devices_main(argv[1:]))
    args = _parser().parse_args(argv)
    dashboard: Path | None = args.dashboard_dir or _default_dashboard_dir()
    config = NodeConfig(
        api_host=args.api_host,
        api_port=args.api_port,
        data_dir=data_dir_default(),
        cache_dir=cache_dir_default(),
        dashboard_dir=dashboard,
        preload_model=args.model,
        verbose=args.verbose,
        fsync=not args.no_fsync,
        runner_load_timeout_s=args.runner_load_timeout,
        engine=args.engine,
        telemetry_interval_s=args.telemetry_interval,
        profile_devices=args.profile,
    )
    setup_logging(config.log_dir, config.verbose)
    logger.info(f"data in {config.data_dir}, cache in {config.cache_dir}")
    from exo.identity import IdentityError
    from exo.node import Node  # after logging is set up: importing the node is not free
    from exo.shared.eventlog import EventLogBusy

    # asyncio's runner would cancel the main task on SIGINT; the node handles SIGINT itself.
    signal.signal(signal.SIGINT, lambda _signum, _frame: None)
    try:
        anyio.run(Node(config).run)
    except KeyboardInterrupt:
        pass
    except (IdentityError, EventLogBusy) as exc:  # an operator's mistake: one clear line
        logger.error(str(exc))
        sys.exit(2)
    except Exception as exc:
        logger.exception(f"exo stopped on an error: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
