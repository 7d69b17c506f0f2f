"""LoRETTA adapters inside a PyTorch model.

- :mod:`.config`: :class:`RepConfig` / :class:`AdpConfig` and the per-family default targets
  (pure Python: reading a config never imports torch);
- :mod:`.layers`: the TT, rep and adp ``nn.Module`` layers;
- :mod:`.inject`: :func:`get_loretta_model` wraps a transformers model's targeted modules;
- :mod:`.files`: :func:`save_loretta_adapter`, :func:`load_loretta_model`,
  :func:`adapter_from_model`, :func:`merge_loretta_model`.

The config names are imported with the package; the torch-backed names on first use, so that
``from loretta_merge.adapters import RepConfig`` stays as light as the config itself.
"""

from .config import AdpConfig, RepConfig, config_from_dict

_TORCH_NAMES = {
    "get_loretta_model": "inject",
    "trainable_parameters": "inject",
    "adapter_from_model": "files",
    "save_loretta_adapter": "files",
    "load_loretta_model": "files",
    "merge_loretta_model": "files",
}

__all__ = ["AdpConfig", "RepConfig", "config_from_dict", *_TORCH_NAMES]


def __getattr__(name: str):
    module = _TORCH_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
