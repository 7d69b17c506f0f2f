"""The reports an export returns, and the constants every part of the exporter shares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TASKS = ("auto", "causal-lm", "seq-cls", "feature-extraction")
ONNX_NAME = "model.onnx"
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
QUANTIZE_CHOICES = ("int8",)
PROVIDERS = ("auto", "cpu", "cuda")
# default tolerances by dtype: pass when |onnx - torch| <= atol + rtol * |torch| everywhere
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2), "bfloat16": (5e-2, 5e-2)}
# int8 (dynamic quantization) passes when the relative error of its outputs over all kept
# positions of the probes, ||int8 - fp32|| / ||fp32|| (Frobenius), is at most this. Element-wise
# max diffs and per-position cosines are reported, not judged: one large activation dominates
# the first (MiniLM's hidden states: 12% of the largest value), near-zero logits the second.
INT8_MAX_REL_ERROR = 0.1
# a seq-cls int8 graph passes when it gives the fp32 graph's class on at least this share of
# real sentences (the --eval-file, else loretta_merge.embedded.calibration_sentences)
INT8_MIN_AGREEMENT = 0.98
INT8_TEXT_ROWS = 256
# (batch, sequence) of the probe batches; the first row of each is right-padded
PROBE_SHAPES = ((2, 7), (3, 16))
GENERATION_STEPS = 5


@dataclass
class ProbeResult:
    batch: int
    sequence: int
    max_abs_diff: float
    max_rel_diff: float     # max |onnx - torch| / max |torch| over kept positions
    passed: bool


@dataclass
class ValidationReport:
    providers: list[str]                 # session.get_providers(): what actually ran
    atol: float
    rtol: float
    max_abs_diff: float
    max_rel_diff: float
    probes: list[ProbeResult]
    passed: bool
    generation_tokens_onnx: list[list[int]] | None = None
    generation_tokens_torch: list[list[int]] | None = None
    generation_match: bool | None = None
    generation_max_abs_diff: float | None = None   # last-position logits over the cached steps
    requested_providers: list[str] | None = None   # what was asked for
    fallback: bool = False                         # CUDA asked for, CPU ran
    adapter: str | None = None                     # the switchable adapter active, if any


@dataclass
class QuantizeReport:
    """int8 quantization: agreement of the int8 graph with the fp32 one.

    Judged on real text when the model has a tokenizer (``judged_on`` says which text):
    seq-cls by ``text_agreement`` (same class as fp32) >= ``min_agreement``; causal-lm and
    feature-extraction by ``text_rel_error`` <= ``rel_error_allowed``. Without a tokenizer,
    by the probes' ``rel_error``. The probe figures are always reported."""

    method: str                          # "int8-dynamic"
    fp32_bytes: int
    int8_bytes: int
    max_abs_diff: float                  # int8 vs fp32 graph at kept positions of the probes
    max_rel_diff: float                  # max_abs_diff / max |fp32|
    rel_error: float                     # ||int8 - fp32|| / ||fp32|| over kept positions
    rel_error_allowed: float
    min_cosine: float                    # worst per-position cosine similarity
    argmax_agreement: float              # share of kept positions with the same argmax
    passed: bool
    eval_file: str | None = None
    eval_rows: int | None = None
    accuracy_fp32: float | None = None
    accuracy_int8: float | None = None
    recipe: str = ""                     # what was quantized, how
    judged_on: str = "probes"            # the text (or the random probes) that decided
    text_rows: int | None = None
    text_agreement: float | None = None  # seq-cls: same class; causal-lm: same next token
    text_rel_error: float | None = None  # ||int8 - fp32|| / ||fp32|| on the text (kept positions)
    min_agreement: float | None = None   # seq-cls threshold on text_agreement


@dataclass
class SwitchableReport:
    """One switchable adapter: its file, its tensors and its validation."""

    name: str
    source: str
    method: str
    file: str
    file_bytes: int
    tensor_bytes: int
    tensors: int
    validation: ValidationReport | None = None


@dataclass
class BankReport:
    """An adapter bank: its slots, its size in bytes, and the checks run at export."""

    size: int                            # slots
    slots: list[str | None]              # the adapter in each slot at export, or None
    modules: int                         # banked projections
    tensors: int                         # bank inputs of the graph
    bank_bytes: int                      # every bank tensor, all slots (the graph's dtype)
    bytes_per_slot: int
    slot_validation: list[ValidationReport] = field(default_factory=list)  # one per filled slot
    mixed_rows: list[int] | None = None  # the slot of each row of the mixed-batch check
    mixed_max_abs_diff: float | None = None   # each row vs that row alone, merged, in PyTorch
    mixed_passed: bool | None = None


@dataclass
class ExportReport:
    onnx_path: str
    task: str
    exporter: str                        # "dynamo" or "torchscript"
    exporter_note: str | None            # why the fallback was used, if it was
    opset: int
    dtype: str
    with_past: bool
    adapter: str | None
    external_data: bool
    files: list[str]
    num_parameters: int
    weight_bytes: int
    export_seconds: float
    inputs: list[str]
    outputs: list[str]
    validation: ValidationReport | None = None
    validate_seconds: float | None = None
    adapter_merged: bool = False         # a rep --adapter folded into the weights first
    switch_layout: str | None = None     # "tt" or "factors" with switchable adapters
    switchable: list[SwitchableReport] = field(default_factory=list)
    quantize: QuantizeReport | None = None
    bank: BankReport | None = None

    def to_dict(self) -> dict:
        return asdict(self)
