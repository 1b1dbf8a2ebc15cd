"""Eager reference implementations of the official DINO algorithm (tests and benchmarks only)."""
from dino_fast.reference.attention import attention_reference, dino_head_reference, vit_reference  # noqa: E402,F401  (issue 4)
from dino_fast.reference.augment import ReferenceDINOAugmentation, build_reference_loader  # noqa: E402,F401  (issue 5)
from dino_fast.reference.ema import reference_ema_update_  # noqa: E402,F401  (issue 3)
from dino_fast.reference.loss import DINOLossReference, dino_loss_reference, koleo_loss_reference, update_center_reference  # noqa: E402,F401
from dino_fast.reference.optim import clip_gradients_reference  # noqa: E402,F401  (issue 6)
