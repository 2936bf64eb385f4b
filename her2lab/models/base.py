"""The MIL-net face and its registry: project → attention / pooling weights → pool → classifier.

Every MIL net maps a bag of tile embeddings ``x (B, N, D)`` with a mask ``(B, N)`` (True = real
tile) to ``(logits (B, C), weights (B, N))``, the weights saying how much each tile contributed
(summing to 1 over the real tiles). :class:`MILNet` spells that out as parts the training loop,
the evaluation and the attention maps all use:

- ``project``: ``(…, N, D) → (…, N, H)``, tile by tile (a module or a method);
- ``attention_logits(h)``: ``(B, N, H) → (B, N)`` per-tile logits whose softmax over the bag are
  the weights, or ``None`` for nets whose weights are not a softmax (pooling baselines);
- ``attention(h, mask)``: the weights ``(B, N)``;
- ``pool(h, weights, mask)``: the bag embedding ``(B, H)``;
- ``classifier``: ``(…, H) → (…, C)``, also applied to single tiles for tile-score maps.

A new net subclasses :class:`MILNet`, overrides what differs, and registers itself with
``@register_mil_net("name")``; configs keep naming the class by ``_target_``.
"""

from __future__ import annotations

import torch
from torch import nn

from her2lab.errors import Her2labError
from her2lab.registry import Registry


class MILNetError(Her2labError):
    """An unknown MIL-net name, or a class that is not a :class:`MILNet`."""


class MILNet(nn.Module):
    """Base class of the MIL nets: ``forward`` composed from ``project``, ``attention``, ``pool``
    and ``classifier``. Subclasses set ``self.project`` and ``self.classifier`` (modules) and
    override ``attention_logits`` or ``attention``/``pool``; ``forward_chunked`` may be
    overridden to keep a long bag's memory bounded."""

    project: nn.Module
    classifier: nn.Module

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the net computes in (tiles are cast to it)."""
        return next(self.classifier.parameters()).dtype

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor | None:
        """Per-tile logits ``(B, N)`` of projected tiles ``h (B, N, H)``, or ``None``."""
        return None

    def attention(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weights ``(B, N)`` of projected tiles ``h (B, N, H)``: the masked softmax of the logits
        (padding gets exactly 0; an empty bag all zeros)."""
        logits = self.attention_logits(h)
        if logits is None:
            raise NotImplementedError(f"{type(self).__name__}: override attention_logits or attention")
        attn = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)  # (B, N)
        return torch.nan_to_num(attn, nan=0.0)  # an empty bag: all-zero attention, not NaN

    def pool(self, h: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The bag embedding ``(B, H)``: the weighted sum of ``h (B, N, H)``."""
        return torch.einsum("bn,bnh->bh", weights.to(h.dtype), h)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, chunk: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, N, D), ``mask`` (B, N) bool → logits (B, C or C-1), weights (B, N).

        ``x`` may be in any float dtype (e.g. float16 as stored); ``chunk``: at most this many
        tiles are projected at a time.
        """
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if chunk and x.shape[1] > chunk:
            return self.forward_chunked(x, mask, chunk)
        h = self.project(x.to(self.dtype))  # (B, N, H)
        w = self.attention(h, mask)  # (B, N)
        return self.classifier(self.pool(h, w, mask)), w

    def forward_chunked(self, x: torch.Tensor, mask: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` projecting ``chunk`` tiles at a time; this default keeps all of ``h``."""
        h = torch.cat([self.project(x[:, s : s + chunk].to(self.dtype)) for s in range(0, x.shape[1], chunk)], 1)
        w = self.attention(h, mask)  # (B, N)
        return self.classifier(self.pool(h, w, mask)), w


# No config key: configs name a net's class by ``_target_``; the names serve create_mil_net.
_MIL_NETS: Registry[type[MILNet]] = Registry("MIL net", error=MILNetError)


def register_mil_net(name: str):
    """Class decorator: register a :class:`MILNet` subclass as ``name``.

    Registering a name again replaces the class registered before.
    """

    def deco(cls: type[MILNet]) -> type[MILNet]:
        if not (isinstance(cls, type) and issubclass(cls, MILNet)):
            raise MILNetError(f"register_mil_net({name!r}): {cls!r} is not a MILNet subclass; subclass her2lab.models.base.MILNet")
        return _MIL_NETS.register(name, cls, replace=True)

    return deco


def unregister_mil_net(name: str) -> None:
    """Remove a registered net (no error if it is not there)."""
    _MIL_NETS.unregister(name)


def list_mil_nets() -> list[str]:
    """Names of the registered MIL nets, sorted."""
    return _MIL_NETS.names()


def create_mil_net(name: str, **kwargs) -> MILNet:
    """The registered net ``name`` built with ``kwargs`` (e.g. ``in_dim``, ``num_classes``)."""
    return _MIL_NETS.get(name)(**kwargs)
