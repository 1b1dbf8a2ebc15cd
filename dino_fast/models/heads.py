"""DINO projection head: MLP, L2 normalisation, weight-normalised linear layer to K prototypes.

State-dict keys are the official ones (``nlayers = 3``, no BatchNorm)::

    mlp.0.weight [hidden, in_dim]         mlp.0.bias [hidden]
    mlp.2.weight [hidden, hidden]         mlp.2.bias [hidden]
    mlp.4.weight [bottleneck, hidden]     mlp.4.bias [bottleneck]
    last_layer.weight_g [out_dim, 1]      last_layer.weight_v [out_dim, bottleneck]

(with ``use_bn=True`` BatchNorm layers take the odd indices after each hidden Linear, as in the
official ``nn.Sequential``). ``last_layer`` is :class:`WeightNormLinear`, which stores ``weight_g``
and ``weight_v`` as plain parameters: the same keys and numerics as the deprecated
``torch.nn.utils.weight_norm`` (``W = g * v / ||v||`` with the norm over each output row),
without its deprecation warning and without the ``parametrizations.*`` keys of its replacement.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation along the output dimension.

    ``W[o, :] = weight_g[o, 0] * weight_v[o, :] / ||weight_v[o, :]||_2``; ``forward`` maps
    ``[..., in_features]`` to ``[..., out_features]`` in the input's dtype.

    Parameters: ``weight_g [out_features, 1]``, ``weight_v [out_features, in_features]``.
    Initialisation as ``weight_norm(nn.Linear(...))`` gives it: ``weight_v`` with ``nn.Linear``'s
    default init and ``weight_g`` the row norms of ``weight_v`` (:class:`DINOHead` then fills
    ``weight_g`` with ones).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default weight init for ``weight_v``; ``weight_g = ||weight_v||`` per row."""
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.copy_(torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``[out_features, in_features]`` (differentiable in g and v)."""
        v = self.weight_v
        return v * (self.weight_g / torch.linalg.vector_norm(v, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_features]`` -> ``[..., out_features]``."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    """DINO projection head (official architecture and keys).

    ``x [B, in_dim] -> mlp -> [B, bottleneck_dim] -> L2-normalise -> last_layer -> [B, out_dim]``.

    Args:
        in_dim: backbone feature size.
        out_dim: K, the number of prototypes (65536 in DINO).
        use_bn: BatchNorm1d after each hidden Linear.
        norm_last_layer: freeze ``last_layer.weight_g`` at 1 (``requires_grad=False``).
        nlayers: Linear layers in the MLP (at least 1; 1 means ``mlp`` is a single Linear).
        hidden_dim: width of the hidden layers.
        bottleneck_dim: output size of the MLP.

    The last layer's parameter names contain ``"last_layer"`` (the trainer drops their gradients
    during the first epoch, as the official ``cancel_gradients_last_layer`` does).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False
        self.in_dim = in_dim
        self.out_dim = out_dim

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[B, in_dim]`` float -> logits ``[B, out_dim]``."""
        if x.dim() < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead expects features [..., {self.in_dim}], got {tuple(x.shape)}")
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
