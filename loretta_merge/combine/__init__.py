"""``loretta-merge combine``: several adapters into ONE new adapter.

| module | owns |
|---|---|
| ``inputs``   | reading the adapters, refusing what cannot combine, grouping by module, each input's delta |
| ``compress`` | a combined delta into LoRA factors (truncated SVD) or LoRETTA_rep cores, errors measured |
| ``api``      | :func:`combine` / :func:`combine_adapters`: the method per module, the report, the writer |
"""

from .api import CombineReport, combine, combine_adapters

__all__ = ["CombineReport", "combine", "combine_adapters"]
