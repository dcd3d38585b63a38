"""The message-schema fingerprint moves with the wire shape of a type and with nothing
else; the node's is deterministic (every node of one build computes the same)."""

import subprocess
import sys
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from exo.cluster.service import wire_schema_fingerprint
from exo.shared.schema_fingerprint import fingerprint


class Before(BaseModel):
    """What the older build sends."""

    kind: Literal["thing"] = "thing"
    count: int = Field(ge=0, description="how many")
    title: str  # a field called like the prose the fingerprint leaves out


class Redocumented(BaseModel):
    """The same message, documented anew: no protocol change."""

    kind: Literal["thing"] = "thing"
    count: int = Field(ge=0, title="Count", description="how many there are")
    title: str


def test_docs_do_not_move_the_fingerprint() -> None:
    assert fingerprint(Before) == fingerprint(Redocumented)


def test_fields_types_constraints_and_defaults_do() -> None:
    class Added(BaseModel):
        kind: Literal["thing"] = "thing"
        count: int = Field(ge=0)
        title: str
        extra: int | None = None

    class Retyped(BaseModel):
        kind: Literal["thing"] = "thing"
        count: float = Field(ge=0)
        title: str

    class Constrained(BaseModel):
        kind: Literal["thing"] = "thing"
        count: int = Field(ge=1)
        title: str

    class Defaulted(BaseModel):
        kind: Literal["thing"] = "thing"
        count: int = Field(default=0, ge=0)
        title: str

    class Unfielded(BaseModel):
        kind: Literal["thing"] = "thing"
        count: int = Field(ge=0)

    class Relabelled(BaseModel):
        kind: Literal["other"] = "other"
        count: int = Field(ge=0)
        title: str

    prints = {fingerprint(t) for t in (Before, Added, Retyped, Constrained, Defaulted)}
    prints |= {fingerprint(Unfielded), fingerprint(Relabelled)}
    assert len(prints) == 7


def test_unions_and_several_types_are_fingerprinted_whole() -> None:
    class Other(BaseModel):
        kind: Literal["other"] = "other"

    union = Annotated[Before | Other, Field(discriminator="kind")]
    assert fingerprint(union) != fingerprint(Before)
    assert fingerprint(Before, Other) != fingerprint(Other, Before)  # order is the wire's
    assert len(fingerprint(Before)) == 16


def test_every_process_of_one_build_computes_the_same_fingerprint() -> None:
    here = wire_schema_fingerprint()
    there = subprocess.run(
        [
            sys.executable,
            "-c",
            "from exo.cluster.service import wire_schema_fingerprint as f; print(f())",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout.strip()
    assert here == there
