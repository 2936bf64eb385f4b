"""Checkpoints are data: every checkpoint file is read with ``torch.load(weights_only=True)``.

A pickle can run any code while it is read, so a checkpoint from elsewhere is never unpickled
freely. her2lab's checkpoints hold only tensors and plain containers (the LightningModules keep
their optimiser/scheduler factories out of the hyper-parameters), so they load under torch's
weights-only unpickler as they are. Checkpoints of earlier versions also hold Hydra's optimiser
partial and OmegaConf lists; those few types, whose unpickling only builds data, are allow-listed
(:func:`data_only`). A file that needs anything more is refused with a one-line error before any
of it is built.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from her2lab.errors import Her2labError

#: What a checkpoint must hold to resume training from it (Lightning's restore reads these).
RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "epoch", "global_step")


class CheckpointError(Her2labError):
    """A checkpoint file cannot be read as data, or does not fit the model."""


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at ``path``, read as data only (tensors, numbers, strings, containers).

    Raises:
        CheckpointError: the file is missing or not a checkpoint; it holds objects beyond plain
            data (unpickling it could run code); it has no ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={path}: no such checkpoint (runs keep theirs in <run>/checkpoints/)")
    try:
        with data_only():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = unsafe_global(exc)
        if found is None:  # bytes that are no pickle of objects at all
            raise CheckpointError(f"{path}: not a readable checkpoint (not a PyTorch file, or damaged: "
                                  f"{_unsupported(exc)}); give a .ckpt from a run's checkpoints/ folder") from None
        raise CheckpointError(
            f"{path}: refused: it holds objects beyond tensors and plain containers ({found}), "
            "and loading it could run code; give a checkpoint made by her2lab, or re-save one you trust "
            "as a plain state dict"
        ) from None
    except Exception as exc:  # a truncated file, another format: torch raises many kinds
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
                              "give a .ckpt from a run's checkpoints/ folder") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict); "
                              "give a .ckpt from a run's checkpoints/ folder")
    return ckpt


@contextlib.contextmanager
def data_only() -> Iterator[None]:
    """Weights-only loading (``torch.load``, Lightning's ``weights_only=True``) that also accepts
    the types earlier her2lab checkpoints hold in their hyper-parameters, and nothing else."""
    with torch.serialization.safe_globals(_legacy_globals()):
        yield


def _legacy_globals() -> list:
    """Hydra's partial (``_partial_: true``) of a torch optimiser and OmegaConf's list/dict nodes:
    building them from a pickle calls no code beyond their constructors and ``__setstate__``."""
    import collections
    import functools
    import typing

    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    out = [collections.defaultdict, dict, list, int, functools.partial, typing.Any, DictConfig, ListConfig,
           ContainerMetadata, Metadata, AnyNode]  # defaultdict(list) and the like, inside the nodes
    out += [v for v in vars(torch.optim).values() if isinstance(v, type) and issubclass(v, torch.optim.Optimizer)]
    try:  # Hydra ≥ 1.3.3 wraps partials in this functools.partial subclass
        from hydra._internal.target_policy import _DeferredTarget

        out.append(_DeferredTarget)
    except ImportError:
        pass
    return out


def check_fits(module: nn.Module, state: dict, path: str | Path, model: str = "the run's model") -> None:
    """A one-line error unless ``state`` has exactly ``module``'s tensors, each of its shape."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    parts = [f"{what} {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape of", shapes)) if keys]
    if parts:
        raise CheckpointError(f"{path}: does not fit {model} ({'; '.join(parts)}); "
                              "was it made by another model or encoder?")


def check_resumable(ckpt: dict, path: str | Path) -> None:
    """A one-line error unless ``ckpt`` holds what resuming a training run needs."""
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: cannot resume training from it (no {', '.join(missing)}: weights only?); "
                              "resume from a run's checkpoints/last.ckpt, or start afresh without ckpt_path")


def unsafe_global(exc: BaseException) -> str | None:
    """``GLOBAL <name>`` when torch's weights-only unpickler refused a file for naming a global
    outside the allow-list (what a pickle that runs code does), else None."""
    m = re.search(r"Unsupported global: (GLOBAL \S+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
    return m.group(1) if m else None


def _unsupported(exc: BaseException) -> str:
    """What torch's weights-only unpickler stopped at: ``GLOBAL getattr``, ``operand 110``, …"""
    m = re.search(r"Unsupported global: (GLOBAL \S+)|Unsupported operand (\d+)", str(exc))
    if m is None:
        return _first_line(exc)
    return m.group(1) or f"pickle operand {m.group(2)}"


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours parts of its messages
    return (text.splitlines() or [""])[0][:160]


#: Where the ``_target_``s of the parts evaluation builds from a run folder's config.yaml (``model``,
#: ``data``) may point: a config from elsewhere names that code, and beyond her2lab's own classes
#: and torch's optimisers (kept as partials, never called here) it could run anything.
SAFE_TARGETS = ("her2lab.", "torch.optim.")


def check_targets(rcfg: DictConfig, where: Path, extra: tuple[str, ...] | list[str] = ()) -> None:
    """A one-line error when the run's ``model`` or ``data`` names a ``_target_`` outside
    :data:`SAFE_TARGETS` (and ``allow_targets``), before anything is built from it."""
    allowed = (*SAFE_TARGETS, *(str(p) for p in extra))

    def walk(node, key: str) -> None:
        if isinstance(node, dict):
            t = node.get("_target_")
            if t is not None and not str(t).startswith(allowed):
                raise Her2labError(f"{where}: {key}._target_={t!r} is not a class of her2lab or torch.optim, and "
                                   "building it could run any code; if you trust this run, allow it with "
                                   "allow_targets=[<its module prefix>]")
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")

    for part in ("model", "data"):
        walk(OmegaConf.to_container(rcfg, resolve=False).get(part), part)
