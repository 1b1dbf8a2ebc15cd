"""Triton kernels of dino-fast, installed as ``dino_fast.kernels``.

One kernel family per file:
- ``dino_loss``: fused centered, temperature-scaled softmax cross-entropy over crop pairs;
- ``ema``: the teacher EMA over one flat buffer;
- ``compile_check``: compile a kernel for sm_80 / sm_90 without a GPU and read its registers
  and spills.
"""
