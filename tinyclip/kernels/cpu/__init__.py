"""tinyclip's CPU kernel set: hand-tiled float32 kernels for x86-64 with AVX2 or AVX-512.

matmul.py (the linear layers, on weights stored as panels), attention.py (score and value products,
softmax), norm.py (layer norm), exp.py (a branch-free exp2 for quick_gelu and the softmax). Their
tiles come from data: the instruction set (isa.py: lanes, registers, candidate tile rows), this
core's caches, and what tuning.py measures once on this machine (the fastest tile and loop order,
the thread hand-off, the matmul's speed). The cpu backends choose the instruction set (isa.choose,
TINYCLIP_CPU_ISA) and make a CPUKernels for it. Everything they cannot take (float16,
widths the tiles do not divide, an activation other than quick_gelu after a linear layer, a CPU without
AVX2, a tinygrad version the runtime patches were not written for) runs in the plain tinygrad set:
the same numbers to float32 rounding, slower.

With a linear dtype (load(dtype="bfloat16")), the linear layers run bf16.py's kernels instead, on a CPU
with AVX512_BF16; with int8, int8_set.py's set runs them in int8.py's VNNI kernels. The rest of the model
stays as above.
"""
from __future__ import annotations

import functools
import os

from tinygrad import Tensor, dtypes

from ... import cpu_info, pixels, pooling
from ..._tinygrad import cpu_runtime, source
from ...errors import BackendError
from ..activations import activation
from ..base import KernelSet
from . import attention, bf16, conv, exp, layout, matmul, norm, tuning
from .isa import ISA
from .machine import Machine


# How convolutions run: "im2col" onto the tiled matmul (conv.py), or "tinygrad"'s own conv. The
# faster is the default (README, "ResNet CLIPs"); the other stays selectable so that
# benchmarks/resnet_speed.py can measure both. Part of key(): graphs of the two are cached apart.
CONV = os.environ.get("TINYCLIP_CONV", "im2col")


# A graph of C-source kernels, as work it could have encoded instead (compile_costs)
C_COMPILE_TOKENS, C_COMPILE_IMAGES = 6_000, 60


class CPUKernels(KernelSet):
    """The CPU set for one instruction set. `cache_folder` keeps what tuning.py measures; None measures
    it again in each process. `c_source`: whether the device compiles C (clang; not the LLVM renderer),
    which the bfloat16 kernels are written in."""

    name = "cpu"

    def __init__(self, isa: ISA, device: str = "CPU", cache_folder=None, c_source: bool = True):
        self.isa, self.device, self.cache_folder, self.c_source = isa, device, cache_folder, c_source
        self._last = None     # (the last input's UOp, what was made of it, its UOp): see _once_per_input

    def key(self) -> dict:
        linear = {} if self.linear_dtype != "bfloat16" else \
            {"linear_dtype": self.linear_dtype, "bf16_kernel": bf16.kind()}
        return {"name": self.name, "active": self.active, "conv": CONV, **linear, **self.machine.key()}

    def describe(self) -> str:
        linear = f"; linear layers in {self.linear_dtype}" if self.linear_dtype else ""
        return (f"tinyclip's tiled CPU kernels, {self.isa.name} ({self.isa.lanes} float32 lanes; float16 on "
                f"tinygrad's{linear})")

    def compile_costs(self) -> tuple[float, float]:
        """Where the kernels are C source (a device that compiles C with clang), a ViT-B/32 graph compiles
        in 1.5-5 s of CPU (tinygrad's scheduling and its own small kernels, clang): about the work of
        60 images or 6,000 text tokens (measured on the 2-core Xeon, sharing its cores); else as tinygrad's."""
        if self.active and source.compiles_c(self.device):
            return C_COMPILE_TOKENS, C_COMPILE_IMAGES
        return super().compile_costs()

    @property
    def active(self) -> bool:
        """Whether the tiled kernels run: tinygrad's runtime patches installed (a tested tinygrad)."""
        return cpu_runtime.install()

    @functools.cached_property
    def machine(self) -> Machine:
        """Caches, threads and costs: measured by `tinyclip tune` (tune_machine), else modelled (tuning.py)."""
        return tuning.machine(self.isa, self.device, self.cache_folder)

    def tune_machine(self) -> str:
        """Measure this machine's tile, loop order and costs now, and keep them for later processes (run it
        inside the backend's context, before the model that uses this set is loaded)."""
        self.__dict__["machine"] = m = tuning.tune(self.isa, self.device, self.cache_folder)
        return f"{m.isa.name} tile {m.tile_rows} rows x 2 vectors, {'rows' if m.rows_outer else 'panels'} outside"

    # ---- linear -------------------------------------------------------------------------------------

    def linear_dtype_problem(self, name: str) -> str | None:
        if name == "int8":
            from . import int8_set
            return int8_set.problem(self.isa, self.c_source)
        if name != "bfloat16":
            return super().linear_dtype_problem(name)
        if self.isa.lanes < bf16.LANES:      # a narrower instruction set forced on this CPU (TINYCLIP_CPU_ISA)
            return (f"bfloat16 needs {bf16.FLAG} (AVX-512), which the {self.isa.name} kernels leave out "
                    f"(TINYCLIP_CPU_ISA={self.isa.name}); unset TINYCLIP_CPU_ISA, or use float32")
        if bf16.FLAG not in cpu_info.flags():
            return (f"bfloat16 needs the CPU flag {bf16.FLAG} (vdpbf16ps: Intel Cooper Lake, Sapphire Rapids and "
                    "later, AMD Zen 4 and later), which this CPU lacks; use float32")
        if not self.c_source:
            return ("bfloat16's kernels are C source, which this backend's compiler (LLVM IR) does not take; "
                    "use the cpu backend (clang)")
        if not self.active:
            return (f"bfloat16 needs tinyclip's CPU runtime, which this tinygrad ({cpu_runtime.tinygrad_version()}) "
                    "lacks")
        return None

    def with_linear_dtype(self, name: str) -> KernelSet:
        """As KernelSet's; int8's linear layers are a set of their own (int8_set.Int8Kernels)."""
        if name != "int8":
            return super().with_linear_dtype(name)
        from . import int8_set
        if why := self.linear_dtype_problem(name):
            raise BackendError(why)
        return int8_set.Int8Kernels(self.isa, self.device, self.cache_folder, c_source=self.c_source)

    def prepare_linear(self, weight: Tensor) -> Tensor:
        if self.linear_dtype == "bfloat16" and weight.dtype == dtypes.float32 and bf16.fits(weight.shape[0]):
            self.machine   # measured now, at load time, never inside a JIT capture
            bf16.amx()     # AMX asked for now, before any kernel (a graph from the cache too) runs its tiles
            return bf16.to_pairs(weight)
        width = matmul.panel_width(weight.shape[0], self.isa.lanes)
        if weight.dtype != dtypes.float32 or width is None or not self.active:
            return weight
        self.machine   # measured now, at load time, never inside a JIT capture
        return matmul.to_panels(weight, width, reuse=self.handed_over(weight))

    def dense_weight(self, weight: Tensor) -> Tensor:
        if weight.dtype == dtypes.int32:     # bfloat16 pairs: the rounded weight (an odd input count padded by one)
            return Tensor(bf16.from_pairs(weight), device=weight.device)
        return matmul.from_panels(weight) if weight.ndim == 3 else weight

    def linear(self, x, weight, bias, act=None, residual=None):
        if weight.dtype == dtypes.int32:     # bfloat16 pairs (prepare_linear)
            def convert(x2d, padded_rows):      # q, k and v share one conversion of their input
                return self._once_per_input(x, ("bf16 pairs", padded_rows),
                                            lambda: bf16.to_pairs_of(x2d, self.machine, padded_rows))
            if act in (None, "quick_gelu"):
                return bf16.linear(x, weight, bias, act is not None, residual, self.machine, convert=convert)
            y = activation(act)(bf16.linear(x, weight, bias, False, None, self.machine, convert=convert))
            return y if residual is None else y + residual
        if weight.ndim != 3:    # not prepared as panels (float16, or a width no panel divides)
            return super().linear(x, weight, bias, act, residual)
        if act in (None, "quick_gelu"):   # all of it in the matmul kernel
            return matmul.panel_linear(x, weight, bias, exp.quick_gelu if act else None, residual, self.machine)
        y = activation(act)(matmul.panel_linear(x, weight, bias, None, None, self.machine))   # exact GELU etc.
        return y if residual is None else y + residual

    def _once_per_input(self, x: Tensor, what, make) -> Tensor:
        """make() (a conversion of input x: bfloat16 pairs, int8 rows), made once while x is the last input
        asked about: q, k and v read the same input, so theirs is one kernel, not three. Kept as graph nodes,
        not Tensors: a kernel set holds no tensors (get_state_dict walks it with the model)."""
        kept = self._last
        if kept is None or kept[0] is not x.uop or kept[1] != what:
            kept = self._last = (x.uop, what, make().uop)
        return Tensor(kept[2])

    # ---- convolutions (conv.py) --------------------------------------------------------------------

    def prepare_conv2d(self, weight: Tensor) -> Tensor:
        if CONV != "im2col":
            return weight
        panels = self.prepare_linear(conv.weight_matrix(weight).contiguous().realize())
        return panels if panels.ndim == 3 else weight

    def conv2d(self, x, weight, bias, stride, padding, kernel, act=None):
        if weight.ndim != 3:    # the plain set's convolution (float16, widths no panel divides)
            return super().conv2d(x, weight, bias, stride, padding, kernel, act)
        y = conv.conv2d(x, weight, bias, stride, padding, kernel, lambda a, w, b: self.linear(a, w, b))
        return y if act is None else activation(act)(y)

    # ---- attention and layer norm ----------------------------------------------------------------------

    def attention(self, q, k, v, heads, causal=False):
        if q.dtype != dtypes.float32 or not self.active:
            return super().attention(q, k, v, heads, causal)
        return attention.attention(q, k, v, heads, causal, self.machine)

    def layer_norm(self, x, weight, bias, eps):
        if x.dtype != dtypes.float32 or weight.dtype != dtypes.float32 or not norm.fits(x.shape[-1]) or not self.active:
            return super().layer_norm(x, weight, bias, eps)
        return norm.layer_norm(x, weight, bias, eps, self.machine)

    # ---- moving values into place (layout.py: C source, where the device compiles it) ---------------------

    def _moves(self, *tensors: Tensor) -> bool:
        return self.active and layout.runs_here(*tensors)

    def embed_tokens(self, ids, tokens, positions):
        if not self._moves(tokens, positions):
            return super().embed_tokens(ids, tokens, positions)
        return layout.embed_tokens(ids, tokens, positions)

    def pool_text(self, x, ids, eos_token_id):
        if not self._moves(x):
            return super().pool_text(x, ids, eos_token_id)
        return layout.pool_rows(x, ids, eos_token_id, largest=eos_token_id == pooling.LEGACY_EOS)

    def class_token(self, x):
        return layout.pool_rows(x) if self._moves(x) else super().class_token(x)

    def pixel_values(self, crops, scaling):
        if not self._moves(crops):
            return super().pixel_values(crops, scaling)
        return layout.pixel_values(crops, pixels.float32(scaling.scale), scaling.mean, scaling.std)

    def patches(self, x, patch):
        if not self._moves(x) or x.shape[2] % patch or x.shape[3] % patch:
            return super().patches(x, patch)
        return layout.patches(x, patch)

    def class_and_positions(self, patches, cls, positions):
        if not self._moves(patches, cls, positions):
            return super().class_and_positions(patches, cls, positions)
        return layout.class_and_positions(patches, cls, positions)
