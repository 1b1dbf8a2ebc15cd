"""Tiny Triton kernels used by tests of the measurement tools (jit needs a source file)."""
import triton
import triton.language as tl


@triton.jit
def scale2(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    tl.store(y_ptr + off, tl.load(x_ptr + off, mask=m) * 2, mask=m)
