"""`exo devices [--json] [--profile]`: this machine's inventory, as a table or as JSON."""

import argparse
import json
import socket
import sys
from typing import Any

from exo.shared.types.telemetry import DeviceMetrics, DeviceSpec, PerfFigure
from exo.worker.engines.choice import this_machines_engine
from exo.worker.telemetry.inventory import Inventory, default_sources
from exo.worker.telemetry.profiler import EngineBenchmark


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="exo devices", description="Print this machine's devices as exo's telemetry sees them."
    )
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    p.add_argument(
        "--profile",
        action="store_true",
        help="measure bandwidth and compute on every device, even where the spec table knows it",
    )
    p.add_argument(
        "--engine",
        choices=["mlx", "torch"],
        default=None,
        help="engine the CPU is rated for: mlx with MLX's matmul, torch with numpy's (which"
        " torch's matches); default: the one the node runs here, as `exo` picks it",
    )
    return p


def inventory_document(
    devices: tuple[DeviceSpec, ...], metrics: dict[str, DeviceMetrics]
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for d in devices:
        row = d.model_dump(mode="json")
        m = metrics.get(d.device_id)
        row["metrics"] = None if m is None else m.model_dump(mode="json")
        rows.append(row)
    return {"hostname": socket.gethostname(), "devices": rows}


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f}"


def _figure(f: PerfFigure, units: tuple[tuple[float, str], ...]) -> str:
    if f.source == "unknown":
        return "? (unknown)"
    scale, unit = next(((s, u) for s, u in units if f.value >= s), units[-1])
    return f"{f.value / scale:,.1f} {unit} ({f.source})"


_BANDWIDTH_UNITS = ((1e12, "TB/s"), (1e9, "GB/s"), (1e6, "MB/s"))
_COMPUTE_UNITS = ((1e12, "TFLOPS"), (1e9, "GFLOPS"), (1e6, "MFLOPS"))


def render_table(devices: tuple[DeviceSpec, ...], metrics: dict[str, DeviceMetrics]) -> str:
    header = ("DEVICE", "KIND", "NAME", "MEM GiB", "FREE GiB", "BANDWIDTH", "COMPUTE", "STATUS")
    rows: list[tuple[str, ...]] = [header]
    for d in devices:
        m = metrics.get(d.device_id)
        rows.append(
            (
                d.device_id,
                d.kind,
                d.name,
                _gib(d.memory_total_bytes),
                "-" if m is None else _gib(m.memory_free_bytes),
                _figure(d.memory_bandwidth, _BANDWIDTH_UNITS),
                _figure(d.compute, _COMPUTE_UNITS),
                "-" if m is None else m.status,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    sources = [
        f"  {d.device_id} bandwidth: {d.memory_bandwidth.detail or '-'}; compute: {d.compute.detail or '-'}"
        for d in devices
    ]
    return "\n".join([*lines, "", "sources:", *sources])


def devices_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    inventory = Inventory(
        default_sources(),
        EngineBenchmark(args.engine or this_machines_engine()),
        profile=args.profile,
    )
    try:
        devices = inventory.probe()
        metrics = inventory.sample()
    finally:
        inventory.close()
    if args.json:
        json.dump(inventory_document(devices, metrics), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_table(devices, metrics))
    return 0
