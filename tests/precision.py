"""Error bounds for tests of low-precision arithmetic: hold results to the exact answer, not to each other.

A computed dot product of n terms a_i * b_i, each operand exactly representable, differs from the
exact sum by at most (rounding steps) * u * sum_i |a_i| |b_i|, where u is the format's unit round-off.
Accumulation may happen in the low precision itself (oneDNN and Eigen emulate bfloat16 on CPUs
without native support): pairwise or blocked summation then takes about log2(n) rounding steps, plus
one for the final rounding of the result. Every test of bfloat16, float16 or float32 kernels uses
the same rule, so that the test means the same on every CPU (AMX, AVX512_BF16, AVX2 only).
"""

import numpy as np
import tensorflow as tf

UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}


def round_to(array, dtype):
    """`array` rounded to `dtype` ("bfloat16", "float16", "float32"), returned as float64."""
    return tf.cast(tf.cast(np.asarray(array), dtype), tf.float64).numpy()


def rounding_error_bound(reduction_length, dtype):
    """Relative bound (times sum |a_i| |b_i|) on a dot product of `reduction_length` terms in `dtype`."""
    return (np.ceil(np.log2(max(reduction_length, 2))) + 1) * UNIT_ROUNDOFF[dtype]


def assert_within_rounding(computed, exact, magnitude, reduction_length, dtype, name):
    """Asserts |computed - exact| <= bound * magnitude elementwise, naming the worst element if not.

    `magnitude` is the same computation on absolute values (sum |a_i| |b_i| for a dot product).
    """
    computed, exact, magnitude = (np.asarray(a, np.float64) for a in (computed, exact, magnitude))
    error = np.abs(computed - exact)
    bound = rounding_error_bound(reduction_length, dtype) * magnitude
    if np.all(error <= bound):
        return
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    raise AssertionError(
        f"{name} at {tuple(int(i) for i in worst)}: {computed[worst]} vs exact {exact[worst]}, "
        f"error {error[worst]:.3g} > {dtype} bound {bound[worst]:.3g} (reduction length {reduction_length})"
    )
