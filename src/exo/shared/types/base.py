"""The one pydantic configuration every message and state type in exo uses."""

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Immutable, strict, closed: what crosses a process or the log must not drift."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")
