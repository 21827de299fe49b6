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

__all__ = ["compiles_c", "install", "run_c"]


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
    install()
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


# ---- a capture's C programs compiled by one clang per core (tinygrad/engine/realize.py) ------------------
# tinygrad compiles each program in its own clang process: about 40 ms of CPU to start clang, more than
# most of these kernels take to compile (a linear layer's tile: 40 ms more). Before tinygrad's
# lower_and_compile (looked up as a module global at each call) compiles a capture's kernels, the C
# programs among them that it has not compiled yet are compiled here, split between one clang process
# per core, each compiling its share of files in one run (one object per file, the flags tinygrad's
# ClangCompiler uses), and put in tinygrad's program cache (to_program_cache) as tinygrad would have:
# the PROGRAM with its BINARY. tinygrad then finds them compiled. If clang fails, nothing is cached and
# tinygrad compiles them itself, one by one, reporting the error as it does.
_batched = False


def install() -> None:
    """Compile each capture's C programs together (once per process)."""
    global _batched
    from tinygrad.engine import realize
    if _batched or getattr(realize.lower_and_compile, "tinyclip_batched", False):
        return
    tinygrad_lower = realize.lower_and_compile

    def lower_and_compile(linear):
        _compile_c_programs(linear)
        return tinygrad_lower(linear)

    lower_and_compile.tinyclip_batched = True
    realize.lower_and_compile = lower_and_compile
    _batched = True


def _compile_c_programs(linear) -> None:
    import os
    import subprocess
    import tempfile
    from tinygrad.codegen import to_program_cache, to_program_key
    from tinygrad.engine import realize
    from tinygrad.helpers import getenv
    from tinygrad.renderer.cstyle import ClangRenderer
    todo: dict = {}
    for c in linear.toposort():
        if c.op is not Ops.CALL or (a := realize._get_call_to_compile(c)) is None:
            continue
        ast, renderer = a
        if ast.op is Ops.PROGRAM and len(ast.src) == 3 and ast.src[2].op is Ops.SOURCE and type(renderer) is ClangRenderer:
            if (key := to_program_key(ast, renderer)) not in to_program_cache:
                todo.setdefault((renderer.compiler.arch, tuple(renderer.compiler.args)), {})[key] = (ast, renderer)
    for programs in todo.values():
        if len(programs) < 2:
            continue
        items = list(programs.items())
        compiler = items[0][1][1].compiler
        with tempfile.TemporaryDirectory(prefix="tinyclip-c-") as folder:
            names = []
            for i, (_, (ast, _)) in enumerate(items):
                names.append(f"k{i}.c")
                with open(os.path.join(folder, names[-1]), "w") as f:
                    f.write(ast.src[2].arg)
            cores = max(1, min(len(names), os.cpu_count() or 1))
            command = [getenv("CC", "clang"), "-c", "-x", "c", "-O2", "-fPIC", "-ffreestanding", "-fno-math-errno",
                       "-nostdlib", "-fno-ident", f"--target={compiler.arch}-none-unknown-elf", *compiler.args]
            runs = [subprocess.Popen(command + names[part::cores], cwd=folder, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL) for part in range(cores)]
            if any(run.wait() != 0 for run in runs):
                continue
            for (key, (ast, _)), name in zip(items, names):
                with open(os.path.join(folder, name[:-2] + ".o"), "rb") as f:
                    to_program_cache[key] = ast.replace(src=ast.src + (UOp(Ops.BINARY, arg=f.read()),))
