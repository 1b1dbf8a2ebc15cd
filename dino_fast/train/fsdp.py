"""Sharded training with torch's ``fully_shard`` (FSDP2): sharding, full state dicts, reshard.

:func:`shard_module` applies the standard FSDP2 pattern to a student or a teacher network:
``fully_shard`` on each transformer block of ``backbone.blocks``, then on each head (every other
child of the root that holds parameters; the members of a ``ModuleList`` / ``ModuleDict`` child,
e.g. Mugs' heads and relation block, one by one, because a container has no forward of its own),
then on the root (which keeps the backbone's embeddings, tokens and final norm). Every
parameter is then a ``DTensor`` sharded on dim 0 over one 1-D mesh of all ranks
(``Shard(0)``, ``torch.chunk`` sizes), so a teacher sharded the same way on the same mesh holds,
on each rank, exactly the slices of its student's parameters: the EMA runs on the local shards
(:class:`dino_fast.ops.ema.TeacherEMA`'s sharded path).

Mixed precision (:class:`torch.distributed.fsdp.MixedPrecisionPolicy`): the sharded parameters
(the optimizer's and the EMA's) stay fp32; ``param_dtype`` is what they are all-gathered in for
the forward and backward (``train.fsdp_param_dtype``: bf16 or fp32); gradients are reduce-scattered
in fp32 for the heads and the root (the issue's "fp32 reduction for the heads": the head's last
layer sums over up to 65536 prototypes) and in ``train.fsdp_block_reduce_dtype`` for the blocks
(fp32 by default).

Checkpoints keep the format of a non-sharded run: :func:`full_model_state_dict` and
:func:`full_optimizer_state_dict` gather full tensors to rank 0's CPU (collectives: every rank
calls them; the other ranks get ``{}``), the optimizer state with torch's integer parameter ids
in param-group order (as ``optimizer.state_dict()`` writes them); :func:`load_full_model_state_dict`
and :func:`load_full_optimizer_state_dict` take such full dicts (every rank has read the file)
and keep each rank's shard.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

__all__ = [
    "build_mesh", "fsdp_param_dtype", "shard_module", "is_sharded", "reshard", "full_model_state_dict",
    "load_full_model_state_dict", "full_optimizer_state_dict", "load_full_optimizer_state_dict",
]

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def fsdp_param_dtype(setting: str, precision: str) -> Optional[torch.dtype]:
    """The FSDP ``param_dtype`` of ``train.fsdp_param_dtype`` = ``setting`` (``auto | bf16 | fp32``)
    under the resolved ``train.precision`` = ``precision``: ``torch.bfloat16``, or None (the
    parameters' own fp32). ``auto`` is bf16 exactly when the precision is bf16."""
    if setting not in ("auto", "bf16", "fp32"):
        raise ValueError(f"fsdp param dtype must be 'auto', 'bf16' or 'fp32', got {setting!r}")
    if setting == "bf16" or (setting == "auto" and precision == "bf16"):
        return torch.bfloat16
    return None


def build_mesh(device: torch.device) -> Any:
    """A 1-D :class:`~torch.distributed.device_mesh.DeviceMesh` over every rank of the default
    process group, on ``device``'s type (``cuda`` or ``cpu``).

    Raises:
        RuntimeError: torch.distributed is not initialised (FSDP needs a process group: torchrun).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("train.sharding=fsdp needs torch.distributed initialised (launch with torchrun, "
                           "WORLD_SIZE >= 2); got no process group")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def _units(root: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """``(blocks, heads)`` of :func:`shard_module`: ``root.backbone.blocks[i]``, and the other
    children of ``root`` with parameters (members of a ModuleList / ModuleDict one by one)."""
    blocks: list[nn.Module] = []
    backbone = getattr(root, "backbone", None)
    if isinstance(backbone, nn.Module) and isinstance(getattr(backbone, "blocks", None), nn.ModuleList):
        blocks = list(backbone.blocks)
    heads: list[nn.Module] = []
    seen: set[int] = {id(b) for b in blocks}
    for child in root.children():
        if child is backbone:
            continue
        members = list(child.values() if isinstance(child, nn.ModuleDict) else child) \
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]
        for m in members:
            if id(m) not in seen and any(True for _ in m.parameters()):
                seen.add(id(m))
                heads.append(m)
    return blocks, heads


def shard_module(root: nn.Module, mesh: Any, *, param_dtype: Optional[torch.dtype] = None,
                 block_reduce_dtype: torch.dtype = torch.float32, reshard_root: bool = False) -> nn.Module:
    """``fully_shard`` ``root`` in place: each block of ``root.backbone.blocks``, each head, then the root.

    Args:
        root: a student or teacher network (``MultiCropWrapper``, ``DINOv2Wrapper``, ``MugsNetwork``);
            its parameters fp32, on ``mesh``'s device type.
        mesh: the 1-D mesh of :func:`build_mesh` (the same one for student and teacher).
        param_dtype: the dtype the parameters are all-gathered in (None: fp32).
        block_reduce_dtype: gradient reduce-scatter dtype of the blocks (heads and root: fp32).
        reshard_root: also free the root's gathered parameters after its forward (the teacher: it
            has no backward that would, and its EMA must see the sharded parameters).

    Returns ``root`` (now also an ``FSDPModule``); every parameter is a ``DTensor`` ``Shard(0)``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks, heads = _units(root)
    block_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=block_reduce_dtype)
    fp32_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for blk in blocks:
        fully_shard(blk, mesh=mesh, mp_policy=block_mp, reshard_after_forward=True)
    for head in heads:
        fully_shard(head, mesh=mesh, mp_policy=fp32_mp, reshard_after_forward=True)
    kwargs = {"reshard_after_forward": True} if reshard_root else {}
    fully_shard(root, mesh=mesh, mp_policy=fp32_mp, **kwargs)
    return root


def is_sharded(module: nn.Module) -> bool:
    """True when some submodule of ``module`` (itself included) is an ``FSDPModule``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def reshard(module: nn.Module) -> None:
    """Reshard every ``FSDPModule`` in ``module`` (a no-op where already sharded), so that its
    registered parameters are the sharded fp32 ``DTensor`` s again."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) ``state_dict`` of a sharded ``module`` on rank 0's CPU (``{}`` on the
    other ranks); keys, shapes and dtypes as ``module.state_dict()`` of the unsharded module.
    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(module)
    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_full_model_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full ``state_dict`` (every rank holds all of it, e.g. read from a checkpoint) into
    the sharded ``module``: each rank keeps its shard. Strict (missing or unexpected keys raise)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    reshard(module)
    set_model_state_dict(module, state, options=_options(strict=True))


def _param_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The parameter names of each param group of ``optimizer``, in group order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` of the unsharded run on rank 0's CPU (``{}`` on the others):
    integer parameter ids in param-group order, full state tensors. A collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(model)
    osd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return {}
    ids: dict[str, int] = {}
    for group in _param_fqns(model, optimizer):
        for fqn in group:
            ids[fqn] = len(ids)
    state = {ids[fqn]: st for fqn, st in osd["state"].items()}
    groups = [{**g, "params": [ids[f] for f in g["params"]]} for g in osd["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full, id-keyed ``optimizer.state_dict()`` (of a sharded or a non-sharded run; every
    rank holds it) into ``optimizer`` over the sharded ``model``. The ids of group ``g`` are mapped,
    by position, to this optimizer's parameters of group ``g`` (the caller has checked that the
    groups match).

    Raises:
        ValueError: the group count or a group's size differs.
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    fqns = _param_fqns(model, optimizer)
    saved = state["param_groups"]
    if len(saved) != len(fqns) or any(len(g["params"]) != len(f) for g, f in zip(saved, fqns)):
        raise ValueError(f"optimizer state has groups of sizes {[len(g['params']) for g in saved]}, this optimizer "
                         f"{[len(f) for f in fqns]}")
    by_id = {i: fqn for g, f in zip(saved, fqns) for i, fqn in zip(g["params"], f)}
    osd = {"state": {by_id[i]: st for i, st in state["state"].items()},
           "param_groups": [{**g, "params": list(f)} for g, f in zip(saved, fqns)]}
    reshard(model)
    # strict=False: the file may hold no state for a parameter (the head's last layer while it
    # is frozen gets no step). torch initialises every state first (a step with zero gradients
    # at lr 0: step=1, zero moments); a parameter without saved state is given none back, as
    # optimizer.load_state_dict leaves it, or its first real step would count 2 (not exact resume)
    set_optimizer_state_dict(model, optimizer, osd, options=_options(strict=False))
    params = {n: p for n, p in model.named_parameters()}
    for fqn in by_id.values():
        if fqn not in osd["state"]:
            optimizer.state.pop(params[fqn], None)
    for g, s in zip(optimizer.param_groups, saved):  # the saved types (betas: a tuple, not a list)
        for k, v in s.items():
            if k != "params" and isinstance(v, tuple) and isinstance(g.get(k), list):
                g[k] = tuple(g[k])
