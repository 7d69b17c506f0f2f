"""The one matcher for PEFT's ``rank_pattern`` / ``alpha_pattern``, used by training
(:mod:`config`), reading (:mod:`formats`) and converting (:mod:`converters`).

Semantics are PEFT's, read from ``peft.utils.other.get_pattern_key`` (peft 0.21) and how
``peft.tuners.lora.model`` uses it: the keys are tried in the mapping's order and the FIRST
key for which ``re.match(rf"(.*\\.)?({key})$", module_name)`` succeeds wins, i.e. the key is a
regular expression that must match the whole module name or a dot-separated tail of it.
Not the longest key, not a substring. ``module_name`` is the name in the model the adapter
is applied to (``model.layers.0.self_attn.q_proj``), without PEFT's ``base_model.model.``.
Example: with ``{"q_proj": 4, "layers.0.self_attn.q_proj": 16}`` every ``q_proj``,
layer 0's included, gets 4, because ``q_proj`` comes first.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .errors import ConfigError


def pattern_key(patterns: Mapping[str, Any], module_name: str, *,
                field_name: str = "rank_pattern") -> str | None:
    """The key of ``patterns`` that applies to ``module_name`` under PEFT's rule, or None.
    An invalid regular expression is a :class:`ConfigError` naming ``field_name``."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module_name):
                return key
        except (re.error, TypeError) as exc:
            raise ConfigError(f"{field_name} key {key!r} is not a valid regular expression ({exc}); "
                              f"use a module name or suffix such as 'q_proj'") from None
    return None


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any, *,
                  field_name: str = "rank_pattern") -> Any:
    """``patterns[key]`` for the key :func:`pattern_key` picks, else ``default``."""
    key = pattern_key(patterns, module_name, field_name=field_name)
    return default if key is None else patterns[key]


def check_patterns(patterns: Mapping[str, Any], *, field_name: str) -> None:
    """Every key of ``patterns`` is a string and a valid regular expression."""
    for key in patterns:
        try:
            re.compile(rf"(.*\.)?({key})$")
        except (re.error, TypeError) as exc:
            raise ConfigError(f"{field_name} key {key!r} is not a valid regular expression ({exc}); "
                              f"use a module name or suffix such as 'q_proj'") from None
