"""Streaming merge of adapters into a base checkpoint.

``plan`` maps every adapter module onto a base tensor (or onto the task model the adapter
was trained on) and checks every shape without reading a weight; ``run`` streams the base
one tensor at a time through the ``kernel`` (fp32 update, one cast, a range check) into
output shards; ``finish`` writes config, side files and provenance; ``verify`` compares the
result with base + adapter in memory. :func:`merge` does the three in one atomic output.
An input may also be a fully fine-tuned checkpoint of the base (``full``: its task vector
``W_i - W0``, read tensor by tensor beside the base).
"""

from .api import MergeReport, merge
from .finish import PROVENANCE_NAME
from .kernel import BLOCK_ELEMS
from .plan import MergePlan, Op, OpKind, OutputTensor, build_plan
from .verify import VERIFY_TOLERANCE, verify_merge

__all__ = ["BLOCK_ELEMS", "MergePlan", "MergeReport", "Op", "OpKind", "OutputTensor",
           "PROVENANCE_NAME", "VERIFY_TOLERANCE", "build_plan", "merge", "verify_merge"]
