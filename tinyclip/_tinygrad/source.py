"""Kernels written as C source, compiled by the CPU device's clang and run as tinygrad programs.

tinygrad turns a custom kernel written in UOps into C through its rewrite passes, in Python: for an
unrolled matmul tile that took 1.2 s of CPU a kernel (ViT-B/32, AVX-512), most of a first run's wait,
against some 0.05 s for clang to compile the C it produces. A kernel given here as C source skips the
rewrites: tinygrad 0.14 accepts, as a custom kernel's body, a PROGRAM whose source is already there
(codegen/__init__.py, pm_to_program: a PROGRAM of (SINK, LINEAR, SOURCE) only goes to do_compile), and
schedules, compiles (through its compile cache), captures, pickles and runs it like its own kernels.

What such a program must carry (read by tinygrad where it builds the program's ELF signature and where
the CPU runtime calls it): the LINEAR holds one PARAM per buffer argument, in order; ProgramInfo names
the global buffer slots, which are written and which read, the launch size, and `core_id`, the ALU
variable by which a kernel split between threads learns its part (global_size[0] calls, core_id 0..n-1,
run on several cores by cpu_runtime's patch). The source defines one function named like the program:
`void name(float* restrict data0, const float* restrict data1, ..., int core_id)`.

Only where the device's renderer writes C for clang (tinygrad's CPU device, not CPU:LLVM, whose
compiler takes LLVM IR) can it compile such a program: `compiles_c(device)` says so.
"""
from __future__ import annotations

import sys

from tinygrad import Device, Tensor, dtypes
from tinygrad.renderer import Estimates
from tinygrad.uop.ops import AddrSpace, KernelInfo, Ops, ProgramInfo, UOp

__all__ = ["compiles_c", "run_c"]


def compiles_c(device: str) -> bool:
    """Whether `device` compiles C source with clang (tinygrad's CPU device with its Clang renderer), on
    a System V platform (the function signature above; Windows' CPU device calls through ms_abi)."""
    from tinygrad.renderer.cstyle import ClangRenderer
    if sys.platform == "win32":
        return False
    return type(Device[device].renderer) is ClangRenderer


def run_c(name: str, source: str, size: int, inputs: list[Tensor], threads: int = 1, flops: int = 0,
          dtype=dtypes.float32) -> Tensor:
    """A new tensor of `size` values of `dtype`, written by the C function `name` in `source`, called as
    name(out, *inputs[, core_id]) `threads` times (core_id 0..threads-1; no core_id argument for 1).
    `flops` is what the kernel computes, for tinygrad's statistics (DEBUG=2)."""
    device = inputs[0].device
    out = Tensor.empty(size, dtype=dtype, device=device)
    target = Device[device].renderer.target
    n = 1 + len(inputs)

    def program(*params: UOp) -> UOp:
        # core_id is the argument after the buffers (slot n), as tinygrad numbers its own THREAD kernels' core_id
        core = (UOp.param(n, dtypes.int, shape=(), vmin_vmax=(0, threads - 1), multiple_of=1, name="core_id",
                          addrspace=AddrSpace.ALU),) if threads > 1 else ()
        memory = sum(t.nbytes() for t in (out, *inputs))
        info = KernelInfo(name=name, estimates=Estimates(ops=flops, lds=memory, mem=memory))
        spec = ProgramInfo(name=name, global_size=(threads, 1, 1), local_size=(1, 1, 1), vars=core,
                           globals=tuple(range(n)), outs=(0,), ins=tuple(range(1, n)), target=target)
        return UOp(Ops.PROGRAM, src=(UOp.sink(*params, arg=info), UOp(Ops.LINEAR, src=params), UOp(Ops.SOURCE, arg=source)),
                   arg=spec)

    return out.custom_kernel(*inputs, fxn=program)[0]
