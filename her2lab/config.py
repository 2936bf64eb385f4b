"""Config nodes into objects: Hydra's ``instantiate`` with her2lab's one-line errors let through."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from her2lab.errors import her2lab_cause


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``; a :class:`~her2lab.errors.Her2labError` raised
    inside a constructor comes out as itself, not wrapped in Hydra's ``InstantiationException``."""
    try:
        return instantiate(node, **kwargs)
    except Exception as exc:
        cause = her2lab_cause(exc)
        if cause is None:
            raise
        raise cause from None


def plain(node: Any) -> dict:
    """A config node (OmegaConf or a mapping) as a plain, resolved dict."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
