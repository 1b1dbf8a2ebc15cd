"""Multi-head self-attention with three interchangeable backends, and backend selection.

Backends (all compute ``softmax(q k^T * scale) v`` per head, the official DINO attention):

- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (CUDA only: xformers has no CPU
  operators since 0.0.22). Also runs packed sequences of different lengths in one call through a
  ``BlockDiagonalMask`` (all crops of all resolutions at once, see :func:`packed_attention`).
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
  kernels on CUDA, a fused flash kernel on CPU); the CPU default for fp32.
- ``"math"``: the official explicit softmax; the only backend that returns the attention
  weights (``get_last_selfattention``, attention maps).
- ``"auto"``: ``xformers`` when it is installed, the tensors are on CUDA and its operators run
  there (a binary built for another torch imports but has none: probed once per device), ``sdpa`` otherwise
  on CUDA; on CPU ``sdpa`` for fp32 and ``math`` when the attention computes in bf16/fp16 (input
  dtype, or the autocast dtype inside an autocast region: torch's CPU flash kernel in half precision
  is several times slower than the explicit softmax, whose matmuls run on the CPU's bf16 units;
  ``bench/attention.py`` measures both); the first resolution per device type and dtype logs through
  :mod:`logging` which backend and why.

An explicit request that cannot be honoured (``"xformers"`` on CPU tensors, or without xformers
installed) raises :class:`ValueError` saying why; nothing falls back silently.

Shapes in comments: B batch, N tokens, C = H * Dh channels, H heads, Dh head dim, T total
tokens of a packed batch.
"""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ATTN_BACKENDS = ("auto", "xformers", "sdpa", "math")


def check_attn_backend(name: str) -> str:
    """Validate an attention backend name (one of :data:`ATTN_BACKENDS`) and return it.

    Raises:
        TypeError: when ``name`` is not a string.
        ValueError: when ``name`` is not one of :data:`ATTN_BACKENDS`.
    """
    if not isinstance(name, str):
        raise TypeError(f"attn_backend must be a str, one of {ATTN_BACKENDS}, got {type(name).__name__}")
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {name!r}")
    return name


@functools.lru_cache(maxsize=None)
def _xformers_import() -> tuple[Any, str]:
    """Import ``xformers.ops`` once. Returns ``(module or None, reason it is unavailable or "")``."""
    try:
        spec = importlib.util.find_spec("xformers")
    except (ImportError, ValueError):  # pragma: no cover - broken installation metadata
        spec = None
    if spec is None:
        return None, "xformers is not installed (pip install 'dino-fast[xformers]')"
    try:
        xops = importlib.import_module("xformers.ops")
    except Exception as exc:  # a binary built for another torch raises all sorts of errors
        return None, f"xformers is installed but failed to import: {type(exc).__name__}: {exc}"
    return xops, ""


# CUDA device index -> "" when xformers' attention ran there for every dtype, else why not
_CUDA_PROBES: dict[int, str] = {}


def _probe_attention(xops: Any, device: torch.device, dtypes: Sequence[torch.dtype], device_name: str) -> str:
    """Call ``xops.memory_efficient_attention`` once per dtype on ``device``; return "" when every
    call ran, else the reason (the exception's first line and its distinct "not supported" lines)."""
    for dt in dtypes:
        q = torch.zeros(1, 8, 1, 64, device=device, dtype=dt)
        try:
            xops.memory_efficient_attention(q, q, q)
        except Exception as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            skip = ("query", "key", "value", "attn_bias", "p ", "p:", "`")
            detail = "; ".join(dict.fromkeys(ln for ln in lines[1:] if not ln.startswith(skip)))
            return (f"xformers is installed but its attention does not run on {device_name} for "
                    f"{str(dt).replace('torch.', '')} inputs ({type(exc).__name__}: {lines[0] if lines else ''}"
                    f"{' ' + detail[:300] if detail else ''}); `python -m xformers.info` lists the operators it "
                    "was built with")
    return ""


def _xformers_cuda_probe(xops: Any, index: int) -> str:
    """:func:`_probe_attention` on CUDA device ``index`` in fp32, fp16 and bf16 (where supported).
    An xformers binary built for another torch / CUDA imports fine but has no operators ("No
    operator found for memory_efficient_attention..."): only a call tells."""
    dev = torch.device("cuda", index)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    return _probe_attention(xops, dev, dtypes, torch.cuda.get_device_name(dev))


def xformers_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether xformers' attention is usable, and if not, why (``(True, "")`` when it is).

    Without ``device`` (or for a non-CUDA device): whether ``xformers.ops`` imports. For a CUDA
    device: also whether its operators run there, checked once per device by a tiny call in fp32,
    fp16 and bf16 (cached; under ``torch.compile`` tracing the cached answer is used).
    """
    xops, reason = _xformers_import()
    if xops is None:
        return False, reason
    if device is None or torch.device(device).type != "cuda":
        return True, ""
    d = torch.device(device)
    index = d.index if d.index is not None else torch.cuda.current_device()
    if index not in _CUDA_PROBES:
        if torch.compiler.is_compiling():
            return True, ""
        _CUDA_PROBES[index] = _xformers_cuda_probe(xops, index)
    reason = _CUDA_PROBES[index]
    return reason == "", reason


_HALF = (torch.bfloat16, torch.float16)


def attention_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention of a model fed with ``x`` computes in: the autocast dtype when
    autocast is enabled for ``x``'s device type (the ``qkv`` projection then returns it), else
    ``x.dtype``. ``x``: any floating tensor (the model input or the block's tokens)."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def resolve_attn_backend(requested: str, device: torch.device | str, *, dtype: torch.dtype | None = None,
                         log_state: dict | None = None) -> str:
    """Resolve an attention backend request for tensors on ``device`` to a concrete backend.

    Args:
        requested: one of :data:`ATTN_BACKENDS`.
        device: the device of the attention inputs.
        dtype: the dtype the attention computes in (:func:`attention_compute_dtype`); on CPU,
            ``"auto"`` picks ``math`` for bf16/fp16 and ``sdpa`` otherwise (None: fp32).
        log_state: a dict owned by the caller (one per model) that records which device types
            (and dtypes) ``"auto"`` already logged its choice for, so the choice is logged once
            per model, device type and dtype; ``None`` logs every ``"auto"`` resolution.

    Returns:
        ``"xformers"``, ``"sdpa"`` or ``"math"``.

    Raises:
        ValueError: unknown name; ``"xformers"`` requested for non-CUDA tensors or when xformers
            cannot be imported (the message says which).
    """
    requested = check_attn_backend(requested)
    device = torch.device(device)
    if requested == "auto":
        ok, reason = xformers_status(device)
        if ok and device.type == "cuda":
            choice, why = "xformers", "xformers is installed, the tensors are on CUDA and its operators run there"
        elif device.type != "cuda" and dtype in _HALF:
            choice, why = "math", (f"the attention computes in {str(dtype).replace('torch.', '')} on {device.type}, "
                                   "where torch's fused SDPA kernel is several times slower than the explicit "
                                   "softmax (bench/attention.py), and xformers has CUDA operators only")
        elif device.type != "cuda":
            choice, why = "sdpa", f"the tensors are on {device.type}, and xformers has CUDA operators only"
        else:
            choice, why = "sdpa", reason
        key = device.type if dtype is None else f"{device.type}/{str(dtype).replace('torch.', '')}"
        if log_state is None or key not in log_state:
            logger.info("attn_backend='auto' chose %r for %s tensors: %s", choice, key, why)
            if log_state is not None:
                log_state[key] = choice
        return choice
    if requested == "xformers":
        ok, reason = xformers_status(device)
        if not ok:
            raise ValueError(f"attn_backend='xformers' was requested but {reason}; use 'sdpa' or 'auto'")
        if device.type != "cuda":
            raise ValueError(
                f"attn_backend='xformers' needs CUDA tensors (got {device.type} tensors): xformers has no "
                "CPU operators; use 'sdpa' or 'auto'"
            )
    return requested


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official explicit-softmax attention.

    Args:
        q, k, v: ``[B, H, N, Dh]`` float tensors (same dtype and device).
        scale: multiplier of ``q k^T`` (official: ``Dh ** -0.5``).
        dropout_p: dropout on the attention weights (training only; callers pass 0 in eval).

    Returns:
        ``(out [B, H, N, Dh], attn [B, H, N, N])``; ``attn`` holds the weights after dropout, as
        the official code returns them (the plain softmax when ``dropout_p == 0``).
    """
    attn = (q @ k.transpose(-2, -1)) * scale  # [B, H, N, N]
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return attn @ v, attn


def _validate_seqlens(seqlens: Sequence[int], total: int) -> list[int]:
    """Check that ``seqlens`` are positive ints summing to ``total``; return them as a list."""
    if isinstance(seqlens, torch.Tensor):
        seqlens = seqlens.tolist()
    seqlens = list(seqlens)
    if len(seqlens) == 0:
        raise ValueError("seqlens must hold at least one sequence length, got an empty sequence")
    for i, n in enumerate(seqlens):
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"seqlens must be positive ints, got {n!r} at position {i}")
    if sum(seqlens) != total:
        raise ValueError(
            f"seqlens sum to {sum(seqlens)} tokens but the packed tensor holds {total} tokens; a mismatched "
            "block-diagonal mask would silently mix sequences"
        )
    return seqlens


@functools.lru_cache(maxsize=64)
def _block_diagonal_mask(seqlens: tuple[int, ...], device: torch.device) -> Any:
    """xformers ``BlockDiagonalMask`` for ``seqlens`` (its sequence starts on ``device`` where the
    installed xformers accepts one), checked against the lengths it was built from. Cached: the
    crop layout is the same every step."""
    xops, reason = _xformers_import()
    if xops is None:
        raise ValueError(f"a block-diagonal mask needs xformers but {reason}")
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    try:
        mask = BlockDiagonalMask.from_seqlens(list(seqlens), device=device)
    except TypeError:  # xformers < 0.0.24 has no device argument
        mask = BlockDiagonalMask.from_seqlens(list(seqlens))
    starts = getattr(getattr(mask, "q_seqinfo", None), "seqstart_py", None)
    if starts is not None:
        expected = [0]
        for n in seqlens:
            expected.append(expected[-1] + n)
        if list(starts) != expected:
            raise ValueError(f"xformers BlockDiagonalMask has sequence starts {list(starts)}, expected {expected}")
    return mask


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqlens: Sequence[int],
    scale: float,
    backend: str,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention over several sequences packed along the token axis (block-diagonal attention).

    Args:
        q, k, v: ``[1, T, H, Dh]`` (xformers layout), ``T == sum(seqlens)``.
        seqlens: length of each packed sequence, in order.
        scale: multiplier of ``q k^T``.
        backend: ``"xformers"``: one ``memory_efficient_attention`` call with a
            ``BlockDiagonalMask`` (the fast path). ``"sdpa"`` / ``"math"``: one call per sequence
            (the reference for the packed layout, used to test it without CUDA; not a fast path).
        dropout_p: attention dropout probability (0 in eval).

    Returns:
        ``[1, T, H, Dh]``, each token attending only to the tokens of its own sequence.

    Raises:
        ValueError: bad shapes, ``seqlens`` that do not add up to ``T``, unknown backend.
    """
    if q.dim() != 4 or q.shape[0] != 1 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"packed_attention expects q, k, v of one shape [1, T, H, Dh], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    lens = _validate_seqlens(seqlens, q.shape[1])
    if backend == "xformers":
        xops, reason = _xformers_import()
        if xops is None:
            raise ValueError(f"packed attention with backend 'xformers' needs xformers but {reason}")
        if q.device.type != "cuda":
            raise ValueError(f"packed attention with backend 'xformers' needs CUDA tensors, got {q.device.type}")
        mask = _block_diagonal_mask(tuple(lens), q.device)
        return xops.memory_efficient_attention(q, k, v, attn_bias=mask, p=dropout_p, scale=scale)
    if backend not in ("sdpa", "math"):
        raise ValueError(f"packed attention backend must be 'xformers', 'sdpa' or 'math', got {backend!r}")
    outs = []
    for qs, ks, vs in zip(q.split(lens, 1), k.split(lens, 1), v.split(lens, 1)):
        # [1, n, H, Dh] -> [1, H, n, Dh]
        qs, ks, vs = (t.transpose(1, 2) for t in (qs, ks, vs))
        if backend == "sdpa":
            o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p, scale=scale)
        else:
            o, _ = math_attention(qs, ks, vs, scale, dropout_p)
        outs.append(o.transpose(1, 2))
    return torch.cat(outs, dim=1)


class Attention(nn.Module):
    """Multi-head self-attention with the official DINO parameters (``qkv``, ``proj``).

    Args:
        dim: channels C; must be divisible by ``num_heads``.
        num_heads: H.
        qkv_bias: bias in the ``qkv`` projection (True for the DINO ViTs).
        qk_scale: override of the ``Dh ** -0.5`` scale (official argument).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        attn_backend: one of :data:`ATTN_BACKENDS`, resolved per call against the input device.

    State dict: ``qkv.weight [3C, C]``, ``qkv.bias [3C]``, ``proj.weight [C, C]``, ``proj.bias [C]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_backend = check_attn_backend(attn_backend)
        self._auto_log: dict[str, str] = {}

    def resolve_backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        """Concrete backend for inputs on ``device`` computing in ``dtype`` (see
        :func:`resolve_attn_backend`)."""
        return resolve_attn_backend(self.attn_backend, device, dtype=dtype, log_state=self._auto_log)

    def forward(
        self, x: torch.Tensor, *, backend: str | None = None, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Self-attention over ``x [B, N, C]`` (float) -> ``[B, N, C]``.

        Args:
            x: tokens.
            backend: a resolved backend (``"xformers"``, ``"sdpa"`` or ``"math"``) chosen by the
                caller; ``None`` resolves this module's ``attn_backend`` against ``x.device``.
            return_attention: also return the softmax weights ``[B, H, N, N]`` (forces ``math``).
        """
        if x.dim() != 3:
            raise ValueError(f"Attention expects x of shape [B, N, C], got {tuple(x.shape)}")
        B, N, C = x.shape
        H = self.num_heads
        if backend is None:
            backend = "math" if return_attention else self.resolve_backend(x.device, attention_compute_dtype(x))
        if return_attention:
            backend = "math"
        p = self.attn_drop.p if self.training else 0.0
        qkv = self.qkv(x).reshape(B, N, 3, H, C // H)  # [B, N, 3, H, Dh]
        if backend == "xformers":
            xops, _ = _xformers_import()
            q, k, v = qkv.unbind(2)  # [B, N, H, Dh] each
            out = xops.memory_efficient_attention(q, k, v, p=p, scale=self.scale).reshape(B, N, C)
            attn = None
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh] each
            if backend == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
                attn = None
            elif backend == "math":
                out, attn = math_attention(q, k, v, self.scale, p)
            else:
                raise ValueError(f"backend must be 'xformers', 'sdpa' or 'math', got {backend!r}")
            out = out.transpose(1, 2).reshape(B, N, C)
        out = self.proj_drop(self.proj(out))
        if return_attention:
            return out, attn
        return out

    def forward_packed(self, x: torch.Tensor, seqlens: Sequence[int], *, backend: str) -> torch.Tensor:
        """Self-attention over sequences packed along tokens: ``x [1, T, C]`` -> ``[1, T, C]``.

        ``backend="xformers"`` runs one block-diagonal call; ``"sdpa"``/``"math"`` loop over the
        sequences (reference). See :func:`packed_attention`.
        """
        if x.dim() != 3 or x.shape[0] != 1:
            raise ValueError(f"forward_packed expects x of shape [1, T, C], got {tuple(x.shape)}")
        _, T, C = x.shape
        H = self.num_heads
        p = self.attn_drop.p if self.training else 0.0
        q, k, v = self.qkv(x).reshape(1, T, 3, H, C // H).unbind(2)  # [1, T, H, Dh] each
        out = packed_attention(q, k, v, seqlens, self.scale, backend, p).reshape(1, T, C)
        return self.proj_drop(self.proj(out))
