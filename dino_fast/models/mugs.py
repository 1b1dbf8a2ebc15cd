"""Mugs networks (Zhou et al. 2022; official sail-sg/mugs semantics): projector / predictor heads,
the local-group memory and the student / teacher network around a ViT with one relation block.

Per crop, :class:`MugsNetwork` computes from the backbone's ``forward_features``:

- ``cls``: the CLS token after the final norm -> the instance projector (and, on the student,
  its predictor) and the group head (a DINO head);
- the relation token: the **pre-norm** mean of all tokens ``u`` queries the memory (top-k cosine
  neighbours, no gradient); ``[u, neighbours]`` ``[n, 1 + k, D]`` goes through the relation block
  (one ViT block of the backbone's width), then the backbone's **shared** final norm, token 0
  -> the local-group projector (and predictor);
- ``mean_patch``: the mean of the normalised patch tokens (what the memories store; detached).

The memory is queried with pre-norm means and stores post-norm patch means, as the official
code does.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_fast.models.attention import attention_compute_dtype
from dino_fast.models.multicrop import group_by_resolution

__all__ = ["ProjectorHead", "PredictorHead", "MugsMemory", "MugsNetwork"]


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if i < len(dims) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class ProjectorHead(nn.Module):
    """3-layer bias-free MLP ``in -> hidden -> hidden -> out`` with GELU, then L2 normalisation.

    ``forward([n, in_dim]) -> [n, out_dim]`` unit rows. Linear weights trunc-normal(0.02), as the
    official projector.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        for name, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.mlp = _mlp([in_dim, hidden_dim, hidden_dim, out_dim])
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.normalize(self.mlp(x), dim=-1)


class PredictorHead(nn.Module):
    """Student predictor: bias-free MLP ``dim -> hidden -> dim`` with GELU, then L2 normalisation
    (PyTorch's default Linear init, as the official predictor keeps). ``[n, dim] -> [n, dim]``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("hidden_dim", hidden_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.mlp = _mlp([dim, hidden_dim, dim])

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.normalize(self.mlp(x), dim=-1)


class MugsMemory(nn.Module):
    """The local-group memory: ``memory`` ``[K, D]`` fp32 (starts ``randn``) and a write pointer.

    Args:
        size: K rows; dim: D; topk: neighbours per query.
        faithful_pointer: reproduce the official pointer, which advances by twice the rows
            written when no wrap is needed (with a constant batch, half the rows are never
            written); False (default): a correct ring buffer.
    """

    def __init__(self, size: int, dim: int, topk: int, *, faithful_pointer: bool = False) -> None:
        super().__init__()
        if not (isinstance(topk, int) and isinstance(size, int) and 1 <= topk <= size) or dim < 1:
            raise ValueError(f"expected 1 <= topk <= size and dim >= 1, got size={size!r}, dim={dim!r}, topk={topk!r}")
        self.topk = topk
        self.faithful_pointer = bool(faithful_pointer)
        self.register_buffer("memory", torch.randn(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def lookup(self, query: Tensor) -> Tensor:
        """The ``topk`` rows most cosine-similar to each query row: ``[n, D]`` -> ``[n, topk, D]``
        fp32, as stored (no gradient)."""
        if query.dim() != 2 or query.shape[1] != self.memory.shape[1]:
            raise ValueError(f"query: expected [n, {self.memory.shape[1]}], got {tuple(query.shape)}")
        sim = F.normalize(query.float(), dim=-1) @ F.normalize(self.memory, dim=-1).t()
        idx = torch.topk(sim, self.topk, dim=-1).indices
        return self.memory[idx.reshape(-1)].view(query.shape[0], self.topk, -1)

    @torch.no_grad()
    def write(self, rows: Tensor, keep: Optional[Tensor] = None) -> int:
        """Write ``rows`` ``[n, D]`` (already gathered over ranks) at the pointer, wrapping; with
        ``keep`` (bool ``[n]``, gathered too) only the kept rows. Returns the rows written."""
        if keep is not None:
            rows = rows[keep.to(device=rows.device, dtype=torch.bool)]
        K = self.memory.shape[0]
        n = rows.shape[0]
        if rows.dim() != 2 or rows.shape[1] != self.memory.shape[1] or n > K:
            raise ValueError(f"rows: expected [n, {self.memory.shape[1]}] with n <= {K}, got {tuple(rows.shape)}")
        if n == 0:
            return 0
        ptr = int(self.ptr)
        first = min(n, K - ptr)
        self.memory[ptr:ptr + first] = rows[:first].float()
        if n > first:
            self.memory[: n - first] = rows[first:].float()
            self.ptr.fill_(n - first)
        else:
            self.ptr.fill_((ptr + (2 * n if self.faithful_pointer else n)) % K)
        return n


class MugsNetwork(nn.Module):
    """Backbone + relation block + Mugs heads; the student adds predictors (module doc).

    Args:
        backbone: a :class:`~dino_fast.models.vit.VisionTransformer` (``forward_features``,
            ``blocks``, ``norm``, ``embed_dim``).
        group_head: the DINO head (``[n, D] -> [n, K]``).
        proj_hidden_dim, proj_dim: projector sizes; pred_hidden_dim: predictor hidden width, or
            None for the teacher (no predictors).

    Submodules in EMA order: ``backbone``, ``relation_blocks``, ``head`` (``instance``,
    ``local_group`` projectors, ``group``); then ``predictor`` (student only, not EMA'd).
    """

    def __init__(self, backbone: nn.Module, group_head: nn.Module, *, proj_hidden_dim: int, proj_dim: int,
                 pred_hidden_dim: Optional[int]) -> None:
        super().__init__()
        dim = backbone.embed_dim
        self.backbone = backbone
        relation = copy.deepcopy(backbone.blocks[0])      # one block of the backbone's own architecture
        relation.drop_path = nn.Identity()                # official: drop path dpr[0] = 0
        relation.apply(type(backbone)._init_weights)
        self.relation_blocks = nn.ModuleList([relation])
        self.head = nn.ModuleDict({
            "instance": ProjectorHead(dim, proj_hidden_dim, proj_dim),
            "local_group": ProjectorHead(dim, proj_hidden_dim, proj_dim),
            "group": group_head,
        })
        self.predictor: Optional[nn.ModuleDict] = None
        if pred_hidden_dim is not None:
            self.predictor = nn.ModuleDict({"instance": PredictorHead(proj_dim, pred_hidden_dim),
                                            "local_group": PredictorHead(proj_dim, pred_hidden_dim)})

    def forward(self, crops: Sequence[Tensor], memory: MugsMemory) -> dict[str, Tensor]:
        """Crops (a list of ``[B, 3, H_i, W_i]``, crop-major) -> a dict of crop-major rows:

        ``instance``, ``local_group`` ``[ncrops*B, proj_dim]`` (unit rows; predictor outputs on the
        student), ``group`` ``[ncrops*B, K]`` logits, ``cls`` ``[ncrops*B, D]``, ``mean_patch``
        ``[B, D]`` of the first crop (detached, fp32).
        """
        if not isinstance(crops, (list, tuple)) or not crops:
            raise TypeError(f"crops: expected a non-empty list of [B, 3, H, W] tensors, got {type(crops).__name__}")
        cls_parts, rel_parts = [], []
        mean_patch: Optional[Tensor] = None
        for s, e in group_by_resolution(crops):
            batch = crops[s] if e - s == 1 else torch.cat(list(crops[s:e]))
            f = self.backbone.forward_features(batch)
            x = f["x_prenorm"]
            cls_parts.append(f["x_norm_clstoken"])
            if mean_patch is None:
                mean_patch = f["x_norm_patchtokens"][: crops[0].shape[0]].mean(1).detach().float()
            u = x.mean(1)                                              # pre-norm mean of all tokens
            rx = torch.cat([u.unsqueeze(1), memory.lookup(u.detach()).to(u.dtype)], dim=1)
            backend = self.backbone.resolve_attn_backend(rx.device, attention_compute_dtype(rx))
            for blk in self.relation_blocks:
                rx = blk(rx, backend)
            rel_parts.append(self.backbone.norm(rx[:, 0]))
        cls = torch.cat(cls_parts) if len(cls_parts) > 1 else cls_parts[0]
        rel = torch.cat(rel_parts) if len(rel_parts) > 1 else rel_parts[0]
        inst = self.head["instance"](cls)
        lg = self.head["local_group"](rel)
        if self.predictor is not None:
            inst = self.predictor["instance"](inst)
            lg = self.predictor["local_group"](lg)
        assert mean_patch is not None
        return {"instance": inst, "local_group": lg, "group": self.head["group"](cls), "cls": cls,
                "mean_patch": mean_patch}
