import os

# One BLAS thread: small QR/SVD calls are much faster without OpenBLAS threads fighting XLA's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

# One CPU device for the in-process tests, whichever test first starts JAX (`federation.cpu_devices:
# auto` would otherwise split the cores of the first experiment's process); tests of several
# devices run in subprocesses.
jax.config.update("jax_num_cpu_devices", 1)
