import os

# One BLAS thread: small QR/SVD calls are much faster without OpenBLAS threads fighting XLA's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
