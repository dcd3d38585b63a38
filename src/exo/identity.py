"""Persistent node identity: generated once, kept under the data directory."""

import os
import uuid
from pathlib import Path

from exo.shared.types.ids import NodeId


def load_or_create_node_id(data_dir: Path) -> NodeId:
    path = data_dir / "node_id"
    if path.exists():
        text = path.read_text().strip()
        if text:
            return NodeId(text)
    data_dir.mkdir(parents=True, exist_ok=True)
    node_id = NodeId(f"node-{uuid.uuid4().hex[:16]}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return node_id
