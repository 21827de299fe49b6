"""tinyclip's boundary with tinygrad: everything that touches tinygrad beyond plain Tensor operations.

tinygrad moves fast (setup.cfg pins the tested range); what tinyclip relies on of its internals is
wrapped here, split by concern, so an upgrade touches this package alone:

- device.py       dtype names, opening and probing devices, what a device compiles for, the kernel cache
- buffers.py      numpy arrays in and out of device buffers without the scheduler; staging (pinned on CUDA)
- jit.py          TinyJit capture and replay, BEAM settings
- compile_pool.py a capture's kernels compiled in forked workers (tinygrad's pool spawns them)
- graph_pickle.py a captured graph pickled without its weights, bound to a model on loading
- cpu_runtime.py  the CPU patches (wide vectors, threads on several cores), installed on first use
- opencl.py       OpenCL builds without clang's "1 warning generated." on stderr
- kernel.py       the custom-kernel API (UOp ranges, opts) tinyclip's hand-written kernels are built with
- source.py       kernels given as C source, compiled by clang and run as tinygrad programs (no codegen)

The names most of tinyclip uses are re-exported here, with LOCK: tinygrad's scheduler, its JIT, its Context
settings (DEV, ALLOW_TF32, BEAM) and tinyclip's swaps of its internals are process-wide, so every model's
device work (capture, run, copies) holds this one re-entrant lock: two models used from two threads take
turns, each call correct, none in parallel.
"""
import threading

LOCK = threading.RLock()
from .buffers import (NUMPY_DTYPES, Staging, as_float32, buffer_of, empty, from_numpy, gather_rows, host_array,
                      host_tensor, numpy_dtype, to_numpy, to_tensor)
from .device import (DTYPES, codegen, cpu_threads, device_families, dtype_named, guard_kernel_cache, open_device,
                     opencl_device_kind, probe_device, renderer_threads, supports_half, synchronize, tf32_context)
from .compile_pool import forked_compiles
from .source import realize
from .opencl import quiet_builds as quiet_opencl_builds
from .jit import beam_context, beam_progress, beam_setting, captured_graph, jit_error, jit_from_captured, new_jit

__all__ = ["LOCK", "NUMPY_DTYPES", "Staging", "as_float32", "buffer_of", "empty", "from_numpy", "gather_rows", "host_array", "host_tensor", "numpy_dtype",
           "to_numpy", "to_tensor", "DTYPES", "codegen", "cpu_threads", "device_families", "dtype_named",
           "guard_kernel_cache", "open_device", "opencl_device_kind", "probe_device", "renderer_threads",
           "supports_half", "synchronize", "tf32_context", "beam_context", "beam_progress", "beam_setting", "captured_graph", "jit_error",
           "jit_from_captured", "new_jit", "forked_compiles", "quiet_opencl_builds", "realize"]
