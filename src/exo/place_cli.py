"""`exo place`: solve a placement offline from JSON files and print it, with the baseline, as JSON."""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from exo.master.solver import baseline, place
from exo.shared.types.models import ModelCard
from exo.shared.types.placement import PlacementError, PlacementRequest
from exo.shared.types.topology import ClusterView


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="exo place",
        description="Place a model's layers on a cluster's devices (offline; see docs/placement.md).",
    )
    p.add_argument("--cluster", type=Path, required=True, help="CLUSTER.json: devices and links")
    p.add_argument("--model", type=Path, required=True, help="MODEL.json: the model card")
    p.add_argument("--objective", choices=["latency", "throughput"], default="latency")
    p.add_argument("--context", type=int, default=None, help="tokens of KV cache to reserve")
    p.add_argument("--time-limit", type=float, default=None, help="solver wall-clock limit (s)")
    p.add_argument("--request", type=Path, default=None, help="a full PlacementRequest as JSON")
    return p


def place_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        cluster = ClusterView.model_validate_json(Path(args.cluster).read_text())
        card = ModelCard.model_validate_json(Path(args.model).read_text())
        base_request = (
            PlacementRequest.model_validate_json(Path(args.request).read_text())
            if args.request is not None
            else PlacementRequest()
        )
        update: dict[str, Any] = {"objective": args.objective}
        if args.context is not None:
            update["context_length"] = args.context
        if args.time_limit is not None:
            update["time_limit_s"] = args.time_limit
        # Validate the merged request: model_copy(update=...) alone would skip validation.
        request = PlacementRequest.model_validate({**base_request.model_dump(), **update})
    except (OSError, ValidationError) as e:
        print(f"exo place: {e}", file=sys.stderr)
        return 2
    result = place(card, cluster, request)
    base = baseline(card, cluster, request)
    out: dict[str, Any] = {"baseline": None if base is None else base.model_dump(mode="json")}
    if isinstance(result, PlacementError):
        print(json.dumps({"error": result.model_dump(mode="json"), **out}, indent=2))
        return 1
    if base is not None:
        # Ours over the baseline in the request's objective: above 1 means faster.
        out["speedup_vs_baseline"] = base.objective_s() / result.objective_s()
    print(json.dumps({**result.model_dump(mode="json"), **out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(place_main(sys.argv[1:]))
