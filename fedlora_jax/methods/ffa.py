"""FFA-LoRA: A stays frozen at its shared initialisation; clients train and upload B, the server
averages it. mean(B) A is the exact mean of the products."""

from fedlora_jax import aggregation
from fedlora_jax.methods.base import Aggregate, Method, register_method


class FFA(Method):
    mean_based = True
    streaming = True

    def trains(self, round_index):
        return (0.0, 1.0)

    def uploads(self, round_index):
        return (False, True)

    def downloads(self, round_index):
        return (False, True)


    def summarise(self, b, a, w):
        return aggregation.weighted_mean(b, w)

    def finalise(self, summary, ideal, b_before, a_before, round_index, key):
        return Aggregate(summary.astype(b_before.dtype), a_before)  # A is frozen: the one every client had


@register_method("ffa")
def ffa() -> Method:
    return FFA()
