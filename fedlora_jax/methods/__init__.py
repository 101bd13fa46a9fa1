"""Federated LoRA methods as the engine sees them: what clients train, what travels, what the
server keeps and how it aggregates.

The math lives in :mod:`fedlora_jax.aggregation` as pure functions on stacked factors
(B [U, d_out, r], A [U, r, d_in], w [U]); each method is one file here with a
:class:`~fedlora_jax.methods.base.Method` subclass and its registered factory. A method defined
outside the package is named in a config as ``package.module:factory`` (docs/methods.md).

| method       | clients train      | upload   | server                                   | download          |
|--------------|--------------------|----------|------------------------------------------|-------------------|
| fedit        | A, B               | A, B     | means of A and of B                      | A, B              |
| ffa          | B (A frozen)       | B        | mean of B                                | B                 |
| fra          | A, B               | A, B     | rank-r truncated SVD of mean(B A)        | A, B              |
| fra_then_ffa | A, B, then B       | as used  | fra for ``switch_round`` rounds, then ffa | as used           |
| flora_na     | A, B               | A, B     | coefficient fit (sum p B)(sum q A) ~ M   | A, B              |
| fedex        | A, B               | A, B     | means + residual folded into the base    | A, B, base weight |
| flora        | A, B (fresh/round) | A, B     | stacked product merged into the base     | stacked factors   |
| fedsa        | A, B (B stays)     | A        | mean of A; each client keeps its B       | A                 |
| rolora       | B even, A odd      | trained  | mean of the trained factor               | trained factor    |
"""

from fedlora_jax.methods.base import (Aggregate, LoraBytes, Method, ServerUpdate, make_method, method_names,
                                      options_for, register_method, streaming_methods)
from fedlora_jax.methods import fedit, ffa, fra, flora_na, fedex, flora, fedsa, rolora  # noqa: F401 (registers them)

__all__ = ["Aggregate", "LoraBytes", "Method", "ServerUpdate", "make_method", "method_names", "options_for",
           "register_method", "streaming_methods"]
