"""Teacher EMA: the flat-buffer kernel (``kernels``) and :class:`TeacherEMA` (``teacher``)."""
from dino_fast.ops.ema.teacher import NonFiniteEMAError, TeacherEMA, ema_update_

__all__ = ["NonFiniteEMAError", "TeacherEMA", "ema_update_"]
