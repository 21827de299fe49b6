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

import atexit
import sys
import threading

from tinygrad import Device, Tensor, dtypes
from tinygrad.renderer import Estimates
from tinygrad.uop.ops import AddrSpace, KernelInfo, Ops, ProgramInfo, UOp

__all__ = ["compiles_c", "install", "realize", "run_c", "start_compiles"]


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
    _queue(device, source)
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


# ---- a capture's C programs compiled early, by one clang per core (tinygrad/engine/realize.py) ----------
# tinygrad compiles each program in its own clang process when it lowers a capture, after scheduling it:
# about 40 ms of CPU to start clang, more than most of these kernels take to compile (a linear layer's
# tile: 40 ms more), and the scheduling (0.4 s of Python for a ViT-B/32 tower) waits for nothing. Here
# each source run_c builds is queued; `realize` starts the queued sources compiling before tinygrad
# schedules, split between one clang process per core, each compiling its share of files in one run
# (one object per file, the flags tinygrad's ClangCompiler uses), so clang runs on the other cores while
# tinygrad schedules. Before tinygrad's lower_and_compile (looked up as a module global at each call)
# compiles a capture's kernels, its C programs are taken from those runs (waited for), or compiled the
# same way there and then, and put in tinygrad's program cache (to_program_cache) as tinygrad would
# have: the PROGRAM with its BINARY. tinygrad then finds them compiled. If clang fails, nothing is
# cached and tinygrad compiles them itself, one by one, reporting the error as it does.
_state_lock = threading.Lock()
_queued: dict[tuple, dict[str, None]] = {}     # clang command -> sources run_c built, not started yet
_started: dict[tuple[tuple, str], "_Batch"] = {}     # (command, source) -> the clang runs compiling it
_done: set[tuple[tuple, str]] = set()     # (command, source) in tinygrad's program cache: never started again
_folders: set[str] = set()                # the batches' folders not removed yet (at exit, they are)


def realize(t: Tensor) -> Tensor:
    """t.realize(), the C programs built for its graph compiling while tinygrad schedules it."""
    start_compiles()
    return t.realize()


def start_compiles() -> None:
    """Start compiling every queued source (see above); returns at once."""
    with _state_lock:
        queued = [(command, list(sources)) for command, sources in _queued.items()]
        _queued.clear()
        for command, sources in queued:
            sources = [code for code in sources if (command, code) not in _started and (command, code) not in _done]
            if sources:
                batch = _Batch(command, sources)
                _started.update({(command, code): batch for code in sources})


def _queue(device: str, code: str) -> None:
    with _state_lock:
        _queued.setdefault(_command(Device[device].renderer.compiler), {})[code] = None


def _command(compiler) -> tuple:
    """The clang command line that compiles C files to objects as tinygrad's ClangCompiler does."""
    from tinygrad.helpers import getenv
    return (getenv("CC", "clang"), "-c", "-x", "c", "-O2", "-fPIC", "-ffreestanding", "-fno-math-errno",
            "-nostdlib", "-fno-ident", f"--target={compiler.arch}-none-unknown-elf", *compiler.args)


class _Batch:
    """Sources compiled by one clang process per core, in a private temporary folder: started on creation,
    the objects read (and the folder removed) by the first `objects()`."""

    def __init__(self, command: tuple, sources: list[str]):
        import os
        import subprocess
        import tempfile
        self.sources, self._objects = sources, None
        self.folder = tempfile.mkdtemp(prefix="tinyclip-c-")
        _folders.add(self.folder)
        self.names = []
        for i, code in enumerate(sources):
            self.names.append(f"k{i}.c")
            with open(os.path.join(self.folder, self.names[-1]), "w") as f:
                f.write(code)
        cores = max(1, min(len(self.names), os.cpu_count() or 1))
        self.runs = [subprocess.Popen(list(command) + self.names[part::cores], cwd=self.folder,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for part in range(cores)]

    def objects(self) -> dict[str, bytes]:
        """source -> its object file's bytes; empty where a clang run failed."""
        import os
        import shutil
        if self._objects is None:
            ok = all(run.wait() == 0 for run in self.runs)
            self._objects = {}
            if ok:
                for code, name in zip(self.sources, self.names):
                    with open(os.path.join(self.folder, name[:-2] + ".o"), "rb") as f:
                        self._objects[code] = f.read()
            shutil.rmtree(self.folder, ignore_errors=True)
            _folders.discard(self.folder)
        return self._objects


@atexit.register
def _remove_folders() -> None:
    """The folders of batches never waited for (a capture that failed): removed at exit."""
    import shutil
    for folder in list(_folders):
        shutil.rmtree(folder, ignore_errors=True)


def install() -> None:
    """Compile each capture's C programs as above (once per process)."""
    from tinygrad.engine import realize as tinygrad_realize
    if getattr(tinygrad_realize.lower_and_compile, "tinyclip_batched", False):
        return
    tinygrad_lower = tinygrad_realize.lower_and_compile

    def lower_and_compile(linear):
        _compile_c_programs(linear)
        return tinygrad_lower(linear)

    lower_and_compile.tinyclip_batched = True
    tinygrad_realize.lower_and_compile = lower_and_compile


def _compile_c_programs(linear) -> None:
    from tinygrad.codegen import to_program_cache, to_program_key
    from tinygrad.engine import realize as tinygrad_realize
    from tinygrad.renderer.cstyle import ClangRenderer
    todo: dict = {}
    for c in linear.toposort():
        if c.op is not Ops.CALL or (a := tinygrad_realize._get_call_to_compile(c)) is None:
            continue
        ast, renderer = a
        if ast.op is Ops.PROGRAM and len(ast.src) == 3 and ast.src[2].op is Ops.SOURCE and type(renderer) is ClangRenderer:
            command = _command(renderer.compiler)
            if (key := to_program_key(ast, renderer)) not in to_program_cache:
                todo.setdefault(command, {})[key] = ast
            else:    # compiled before (by tinygrad, or here): not to be started again
                with _state_lock:
                    _queued.get(command, {}).pop(ast.src[2].arg, None)
                    _done.add((command, ast.src[2].arg))
    for command, programs in todo.items():
        with _state_lock:
            batches = {code: _started.pop((command, code), None) for code in (ast.src[2].arg for ast in programs.values())}
            for code in batches:
                _queued.get(command, {}).pop(code, None)
        missing = [code for code, batch in batches.items() if batch is None]
        if len(missing) >= 2:      # one alone is left to tinygrad: the same single clang run
            batches.update(dict.fromkeys(missing, _Batch(command, missing)))
        for key, ast in programs.items():
            batch = batches[ast.src[2].arg]
            if batch is not None and (binary := batch.objects().get(ast.src[2].arg)) is not None:
                to_program_cache[key] = ast.replace(src=ast.src + (UOp(Ops.BINARY, arg=binary),))
                _done.add((command, ast.src[2].arg))
