"""A model directory beside its weights: the one config reader and the one side-file policy.

:func:`read_model_config` is the only place ``config.json`` is read (data only, never code).
:func:`copy_side_files` is the only policy for what an output directory inherits from its
base: every top-level file that is not a weight file (tokenizer files,
``generation_config.json``, special tokens, chat templates, ``README.md``, sentence-transformers'
``modules.json``, ``config_sentence_transformers.json``, ``sentence_bert_config.json``, ...)
and the sentence-transformers module sub-folders (``1_Pooling/``, ``2_Normalize/``,
``2_Dense/`` ...: the ones ``modules.json`` names, or named ``<n>_<Name>``), whole: their files
belong to those modules, not to the checkpoint being rewritten. Top-level weights, shard
indexes, hidden files and other sub-folders (``checkpoints/``, ``onnx/``, ``.git``) are never
copied; a symlink leading out of the directory is refused, never followed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

from ..errors import FormatError, UnsafeInputError
from .writer import output_error

CONFIG_NAME = "config.json"
# files whose bytes are (or may be) model weights: the output writes its own
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                   ".onnx", ".onnx_data", ".npz", ".pkl", ".pickle")
# files of which at least one is in a directory that holds a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "merges.txt")
_MODULE_DIR = re.compile(r"^[0-9]+_[A-Za-z][A-Za-z0-9]*$")


def has_tokenizer(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` holds a saved tokenizer (one of :data:`TOKENIZER_FILES`)."""
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def read_model_config(model_dir: str | os.PathLike, *, required: bool = False) -> dict:
    """A model directory's ``config.json`` as data: ``{}`` when absent (a FormatError
    naming the directory when ``required``); malformed JSON or a non-object is a
    FormatError naming the file. Never imports or runs anything. ``model_dir`` may also
    be the config file itself (``inspect --config llama-2-7b.json``)."""
    path = Path(model_dir) if Path(model_dir).is_file() else Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        if required:
            raise FormatError(f"{model_dir} is not a transformers model directory (no "
                              f"{CONFIG_NAME}); pass a model directory saved with save_pretrained")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise FormatError(f"{path} is not valid JSON ({exc}); fix it or re-save the model "
                          f"with save_pretrained") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object; re-save the model with save_pretrained")
    return data


def _is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def _inside(path: Path, root: Path) -> Path:
    """``path`` resolved; refused when it (a symlink) leads out of ``root``."""
    target = path.resolve()
    if target != root and root not in target.parents:
        raise UnsafeInputError(f"{path} is a symlink to {target}, outside {root}; copy the file "
                               f"into {root} (loretta-merge never follows links out of a model "
                               f"directory)")
    return target


def _module_dirs(src: Path) -> set[str]:
    """Sub-folders holding sentence-transformers modules: named in ``modules.json`` or
    named ``<n>_<Name>``."""
    names = {p.name for p in src.iterdir() if p.is_dir() and _MODULE_DIR.match(p.name)}
    try:
        modules = json.loads((src / "modules.json").read_text())
    except (OSError, ValueError):
        modules = []
    for entry in modules if isinstance(modules, list) else []:
        sub = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(sub, str) and sub and "/" not in sub and sub not in (".", ".."):
            names.add(sub)
    return {n for n in names if (src / n).is_dir() and not n.startswith(".")}


def _copy_tree(src: Path, dst: Path, root: Path) -> None:
    dst.mkdir()
    for p in sorted(src.iterdir()):
        target = _inside(p, root)
        if target.is_dir():
            _copy_tree(p, dst / p.name, root)
        elif target.is_file():
            shutil.copyfile(target, dst / p.name)


def copy_side_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *,
                    exclude: Iterable[str] = ()) -> list[str]:
    """Copy the side files of model directory ``src_dir`` into ``dst_dir`` (the policy in
    the module docstring); names in ``exclude`` (top-level file or folder names) are left
    for the caller to write. Returns the names copied (sub-folders as ``"1_Pooling/"``)."""
    src, dst = Path(src_dir), Path(dst_dir)
    root = src.resolve()
    skip = set(exclude)
    copied = []
    try:
        for p in sorted(src.iterdir()):
            if p.name.startswith(".") or p.name in skip:
                continue
            if p.is_dir():
                if p.name in _module_dirs(src):
                    _copy_tree(_inside(p, root), dst / p.name, root)
                    copied.append(p.name + "/")
            elif p.is_file() and not _is_weight(p.name):
                shutil.copyfile(_inside(p, root), dst / p.name)
                copied.append(p.name)
    except OSError as exc:
        raise output_error(exc, dst) from exc
    return copied
