"""Fused ops: Triton kernels, their launchers, eager CPU fast paths and autograd Functions.

One family per folder (kernels in ``kernels.py``, the eager path in ``eager.py``, dispatch and
autograd in ``function.py``):

- ``soft_ce``: the centered, temperature-scaled soft-target cross-entropy over teacher/student
  crop pairs (the DINO loss op; custom ops ``dino_fast::dino_loss_fwd`` / ``_bwd``);
- ``ema``: the teacher EMA over one flat buffer (``kernels.py``) and :class:`TeacherEMA`, which
  lays two models' parameters out as such buffers (``teacher.py``);
- ``backend``: backend names and the ``auto`` resolution; ``compile_check``: compile a kernel
  for sm_80 / sm_90 without a GPU and read its registers and spills.

Nothing here imports Triton at module import time except the ``kernels.py`` files themselves.
"""
