"""The placement preview: the solver's best per objective and the memory-proportional
baseline, for the cluster as this node's state describes it."""

from exo.master.solver.place import preview
from exo.shared.topology_from_state import cluster_view
from exo.shared.types.models import ModelCard
from exo.shared.types.placement import PlacementPreview, PlacementRequest
from exo.shared.types.state import State


def preview_for_state(card: ModelCard, state: State, context: int | None) -> PlacementPreview:
    request = PlacementRequest() if context is None else PlacementRequest(context_length=context)
    return preview(card, cluster_view(state), request)
