"""A branch-free exp2 for the CPU kernels' quick_gelu (after fc1) and the softmax."""
from __future__ import annotations

import math

from ..._tinygrad.kernel import dtypes

# 2**f for f in [-1/2, 1/2]: the Taylor series of exp(f ln 2) to f**7 (relative error < 1e-8).
EXP2_TAYLOR = tuple(math.log(2) ** k / math.factorial(k) for k in range(8))


def quick_gelu(x):
    """x * sigmoid(1.702 x), CLIP's activation, for matmul.activation's kernel (x a UOp there).

    tinygrad's own exp2 rounds with a select on the sign of its argument, which clang compiles
    to a branch once vectorized: with signs at random it mispredicts half the time (about 9 ns a
    value against 1.3). Here exp(-1.702 x) = 2**t, t clamped to [-126, 126] (beyond, sigmoid is 0
    or 1 to float32 precision), is split as 2**n * 2**f with n = t rounded half up (truncating a
    positive number: no select) and f = t - n in [-1/2, 1/2], 2**f by EXP2_TAYLOR and 2**n built
    in the exponent bits."""
    return x / (1.0 + exp2((x * (-1.702 / math.log(2))).maximum(-126.0).minimum(126.0)))


def exp2(t):
    """2**t for t in [-126, 126] without a select (see quick_gelu)."""
    n = (t + 128.5).cast(dtypes.int32) - 128
    f = t - n.cast(dtypes.float32)
    p = EXP2_TAYLOR[-1]
    for c in reversed(EXP2_TAYLOR[:-1]):
        p = p * f + c
    return p * ((n + 127) << 23).bitcast(dtypes.float32)
