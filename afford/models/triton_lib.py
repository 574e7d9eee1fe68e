"""Triton where it is installed (every CUDA build of torch brings it), None elsewhere: afford's kernels
(attention/triton_paged.py, models/triton_int8.py, triton_int4.py, triton_ops.py) import it from here and
define themselves only when it is there; the CPU runs torch."""
try:
    import triton
    import triton.language as tl
except ImportError:                     # CPU-only installs
    triton = tl = None


def available() -> bool:
    return triton is not None
