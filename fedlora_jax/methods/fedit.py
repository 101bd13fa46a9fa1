"""FedIT: clients train A and B; the server averages each factor (mean(B) mean(A), inexact)."""

from fedlora_jax import aggregation
from fedlora_jax.methods.base import Aggregate, Method, register_method


class FedIT(Method):
    mean_based = True
    streaming = True


    def summarise(self, b, a, w):
        return aggregation.weighted_mean(b, w), aggregation.weighted_mean(a, w)

    def finalise(self, summary, ideal, b_before, a_before, round_index, key):
        return Aggregate(summary[0].astype(b_before.dtype), summary[1].astype(a_before.dtype))


@register_method("fedit")
def fedit() -> Method:
    return FedIT()
