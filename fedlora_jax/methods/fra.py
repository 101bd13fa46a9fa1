"""FRA-LoRA: the rank-r truncated SVD of the full-rank mean of the products; and its hybrid that
runs FRA for ``switch_round`` rounds, then freezes the last A (FFA).

Both stream: the SVD needs only the ideal update M = sum w B A, which the engine sums chunk by
chunk (a dense SVD of M then; the stacked round factorises the stacked factors instead)."""

import jax
import jax.numpy as jnp

from fedlora_jax import aggregation
from fedlora_jax.aggregation.fra import hybrid_phase
from fedlora_jax.methods.base import Aggregate, Method, register_method


class FRA(Method):
    streaming = True

    def __init__(self, rank: int, split: str):
        self.rank, self.split = rank, split


    def summarise(self, b, a, w):
        return ()  # the ideal update M is all the SVD needs

    def finalise(self, summary, ideal, b_before, a_before, round_index, key):
        b, a = aggregation.fra_from_update(ideal, self.rank, self.split)
        return Aggregate(b.astype(b_before.dtype), a.astype(a_before.dtype))


class FRAThenFFA(Method):
    streaming = True

    def __init__(self, rank: int, switch_round: int):
        self.rank, self.switch_round = rank, switch_round

    def trains(self, round_index):
        return (jnp.where(jnp.asarray(round_index) < self.switch_round, 1.0, 0.0), 1.0)

    def uploads(self, round_index):
        return (round_index < self.switch_round, True)

    def downloads(self, round_index):
        # the last FRA round still sends its A down: it is the A clients freeze
        return (round_index < self.switch_round, True)


    def summarise(self, b, a, w):
        return aggregation.weighted_mean(b, w)  # B's mean, for the FFA rounds

    def finalise(self, summary, ideal, b_before, a_before, round_index, key):
        """FRA (balanced, then left in the last FRA round) from M; in FFA rounds B's mean and
        the frozen A the clients started from."""
        cast = lambda b, a: (b.astype(b_before.dtype), a.astype(a_before.dtype))
        branches = (lambda: cast(*aggregation.fra_from_update(ideal, self.rank, "balanced")),
                    lambda: cast(*aggregation.fra_from_update(ideal, self.rank, "left")),
                    lambda: cast(summary, a_before))
        return Aggregate(*jax.lax.switch(hybrid_phase(round_index, self.switch_round), branches))


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
