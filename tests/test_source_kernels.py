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


def test_the_c_linear_equals_the_uop_linear_bit_for_bit(monkeypatch):
    """kernels/cpu/csource.py's linear computes each output as the UOp kernel does (same sum, same order):
    every tile size, both loop orders, one and two threads, bias and residual."""
    import dataclasses
    from tinyclip.kernels.cpu import isa as isas, matmul
    from tinyclip.kernels.cpu.machine import Machine
    isa = isas.choose()[0]
    if isa is None:
        pytest.skip("no tiled CPU kernels on this CPU")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((37, 48), dtype=np.float32)
    w = rng.standard_normal((4 * isa.lanes, 48), dtype=np.float32)
    b = rng.standard_normal(4 * isa.lanes, dtype=np.float32)
    r = rng.standard_normal((37, 4 * isa.lanes), dtype=np.float32)
    panels = matmul.to_panels(Tensor(w, device="CPU"), 2 * isa.lanes).realize()
    base = Machine(isa, 32768, 1 << 20, threads=2, tile_rows=4, rows_outer=False, handoff_us=0.0, macs_per_us=1.0)
    for rows in isa.tile_rows:
        for outer, l2 in ((False, 1 << 20), (True, 1024)):
            m = dataclasses.replace(base, tile_rows=rows, rows_outer=outer, l2=l2)
            got = {}
            for c in (True, False):
                monkeypatch.setattr(source, "compiles_c", lambda device, c=c: c)
                got[c] = matmul.panel_linear(Tensor(x, device="CPU"), panels, Tensor(b, device="CPU"), None,
                                             Tensor(r, device="CPU"), m).numpy()
            np.testing.assert_array_equal(got[True], got[False], err_msg=f"{rows} rows, rows outer {outer}")


def test_a_captures_c_programs_are_compiled_together(monkeypatch):
    """The C programs of one capture go to clang in one run per core, not one run each; tinygrad then
    finds them compiled, and they compute what they say."""
    import subprocess
    runs = []
    real = subprocess.Popen

    class Counting(real):
        def __init__(self, args, **kw):
            runs.append(args)
            super().__init__(args, **kw)

    monkeypatch.setattr(subprocess, "Popen", Counting)
    a = np.arange(16, dtype=np.float32)
    kernels = [ADD.replace("tcc_test_add", f"tcc_test_add{i}").replace("2.0f", f"{i + 3}.0f") for i in range(6)]
    x, y = Tensor(a, device="CPU").realize(), Tensor(a * 0 + 1, device="CPU").realize()
    graph = jit.new_jit(lambda x, y: Tensor.stack(*[source.run_c(f"tcc_test_add{i}", k, 16, [x, y], threads=2)
                                                    for i, k in enumerate(kernels)]).realize())
    out = graph(x, y).numpy()
    np.testing.assert_array_equal(out, np.stack([a + i + 3 for i in range(6)]))
    batched = [args for args in runs if any(str(part).endswith(".c") for part in args)]
    assert batched and sum(sum(str(p).endswith(".c") for p in args) for args in batched) == 6
    assert len(batched) <= 2   # one run per core (a 2-core machine: two)


def test_queued_c_programs_start_compiling_before_tinygrad_schedules(monkeypatch):
    """run_c queues its source; start_compiles (source.realize calls it) starts clang on them at once,
    and the realize that follows compiles nothing more."""
    import subprocess
    runs = []
    real = subprocess.Popen
    source.start_compiles()     # whatever an earlier test left queued

    class Counting(real):
        def __init__(self, args, **kw):
            runs.append(args)
            super().__init__(args, **kw)

    monkeypatch.setattr(subprocess, "Popen", Counting)

    def c_runs():
        return sum(sum(str(p).endswith(".c") for p in args) for args in runs)

    a = np.arange(16, dtype=np.float32)
    kernels = [ADD.replace("tcc_test_add", f"tcc_early_add{i}").replace("2.0f", f"{i + 11}.0f") for i in range(3)]
    x, y = Tensor(a, device="CPU").realize(), Tensor(a * 0 + 1, device="CPU").realize()
    out = Tensor.stack(*[source.run_c(f"tcc_early_add{i}", k, 16, [x, y], threads=2) for i, k in enumerate(kernels)])
    assert c_runs() == 0
    source.start_compiles()
    assert c_runs() == 3
    np.testing.assert_array_equal(source.realize(out).numpy(), np.stack([a + i + 11 for i in range(3)]))
    assert c_runs() == 3
