"""Safe loading of an adapter directory's files: existence, symlinks, and weights read
without running code (safetensors, or ``torch.load(weights_only=True)``; a pickle that needs
more is refused unless ``allow_unsafe_pickle``, which fully unpickles it: trusted files only).
Paths named inside a config are information only and never opened.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import FormatError, UnsafeInputError
from .common import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, parse_config


def _check_link(path: Path, root: Path, allow_symlinks: bool) -> None:
    if allow_symlinks or not path.is_symlink():
        return
    target = path.resolve()
    if not target.is_relative_to(root.resolve()):
        raise UnsafeInputError(f"{path} is a symlink to {target}, outside the adapter directory {root}; "
                               f"copy the file in, or pass allow_symlinks=True if you trust it")


def adapter_files(path: Path, allow_symlinks: bool) -> tuple[Path, Path]:
    """The config and weights files of an adapter directory (existence and symlinks checked)."""
    if not path.exists():
        raise FormatError(f"adapter directory {path} does not exist; pass the path of an adapter "
                          f"directory (the one that holds {CONFIG_NAME})")
    if not path.is_dir():
        raise FormatError(f"{path} is not a directory; pass the adapter directory that holds {CONFIG_NAME}")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FormatError(f"{path} has no {CONFIG_NAME}; is this an adapter directory? Pass the directory "
                          f"that holds {CONFIG_NAME} and the adapter weights")
    _check_link(config_path, path, allow_symlinks)
    for name in (SAFETENSORS_NAME, BIN_NAME):
        weights = path / name
        if weights.is_file():
            _check_link(weights, path, allow_symlinks)
            return config_path, weights
    raise FormatError(f"{path} has no {SAFETENSORS_NAME} or {BIN_NAME}; the adapter weights are missing; copy the weights file into the directory, or re-save the adapter")


def read_config(config_path: Path) -> dict:
    try:
        data = config_path.read_bytes()
    except OSError as exc:
        raise FormatError(f"cannot read {config_path}: {exc}; fix its permissions or re-save the adapter") from None
    return parse_config(data, source=str(config_path))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError (corrupt header, truncated data), OSError
        raise FormatError(f"{path}: not a readable safetensors file ({exc}); "
                          f"the file is truncated or corrupt, re-save or re-download it") from None


def _load_bin(path: Path, *, allow_unsafe_pickle: bool, mmap: bool = False) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Weights only load failed" in msg and ("GLOBAL" in msg.upper() or "Unsupported" in msg):
            if not allow_unsafe_pickle:
                first = msg.split("\n")[0][:300]
                raise UnsafeInputError(
                    f"{path}: loading needs full unpickling, which can run arbitrary code ({first}); "
                    f"convert it to safetensors in a trusted environment, or pass "
                    f"allow_unsafe_pickle=True only if you trust its author") from None
            state = torch.load(str(path), map_location="cpu", weights_only=False)
        else:
            raise FormatError(f"{path}: not a readable torch checkpoint ({msg.splitlines()[0][:200]}); "
                              f"the file is corrupt or not a state dict; re-download it, or re-save it as safetensors") from None
    except Exception as exc:  # zip errors, EOF on truncation
        raise FormatError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); the file is truncated or corrupt; re-download or re-save it") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise FormatError(f"{path}: expected a dict of tensor name -> tensor, got {type(state).__name__}; re-save the adapter as safetensors")
    return state


def load_weights(path: Path, *, allow_unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        return _load_safetensors(path)
    return _load_bin(path, allow_unsafe_pickle=allow_unsafe_pickle)


def weight_keys(path: Path) -> list[str]:
    """Tensor names without loading the data (safetensors header; memory-mapped .bin)."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:
            raise FormatError(f"{path}: not a readable safetensors file ({exc}); "
                              f"the file is truncated or corrupt; re-save or re-download it") from None
    try:
        return list(_load_bin(path, allow_unsafe_pickle=False, mmap=True))
    except FormatError:  # mmap needs the zip format; old-style pickles load in full
        return list(_load_bin(path, allow_unsafe_pickle=False))

