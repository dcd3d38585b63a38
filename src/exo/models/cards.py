"""The models exo knows, described without loading or converting them."""

from exo.models.builtin import BUILTIN_PACKAGE
from exo.shared.types.ids import ModelId
from exo.shared.types.models import ModelCard
from exo.shared.types.state import State

BUILTIN_MODEL_ID = ModelId("smollm2-135m-instruct")
BUILTIN_SOURCE = f"pypi:{BUILTIN_PACKAGE}"

_SMOLLM2_N_KV_HEADS = 3
_SMOLLM2_HEAD_DIM = 64

# Byte figures are those of the converted safetensors (test_model_store checks them):
# a layer is its 4-bit projections with f16 scales and biases plus two f32 norms; the
# non-layer part is the 8-bit tied embedding with its scales and biases plus the final norm.
SMOLLM2_135M_INSTRUCT = ModelCard(
    model_id=BUILTIN_MODEL_ID,
    display_name="SmolLM2 135M Instruct",
    architecture="llama",
    n_layers=30,
    hidden_size=576,
    vocab_size=49152,
    context_length=8192,
    dtype="q4_affine_g32",
    bytes_per_layer=2_216_448,
    bytes_non_layer=31_852_800,
    # Keys and values, float16.
    kv_bytes_per_token_per_layer=2 * _SMOLLM2_N_KV_HEADS * _SMOLLM2_HEAD_DIM * 2,
    kv_dtype="float16",
    source=BUILTIN_SOURCE,
)

KNOWN_CARDS: dict[ModelId, ModelCard] = {SMOLLM2_135M_INSTRUCT.model_id: SMOLLM2_135M_INSTRUCT}


class UnknownModelError(LookupError):
    """A model id that no card describes."""

    def __init__(self, model_id: str) -> None:
        known = ", ".join(sorted(KNOWN_CARDS))
        super().__init__(f"unknown model {model_id!r}; known models: {known}")
        self.model_id = model_id


def card_for(model_id: str) -> ModelCard:
    card = KNOWN_CARDS.get(ModelId(model_id))
    if card is None:
        raise UnknownModelError(model_id)
    return card


def card_in(state: State, model_id: ModelId) -> ModelCard | None:
    """A model's card: built in, or added to the cluster from the hub."""
    return KNOWN_CARDS.get(model_id) or state.models.get(model_id)


def cards_in(state: State) -> list[ModelCard]:
    added = [card for model_id, card in state.models.items() if model_id not in KNOWN_CARDS]
    return [*KNOWN_CARDS.values(), *added]
