"""FedIT: clients train A and B; the server averages each factor (mean(B) mean(A), inexact)."""

from fedlora_jax import aggregation
from fedlora_jax.methods.base import Aggregate, Method, register_method


class FedIT(Method):
    mean_based = True

    def aggregate(self, b, a, w, round_index, key):
        return Aggregate(*aggregation.fedit(b, a, w))


@register_method("fedit")
def fedit() -> Method:
    return FedIT()
