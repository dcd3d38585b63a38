"""A typed, linear-only face on OR-Tools CP-SAT: variables are integer ids, terms are (coef, id)."""
# pyright: basic
# (basic: ortools' Python layer is only partly typed; everything outside this file stays strict)

import time
from collections.abc import Sequence
from typing import Literal

from ortools.sat.python import cp_model

from exo.shared.types.base import Frozen

Terms = Sequence[tuple[int, int]]
SolveStatus = Literal["optimal", "feasible", "infeasible", "unknown"]


class Solution(Frozen):
    status: SolveStatus
    # Indexed by variable id; empty unless a solution was found.
    values: tuple[int, ...]
    objective: int | None
    bound: int | None
    wall_s: float


class LinearModel:
    """Builds one CP-SAT model; mutable while building, then solved (possibly more than once)."""

    def __init__(self) -> None:
        self._model = cp_model.CpModel()
        self._vars: list[cp_model.IntVar] = []

    def new_bool(self, name: str) -> int:
        self._vars.append(self._model.new_bool_var(name))
        return len(self._vars) - 1

    def new_int(self, lo: int, hi: int, name: str) -> int:
        self._vars.append(self._model.new_int_var(lo, hi, name))
        return len(self._vars) - 1

    def _expr(self, terms: Terms) -> cp_model.LinearExprT:
        return cp_model.LinearExpr.weighted_sum(
            [self._vars[v] for _, v in terms], [c for c, _ in terms]
        )

    def add_le(self, terms: Terms, rhs: int) -> None:
        self._model.add(self._expr(terms) <= rhs)

    def add_ge(self, terms: Terms, rhs: int) -> None:
        self._model.add(self._expr(terms) >= rhs)

    def add_eq(self, terms: Terms, rhs: int) -> None:
        self._model.add(self._expr(terms) == rhs)

    def add_circuit(self, arcs: Sequence[tuple[int, int, int]]) -> None:
        """A single cycle through circuit node 0; a true self-loop arc leaves its node out."""
        self._model.add_circuit([(a, b, self._vars[v]) for a, b, v in arcs])

    def minimize(self, terms: Terms) -> None:
        self._model.minimize(self._expr(terms))

    def hint(self, values: dict[int, int]) -> None:
        self._model.clear_hints()
        for v, value in values.items():
            self._model.add_hint(self._vars[v], value)

    def solve(self, time_limit_s: float, num_workers: int, presolve: bool = True) -> Solution:
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = time_limit_s
        solver.parameters.num_workers = num_workers
        solver.parameters.cp_model_presolve = presolve
        started = time.perf_counter()
        code = solver.solve(self._model)
        wall = time.perf_counter() - started
        names: dict[object, SolveStatus] = {
            cp_model.OPTIMAL: "optimal",
            cp_model.FEASIBLE: "feasible",
            cp_model.INFEASIBLE: "infeasible",
        }
        status = names.get(code, "unknown")
        if status not in ("optimal", "feasible"):
            return Solution(status=status, values=(), objective=None, bound=None, wall_s=wall)
        return Solution(
            status=status,
            values=tuple(int(solver.value(v)) for v in self._vars),
            objective=round(solver.objective_value),
            bound=round(solver.best_objective_bound),
            wall_s=wall,
        )
