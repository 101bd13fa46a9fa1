"""FLoRA-NA: the server fits coefficients p, q so that (sum p_u B_u)(sum q_u A_u) is the
least-squares best such product to the mean of the products."""

from fedlora_jax import aggregation
from fedlora_jax.methods.base import Aggregate, Method, register_method


class FLoRANA(Method):
    def __init__(self, **solver):
        self.solver = solver

    def aggregate(self, b, a, w, round_index, key):
        return Aggregate(*aggregation.flora_na(b, a, w, **self.solver))


@register_method("flora_na")
def flora_na(tol: float | None = None, max_iter: int | None = None, ridge: float | None = None) -> Method:
    """Solver options of :func:`fedlora_jax.aggregation.flora_na` (its defaults when unset)."""
    solver = {k: v for k, v in (("tol", tol), ("max_iter", max_iter), ("ridge", ridge)) if v is not None}
    return FLoRANA(**solver)
