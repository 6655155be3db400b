"""State-dict checkpoints: safetensors (or torch.save files loaded with `weights_only=True`), with sha256.

A checkpoint is written to a temporary name and renamed, so a crash never leaves half a file under
the final name, and a failed write never replaces a good checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import pickle

import torch

from raykd.pipeline.core.errors import CheckpointError
from raykd.pipeline.core.records import sha256_file


def save_state_dict(state: dict[str, torch.Tensor], path: str) -> str:
    """Atomically write `state` as safetensors; returns the file's sha256."""
    from safetensors.torch import save_file

    from raykd.pipeline.core.records import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
    return sha256_file(path)


def read_verified(path: str, expected_sha256: str | None = None) -> bytes:
    """A checkpoint file's bytes, checked against its recorded sha256. Stages ship these bytes to their
    actors and workers through Ray (so no node needs the driver's disk) and parse them there."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    with open(path, "rb") as f:
        data = f.read()
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise CheckpointError(
                f"checkpoint {path} does not match its recorded sha256 (expected {expected_sha256[:12]}…, "
                f"found {actual[:12]}…): it was changed or corrupted"
            )
    return data


def state_from_bytes(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """Parse a state dict from safetensors bytes or a torch.save file's bytes (weights only); `name` is
    the checkpoint's path, for messages (and to tell the two formats apart)."""
    import io

    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load

            state = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure means the file is not a usable checkpoint
        if isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e):
            # torch's message is a page of advice on trusting the file; the one fact that matters here:
            raise CheckpointError(f"checkpoint {name} is refused: it holds pickled Python objects beyond tensors, "
                                  "and raykd loads checkpoints with torch.load(weights_only=True) only (save a "
                                  "state_dict, or convert it to .safetensors)") from None
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"checkpoint {name} is not readable: {e.__class__.__name__}: {first}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint: take its model part
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {name} is not a state dict of tensors")
    return state


def load_state_dict(path: str, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch.save file (weights only), checking its sha256."""
    return state_from_bytes(read_verified(path, expected_sha256), path)


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str, arch: str) -> None:
    """Load strictly; a key or shape mismatch names the checkpoint and the architecture."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1:3]
        raise CheckpointError(f"checkpoint {path} does not fit arch {arch!r}: {' '.join(s.strip() for s in first)}") from None


def resolve_checkpoint(ref: str) -> str:
    """A checkpoint's file: `ref` itself, or a model source's cached weights (`torchvision:<Weights>.<NAME>`,
    `timm:<name>`: pipeline/models/sources.py). raykd never downloads: weights not in the cache are an error."""
    from raykd.pipeline.models.sources import resolve_checkpoint as resolve

    return resolve(ref)


def map_keys(state: dict[str, torch.Tensor], key_map: dict[str, str | None]) -> dict[str, torch.Tensor]:
    """Rename a foreign state dict's keys by prefix: the first matching rule {old prefix: new prefix}
    applies; a rule to None drops the key (e.g. {"module.": "", "head.": None})."""
    out = {}
    for k, v in state.items():
        for old, new in key_map.items():
            if k.startswith(old):
                k = None if new is None else new + k[len(old):]
                break
        if k is not None:
            out[k] = v
    return out


def load_foreign(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str, arch: str,
                 key_map: dict[str, str | None] | None = None) -> None:
    """A checkpoint made outside raykd (or by it): keys mapped, then loaded strictly; a wrapped model
    (torchvision:, timm:, module:factory) takes the wrapped net's own keys (or raykd's `net.`-prefixed ones)."""
    from raykd.pipeline.models.sources import TappedModel

    state = map_keys(state, key_map or {})
    if isinstance(model, TappedModel) and not all(k.startswith("net.") for k in state):
        load_into(model.net, state, path, arch)
    else:
        load_into(model, state, path, arch)
