"""A toy method, the worked example of docs/DESIGN.md ("Adding a method"): the student's CLS
embedding of each global crop predicts the teacher's embedding of the other global crop
(cosine distance, BYOL-style without a predictor), plus a step counter kept as method state."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_fast.config import TrainConfig
from dino_fast.methods import LossTerm, Method, StepOutput, build_backbone, register_method
from dino_fast.models import MultiCropWrapper


@register_method("toy")
class Toy(Method):
    """Cross-view cosine distance between student and EMA-teacher embeddings."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        backbone = build_backbone(cfg, teacher=False)
        dim = backbone.embed_dim
        self.student = MultiCropWrapper(backbone, nn.Linear(dim, 16))
        self.teacher = MultiCropWrapper(build_backbone(cfg, teacher=True), nn.Linear(dim, 16))
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # method state: checkpointed

    def forward_step(self, crops: Sequence[Tensor], epoch: int, it: int) -> StepOutput:
        with self.autocast():
            t = self.teacher(crops[:2]).float().chunk(2)
            s = self.student_forward(crops[:2]).float().chunk(2)
        loss = sum(2 - 2 * F.cosine_similarity(s[i], t[1 - i].detach(), dim=-1).mean() for i in range(2)) / 2
        B = crops[0].shape[0]
        return StepOutput({"cosine": LossTerm(loss, 1.0)}, {"student_output": (torch.cat(s), B)})

    def after_step(self, it: int) -> None:
        self.steps += 1
