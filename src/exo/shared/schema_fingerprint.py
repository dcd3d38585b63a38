"""A fingerprint of the messages a peer parses: two builds of exo whose messages differ in
any field cannot share a cluster, and should say so in one line instead of failing on
every frame.

Every model forbids unknown fields (`extra="forbid"`), so a field one build adds is a
malformed message to the other, and an event one node could not parse would leave its
replicated log behind everyone else's. The fingerprint is the SHA-256 of the types' JSON
schemas with the prose taken out (titles, descriptions: docs are no protocol), so it moves
with any change to a field, a type, a constraint or a default, and with nothing else."""

import hashlib
import json
from typing import Any, cast

from pydantic import TypeAdapter

_PROSE = frozenset({"title", "description"})


def _without_prose(node: object) -> object:
    if isinstance(node, dict):
        items = cast(dict[str, object], node)
        return {
            k: _without_prose(v)
            for k, v in items.items()
            if not (k in _PROSE and isinstance(v, str))  # a field may be called "title"
        }
    if isinstance(node, list):
        return [_without_prose(v) for v in cast(list[object], node)]
    return node


def fingerprint(*types: Any) -> str:
    """16 hex digits naming the wire shape of `types` (models, unions, any pydantic type)."""
    schemas = [TypeAdapter[Any](t).json_schema(mode="validation") for t in types]
    text = json.dumps(_without_prose(schemas), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
