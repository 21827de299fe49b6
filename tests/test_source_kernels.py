"""Kernels given as C source (_tinygrad/source.py): run, split between threads, captured by a JIT."""
import numpy as np
import pytest
from tinygrad import Tensor

from tinyclip._tinygrad import jit, source

pytestmark = pytest.mark.skipif(not source.compiles_c("CPU"), reason="the CPU device does not compile C here")

ADD = """void tcc_test_add(float* restrict out, const float* restrict a, const float* restrict b, int core_id) {
  for (int i = core_id * 8; i < core_id * 8 + 8; i++) out[i] = a[i] + 2.0f * b[i];
}"""


def test_c_kernel_runs_each_thread_part_and_replays_in_a_jit():
    a = np.arange(16, dtype=np.float32)
    b = np.linspace(-1, 1, 16, dtype=np.float32)
    tb = Tensor(b, device="CPU").realize()
    out = source.run_c("tcc_test_add", ADD, 16, [Tensor(a, device="CPU").realize(), tb], threads=2).numpy()
    np.testing.assert_array_equal(out, a + 2 * b)

    graph = jit.new_jit(lambda x, y: (source.run_c("tcc_test_add", ADD, 16, [x, y], threads=2) * 3).realize())
    for shift in (0.0, 5.0, -2.5):
        x = a + shift
        np.testing.assert_array_equal(graph(Tensor(x, device="CPU").realize(), tb).numpy(), (x + 2 * b) * 3)
    assert jit.captured_graph(graph) is not None
