"""Encoder weights: find them (a file, a Hugging Face snapshot folder, the hub), read them as data
only, and load them into an architecture with its keys matched, or say which keys do not fit.

Files: safetensors, a state dict (``.pt``/``.pth``/``.bin``), a (Lightning) checkpoint, or an
encoder exported by her2lab (:func:`save_encoder`, the spec in its metadata). Pickles are read
with torch's weights-only loader: a file that would run code is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from her2lab.checkpoint import data_only, unsafe_global
from her2lab.errors import Her2labError
from her2lab.io import atomic_path

log = logging.getLogger(__name__)

#: Prefixes stripped from checkpoint keys (Lightning modules, DDP, common wrappers).
KEY_PREFIXES = (
    "model.encoder.", "encoder.", "model.model.", "model.", "module.", "backbone.", "net.",
    "model.features.", "features.", "encoder.model.",
)


class WeightsError(Her2labError):
    """Encoder weights cannot be found or do not fit the architecture."""


#: Weight files of a Hugging Face snapshot folder, in the order they are looked for
#: (``pytorch_model_vision.bin``: CONCH v1.5's repository holds only that).
SNAPSHOT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model_vision.bin")


def weights_file(path: Path, what: str = "weights") -> Path:
    """``path`` itself, or for a folder (a Hugging Face snapshot as the authors distribute it) its
    weights file: the first of :data:`SNAPSHOT_FILES` it holds, else its one ``.safetensors``,
    ``.bin``, ``.pth`` or ``.pt`` file."""
    if not path.is_dir():
        return path
    for name in SNAPSHOT_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt") and p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise WeightsError(f"{what}: folder {path} holds no weights file ({', '.join(SNAPSHOT_FILES)}); "
                           "point backbone.weights at the model's snapshot folder or its weights file")
    raise WeightsError(f"{what}: folder {path} holds {len(found)} weights files ({', '.join(p.name for p in found[:4])}); "
                       "point backbone.weights at the one to use")


def hf_hub_weights(repo_id: str, what: str) -> Path:
    """The weights file of Hugging Face repository ``repo_id``, downloaded with the user's token
    (or found in the local cache); a gated or unreachable repository is one line saying what to do."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = (f"offline: download the files of https://huggingface.co/{repo_id} (e.g. `hf download {repo_id} "
               f"--local-dir <folder>`) and set backbone.weights=<folder>")
    for name in SNAPSHOT_FILES:
        try:
            return Path(hf_hub_download(repo_id, name))
        except GatedRepoError:
            raise WeightsError(f"{what}: {repo_id} is gated; request access at https://huggingface.co/{repo_id}, "
                               f"log in (`hf auth login` or HF_TOKEN) and retry; or, {offline}") from None
        except RepositoryNotFoundError:
            raise WeightsError(f"{what}: no Hugging Face repository {repo_id} (or no access to it); "
                               f"check backbone.hf_hub_id; or, {offline}") from None
        except LocalEntryNotFoundError:
            raise WeightsError(f"{what}: {repo_id} is not in the local Hugging Face cache and the hub cannot be "
                               f"reached; {offline}") from None
        except EntryNotFoundError:
            continue
    raise WeightsError(f"{what}: {repo_id} has none of {', '.join(SNAPSHOT_FILES)}; {offline}")


def read_state_dict(path: Path, what: str = "weights") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata from a safetensors file, a state dict or a (Lightning) checkpoint."""
    if not path.is_file():
        raise WeightsError(f"{what}: weights file {path} not found; check backbone.weights")
    meta: dict = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        else:

            with data_only():  # weights-only: a file that would run code while read is refused
                obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                meta = {k: v for k, v in obj.items() if isinstance(v, str | int | float)}
                obj = obj["state_dict"]
            elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
                obj = obj["model"]
            if not isinstance(obj, dict):
                raise WeightsError(f"{what}: {path} holds a {type(obj).__name__}, not a state dict")
            state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    except WeightsError:
        raise
    except Exception as exc:

        if unsafe_global(exc):
            raise WeightsError(f"{what}: {path} refused: it holds objects beyond tensors ({unsafe_global(exc)}), and "
                               "loading it could run code; use a .safetensors file or a plain state dict you trust") from None
        raise WeightsError(f"{what}: {path} is not a readable weights file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    return state, meta


def load_weights(model: nn.Module, path: Path, what: str = "weights", convert=None) -> None:
    """Load ``path`` into ``model``; report mismatched keys by name.

    Keys are matched after stripping common prefixes (``model.encoder.``, ``module.`` …);
    classifier-head keys the headless encoder does not have are ignored. ``convert(state, model)``
    (a source's converter from a published layout) is tried when the keys do not fit as they are.
    """
    state, _ = read_state_dict(path, what)
    load_state(model, state, what, str(path), convert)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], what: str, where: str, convert=None) -> None:
    """Load a state dict with prefix matching; mismatches are one error naming the keys."""
    own = model.state_dict()
    fitted, problems = _fit(state, own)
    if problems and convert is not None:
        try:
            converted, still = _fit(convert(dict(state), model), own)
        except Exception as exc:  # the converter met a layout it does not know: report the file's keys
            log.debug("%s: converting %s failed (%s)", what, where, exc)
        else:  # report whichever reading of the file fits the model better
            if not still or len(converted) > len(fitted):
                fitted, problems = converted, still
    if problems:
        raise WeightsError(f"{what}: {where} does not fit the architecture: {'; '.join(problems)}; check backbone.name")
    model.load_state_dict(fitted)


def _fit(state: dict, own: dict) -> tuple[dict, list[str]]:
    """The file's tensors the model takes, and what does not fit (empty when all does)."""
    state = _match_prefix(state, own)
    head = {k for k in state if k not in own and _is_head_key(k)}
    unexpected = sorted(k for k in state if k not in own and k not in head)
    missing = sorted(k for k in own if k not in state)
    shape = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s) e.g. {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s) e.g. {', '.join(unexpected[:3])}")
    if shape:
        k = shape[0]
        parts.append(f"shape mismatch at {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    return {k: v for k, v in state.items() if k in own}, parts


def _match_prefix(state: dict, own: dict) -> dict:
    """Strip the first prefix that makes the file's keys line up with the model's."""
    best, best_hits = state, sum(k in own for k in state)
    for p in KEY_PREFIXES:
        cand = {k[len(p) :] if k.startswith(p) else k: v for k, v in state.items()}
        hits = sum(k in own for k in cand)
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def _is_head_key(key: str) -> bool:
    # "pooler": a transformers model's pooling layer, which the token-pooled encoder does not use
    return key.split(".")[0] in ("fc", "head", "classifier", "heads", "last_linear", "pooler")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def stored_normalisation(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The mean/std an encoder exported by her2lab (:func:`save_encoder`) was trained with: the
    spec in its metadata; None for any other file, or one that records none."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            spec = json.loads((f.metadata() or {}).get("her2lab_backbone", "{}"))
    except Exception:  # not readable as safetensors: build_encoder's own read says why
        return None
    mean, std = spec.get("mean"), spec.get("std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def save_encoder(model: nn.Module, spec, path: Path, extra: dict | None = None) -> Path:
    """Export a headless encoder module (``create_model(spec)``'s form) as safetensors.

    The spec travels in the metadata, so the file says what it is.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"her2lab_backbone": json.dumps(spec.to_dict()), **{k: str(v) for k, v in (extra or {}).items()}}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path
