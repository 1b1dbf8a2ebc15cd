"""Optimizer set-up and the official gradient manipulations.

- :func:`param_groups`: weight decay on every parameter except biases and 1-D tensors (norms,
  tokens are not 1-D but ``cls_token``/``pos_embed`` *are* regularised in the official code);
  optionally the patch embedding in groups of its own with an lr multiplier (Mugs, DINOv2: 0.2).
- :func:`clip_gradients`: the official per-parameter clipping (each gradient tensor rescaled to
  norm <= clip on its own), or a global-norm option; FSDP's sharded (``DTensor``) gradients get
  the norms of the full tensors (local sums of squares, all-reduced over the mesh).
- :func:`cancel_gradients_last_layer`: drop the head's last-layer gradients during the first
  ``freeze_last_layer`` epochs.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

PATCH_EMBED = "patch_embed"  # the module name (a component of the parameter name) the lr multiplier acts on


def _is_patch_embed(name: str) -> bool:
    return PATCH_EMBED in name.split(".")


_EMBEDDING = (".pos_embed", ".patch_embed", ".mask_token", ".cls_token", ".register_tokens")


def layer_lr_rate(name: str, decay: float, num_layers: int) -> float:
    """DINOv2's layer-wise lr rate of parameter ``name`` (a name of the student, e.g.
    ``backbone.blocks.3.mlp.fc1.weight``): ``decay ** (num_layers + 1 - layer_id)`` with layer_id
    0 for the backbone's embeddings (pos/patch embedding, cls/mask tokens), ``i + 1`` for
    ``backbone.blocks.i``, ``num_layers + 1`` for everything else (the final norm, the heads:
    rate 1)."""
    layer_id = num_layers + 1
    if name.startswith("backbone.") or ".backbone." in name:
        if any(e in name for e in _EMBEDDING):
            layer_id = 0
        elif ".blocks." in name:
            layer_id = int(name[name.find(".blocks."):].split(".")[2]) + 1
    return float(decay) ** (num_layers + 1 - layer_id)


def param_groups(model: nn.Module, patch_embed_lr_mult: float = 1.0, layerwise_decay: float = 1.0,
                 num_layers: int = 0) -> list[dict]:
    """AdamW parameter groups of ``model``'s trainable parameters.

    ``regularized`` (weight decay follows the schedule) and ``not_regularized`` (weight_decay 0:
    names ending in ``.bias`` and 1-D tensors), in that order. With ``patch_embed_lr_mult != 1``
    the parameters of every ``patch_embed`` module (a component of the parameter name, e.g.
    ``backbone.patch_embed.proj.weight``) leave those two for ``patch_embed_regularized`` and
    ``patch_embed_not_regularized`` (same decay rule), as in the official Mugs and DINOv2 code;
    empty groups are left out. With the default 1.0 the two groups are exactly the official DINO
    ones.

    Every group carries ``name``, ``lr_mult`` (the trainer sets ``lr = schedule value x lr_mult``
    every step: 1.0, or ``patch_embed_lr_mult`` for the patch-embedding groups) and
    ``scheduled_wd`` (True: the trainer sets ``weight_decay`` from the schedule; False: it stays 0).

    With ``layerwise_decay != 1`` (DINOv2's ``optim.layerwise_decay``; ``num_layers`` = the
    backbone's depth) each of those groups is split further by :func:`layer_lr_rate`, into
    ``<group>/layer<id>`` groups whose ``lr_mult`` is the rate (times the patch-embedding
    multiplier for those parameters); with 1.0 nothing changes.

    Raises:
        ValueError: ``patch_embed_lr_mult`` is not a finite number >= 0, or it is != 1 and the
            model has no trainable ``patch_embed`` parameter (the multiplier would act on nothing);
            ``layerwise_decay`` not in (0, 1], or != 1 with ``num_layers < 1``.
    """
    mult = patch_embed_lr_mult
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not (math.isfinite(mult) and mult >= 0):
        raise ValueError(f"patch_embed_lr_mult must be a finite number >= 0 (1.0: no multiplier), got {mult!r}")
    lwd = layerwise_decay
    if isinstance(lwd, bool) or not isinstance(lwd, (int, float)) or not (0 < lwd <= 1):
        raise ValueError(f"layerwise_decay must be a number in (0, 1] (1.0: none; DINOv2: 0.9), got {lwd!r}")
    if lwd != 1 and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1):
        raise ValueError(f"layerwise_decay={lwd} needs the backbone depth num_layers >= 1, got {num_layers!r}")
    if lwd != 1:
        groups = param_groups(model, patch_embed_lr_mult)
        names = {id(p): n for n, p in model.named_parameters()}
        out = []
        for g in groups:
            by_rate: dict[float, list[nn.Parameter]] = {}
            for p in g["params"]:
                by_rate.setdefault(layer_lr_rate(names[id(p)], lwd, num_layers), []).append(p)
            for rate in sorted(by_rate, reverse=True):
                layer = round(num_layers + 1 - math.log(rate) / math.log(lwd)) if rate != 1.0 else num_layers + 1
                out.append({**{k: v for k, v in g.items() if k != "params"}, "params": by_rate[rate],
                            "name": f"{g['name']}/layer{layer}", "lr_mult": g["lr_mult"] * rate})
        return out
    split = float(mult) != 1.0
    lists: dict[str, list[nn.Parameter]] = {"regularized": [], "not_regularized": [],
                                            "patch_embed_regularized": [], "patch_embed_not_regularized": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "not_regularized" if name.endswith(".bias") or p.ndim == 1 else "regularized"
        lists[f"patch_embed_{kind}" if split and _is_patch_embed(name) else kind].append(p)
    if split and not (lists["patch_embed_regularized"] or lists["patch_embed_not_regularized"]):
        raise ValueError(f"patch_embed_lr_mult={mult} but {type(model).__name__} has no trainable parameter "
                         f"of a '{PATCH_EMBED}' module (expected e.g. backbone.patch_embed.proj.weight)")
    groups = [{"params": lists["regularized"], "name": "regularized", "lr_mult": 1.0, "scheduled_wd": True},
              {"params": lists["not_regularized"], "weight_decay": 0.0, "name": "not_regularized", "lr_mult": 1.0,
               "scheduled_wd": False}]
    if split:
        for kind, wd in (("regularized", True), ("not_regularized", False)):
            if lists[f"patch_embed_{kind}"]:
                g = {"params": lists[f"patch_embed_{kind}"], "name": f"patch_embed_{kind}", "lr_mult": float(mult),
                     "scheduled_wd": wd}
                if not wd:
                    g["weight_decay"] = 0.0
                groups.append(g)
    return groups


def build_adamw(model: nn.Module, patch_embed_lr_mult: float = 1.0, layerwise_decay: float = 1.0,
                num_layers: int = 0) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (the arguments as there), fused where this torch
    supports it (CPU and CUDA since 2.4; measured 2.7-7x faster than the default per-tensor loop
    on CPU, bench/step.py), else the default implementation. Same update rule either way. The
    groups' ``lr`` and ``weight_decay`` are set by the caller (the trainer: from the schedules,
    times each group's ``lr_mult``)."""
    groups = param_groups(model, patch_embed_lr_mult, layerwise_decay, num_layers)
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(param_groups(model, patch_embed_lr_mult, layerwise_decay, num_layers))


@torch.no_grad()
def clip_gradients(params: Iterable[torch.Tensor], clip: float, mode: str = "per_param") -> torch.Tensor:
    """Clip gradients in place and return the gradient norms before clipping.

    Args:
        params: parameters (their ``.grad`` is clipped; parameters without a gradient are skipped).
        clip: maximum norm; <= 0 disables clipping (norms are still returned).
        mode: ``"per_param"`` (official DINO: each tensor scaled by ``clip / (norm + 1e-6)`` when
            that is < 1) or ``"global"`` (one factor from the norm of all gradients together).

    Returns:
        fp32 tensor of per-parameter norms ([n_params]) for ``per_param``, or the global norm
        (a 0-d tensor) for ``global``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    group = _dtensor_group(grads)
    if group is not None:  # FSDP: each rank holds a shard of every gradient
        grads = [g.to_local() for g in grads]
        # per-tensor norms of the full gradients: local sums of squares, all-reduced (every rank
        # gets the same norms and scales its shards by the same factors)
        sq = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 if g.numel() else g.new_zeros((), dtype=torch.float32)
                          for g in grads])
        torch.distributed.all_reduce(sq, group=group)
        norms = sq.sqrt()
    else:
        norms = torch.stack(torch._foreach_norm(grads, 2.0)).float()
    if mode == "per_param":
        if clip > 0:
            coef = clip / (norms + 1e-6)
            # scale only the tensors over the limit (the official rule: clip_coef < 1); a foreach
            # multiply over every gradient costs more than the norms on CPU
            over = (coef < 1).nonzero().flatten().tolist()
            if over:
                factors = coef[over].tolist()
                torch._foreach_mul_([grads[i] for i in over], factors)
        return norms
    if mode == "global":
        total = norms.norm(2)
        if clip > 0:
            coef = (clip / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef.item())
        return total
    raise ValueError(f"clip mode must be 'per_param' or 'global', got {mode!r}")


def _dtensor_group(grads: list[torch.Tensor]) -> object:
    """The process group of the 1-D mesh the gradients are sharded on (FSDP), or None when they
    are plain tensors. Raises ``ValueError`` for a mix, or for a mesh of more than one dim."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    kinds = {isinstance(g, DTensor) for g in grads}
    if kinds == {False}:
        return None
    if kinds != {True}:
        raise ValueError("clip_gradients: some gradients are DTensors (FSDP) and some are not; shard every "
                         "trainable parameter or none")
    mesh = grads[0].device_mesh
    if mesh.ndim != 1 or any(g.device_mesh != mesh for g in grads):
        raise ValueError(f"clip_gradients: gradients must be sharded over one 1-D mesh, got {mesh}")
    return mesh.get_group()


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Set ``.grad = None`` on every parameter whose name contains ``last_layer`` while
    ``epoch < freeze_last_layer`` (the official DINO rule); AdamW then leaves them untouched.
    The trainer passes iterations for both (``it < freeze_last_layer epochs x iterations per
    epoch`` is the same rule; see ``Trainer.freeze_last_layer_iters``)."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
