"""FRA-LoRA: the rank-r truncated SVD of the full-rank mean of the products; and its hybrid that
runs FRA for ``switch_round`` rounds, then freezes the last A (FFA)."""

import jax.numpy as jnp

from fedlora_jax import aggregation
from fedlora_jax.methods.base import Aggregate, Method, register_method


class FRA(Method):
    def __init__(self, rank: int, split: str):
        self.rank, self.split = rank, split

    def aggregate(self, b, a, w, round_index, key):
        return Aggregate(*aggregation.fra(b, a, w, self.rank, self.split))


class FRAThenFFA(Method):
    def __init__(self, rank: int, switch_round: int):
        self.rank, self.switch_round = rank, switch_round

    def trains(self, round_index):
        return (jnp.where(jnp.asarray(round_index) < self.switch_round, 1.0, 0.0), 1.0)

    def uploads(self, round_index):
        return (round_index < self.switch_round, True)

    def downloads(self, round_index):
        # the last FRA round still sends its A down: it is the A clients freeze
        return (round_index < self.switch_round, True)

    def aggregate(self, b, a, w, round_index, key):
        return Aggregate(*aggregation.fra_then_ffa(b, a, w, round_index, self.switch_round, self.rank))


@register_method("fra")
def fra(rank: int, split: str = "balanced") -> Method:
    """``split``: how the singular values are shared between B and A (balanced: sqrt each; left: all on B)."""
    if split not in ("balanced", "left"):
        raise ValueError(f"method 'fra': option split must be balanced or left, got {split!r}")
    return FRA(rank, split)


@register_method("fra_then_ffa")
def fra_then_ffa(rank: int, switch_round: int) -> Method:
    """FRA for rounds < ``switch_round``, then FFA with the last aggregated A."""
    if not isinstance(switch_round, int) or isinstance(switch_round, bool) or switch_round < 1:
        raise ValueError(f"method 'fra_then_ffa' needs option switch_round, an int >= 1, got {switch_round!r}")
    return FRAThenFFA(rank, switch_round)
