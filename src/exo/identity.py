"""Persistent node identity: generated once, kept under the data directory.

Two nodes must never share an id, yet copying a data directory (a VM image, `rsync` of
`~/.local/share/exo`, one `EXO_HOME` reused for a second node) copies the id. So the id
is bound to where it was created: `node_id.binding` beside `node_id` holds a fingerprint
of the machine and the data directory's absolute path. A directory whose binding names
another machine or another path is refused with `IdentityError`, whose message says how
to fix it. (The mesh also refuses a peer that presents this node's own id, which catches
copies the binding cannot see, such as two containers with the same machine id.)
"""

import hashlib
import json
import os
import platform
import socket
import subprocess
import uuid
from pathlib import Path

from exo.shared.types.ids import NodeId

ID_FILE = "node_id"
BINDING_FILE = "node_id.binding"
MACHINE_ID_ENV = "EXO_MACHINE_ID"


class IdentityError(RuntimeError):
    """The data directory's identity belongs elsewhere; `str(e)` is the operator's message."""


def machine_fingerprint() -> str:
    """A stable, hashed identifier of this machine (the raw id is never stored).

    Sources, first found wins: `$EXO_MACHINE_ID` (for containers whose machine id is not
    stable or not unique), /etc/machine-id, /var/lib/dbus/machine-id, the macOS
    IOPlatformUUID, the hardware MAC address, the host name.
    """
    raw = os.environ.get(MACHINE_ID_ENV, "").strip() or _machine_id()
    return hashlib.sha256(f"exo-node-identity|{raw}".encode()).hexdigest()[:32]


def _machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text:
            return f"machine-id:{text}"
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout
            for line in out.splitlines():
                if "IOPlatformUUID" in line:
                    return f"platform-uuid:{line.split('=')[-1].strip().strip(chr(34))}"
        except (OSError, subprocess.SubprocessError):
            pass
    mac = uuid.getnode()
    if not mac & (1 << 40):  # the multicast bit is set when uuid made a random one up
        return f"mac:{mac:012x}"
    return f"hostname:{socket.gethostname()}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _binding(node_id: NodeId, data_dir: Path) -> dict[str, str]:
    return {
        "node_id": node_id,
        "machine": machine_fingerprint(),
        "path": str(data_dir.resolve()),
        "host": socket.gethostname(),
    }


def load_or_create_node_id(data_dir: Path, *, adopt: bool = False) -> NodeId:
    """This node's id, created on first start and bound to this machine and directory.

    `adopt=True` re-binds an existing id to the current machine and path: for a data
    directory that was *moved* (the original is gone), never for a copy.
    Raises `IdentityError` for a copied or moved directory (see the message).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    id_path = data_dir / ID_FILE
    binding_path = data_dir / BINDING_FILE
    text = id_path.read_text().strip() if id_path.exists() else ""
    if not text:
        node_id = NodeId(f"node-{uuid.uuid4().hex[:16]}")
        _write_atomic(binding_path, json.dumps(_binding(node_id, data_dir), indent=2) + "\n")
        _write_atomic(id_path, node_id + "\n")
        return node_id
    node_id = NodeId(text)
    current = _binding(node_id, data_dir)
    try:
        stored_obj: object = json.loads(binding_path.read_text())
    except FileNotFoundError:
        stored_obj = None  # written by a version without bindings: bind it now
    except (OSError, ValueError) as e:
        raise IdentityError(
            f"exo: cannot read {binding_path} ({e}). It records where node {node_id} was "
            f"created. If this directory has not been copied from another node, delete "
            f"{binding_path} and start again (it is re-created)."
        ) from None
    stored: dict[str, object] = (
        {str(k): v for k, v in stored_obj.items()}  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
        if isinstance(stored_obj, dict)
        else {}
    )
    if stored_obj is None or adopt:
        _write_atomic(binding_path, json.dumps(current, indent=2) + "\n")
        return node_id
    same_id = stored.get("node_id") == node_id
    same_machine = stored.get("machine") == current["machine"]
    same_path = stored.get("path") == current["path"]
    if same_id and same_machine and same_path:
        return node_id
    if not same_id:
        what = (
            f"{id_path} says {node_id} but {binding_path} was written for {stored.get('node_id')!r}"
        )
    elif not same_machine:
        what = (
            f"it was created on another machine (host {stored.get('host')!r}, "
            f"path {stored.get('path')!r}); this is {current['host']!r}"
        )
    else:
        what = f"it was created at {stored.get('path')!r}, not here"
    raise IdentityError(
        f"exo: refusing to start: the data directory {data_dir} holds the identity of node "
        f"{node_id}, but {what}. A copied data directory would give two nodes the same id.\n"
        f"  - New node made from a copy: delete {data_dir} (or at least {id_path.name}, "
        f"{binding_path.name} and the event log in it); this node then gets a fresh id and "
        f"syncs the cluster's state. Downloaded models live in the cache directory and are kept.\n"
        f"  - Same node, moved here on purpose (the original no longer runs): delete "
        f"{binding_path} to keep the id {node_id}.\n"
        f"  - Container whose machine id changes on every start: set {MACHINE_ID_ENV} to a "
        f"stable value unique to this node."
    )
