"""Placement of model layers on heterogeneous devices: cost model, CP-SAT, heuristics."""

from exo.master.solver.place import baseline, place, preview

__all__ = ["baseline", "place", "preview"]
