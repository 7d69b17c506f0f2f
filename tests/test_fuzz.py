"""Property-based fuzzing: no input makes the parsers and validators fail with anything but
a :class:`LorettaError` subclass.

Extends what tests/test_formats.py (raw config bytes, damaged adapter directories) and
tests/test_tt.py (core shape lists of float tensors) already fuzz: config dataclasses from
random dicts, structured adapter configs through ``rank_for``/``scale_for``, the safetensors
index and header parsers on disk, the TT validators with hostile types (ints, bools, None,
strings, non-tensors, batched cores) and the option parsers (sizes, dtypes, devices, merge
specs).
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loretta_merge import tt
from loretta_merge.errors import LorettaError

FUZZ = settings(max_examples=80, deadline=None, derandomize=True,  # CI sees the same examples
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_scalar = (st.none() | st.booleans() | st.integers(-5, 70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=6))
_json = st.recursive(_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=10)


def only_loretta_errors(fn, *args, **kwargs):
    """Call ``fn``; a LorettaError is a fine answer, anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except LorettaError as exc:
        assert str(exc), "a LorettaError must say something"
        return None


# --------------------------------------------------------------------------- config dataclasses

def _field_names(cls) -> list[str]:
    from dataclasses import fields

    return [f.name for f in fields(cls)]


@FUZZ
@given(method=st.sampled_from(["rep", "adp"]), data=st.data())
def test_config_from_dict_random_fields(method, data):
    from loretta_merge.adapters.config import AdpConfig, RepConfig, config_from_dict

    cls = RepConfig if method == "rep" else AdpConfig
    names = _field_names(cls) + ["method", "peft_type", "unknown_field"]
    keys = data.draw(st.lists(st.sampled_from(names), max_size=6, unique=True))
    values = {k: data.draw(_json | st.lists(st.text(max_size=8), max_size=3)
                           | st.dictionaries(st.text(max_size=8), st.integers(-2, 9), max_size=2))
              for k in keys}
    cfg = only_loretta_errors(cls.from_dict, values)
    if cfg is not None:  # a config that was accepted must satisfy its own rules
        assert isinstance(cfg.tensor_rank, int) and not isinstance(cfg.tensor_rank, bool)
        assert cfg.tensor_rank >= 1
    values["method"] = data.draw(st.sampled_from(["rep", "adp", "lora", None, 3]))
    only_loretta_errors(config_from_dict, values)


@FUZZ
@given(mode_shapes=_json, target_modules=_json | st.lists(st.text(max_size=5), max_size=3))
@example(mode_shapes={"\u00b9": None}, target_modules=[])  # "¹".isdigit(), but int() fails
def test_config_mode_shapes_and_targets(mode_shapes, target_modules):
    from loretta_merge.adapters.config import RepConfig

    only_loretta_errors(RepConfig, mode_shapes=mode_shapes)
    only_loretta_errors(RepConfig, target_modules=target_modules)


# --------------------------------------------------------------------------- adapter config fields

@FUZZ
@given(peft_type=st.sampled_from(["LORETTA_REP", "LORETTA_ADP", "LORA", "BOTTLENECK", "X"]),
       fields=st.dictionaries(st.sampled_from(["r", "lora_alpha", "use_rslora", "rank_pattern",
                                               "alpha_pattern", "module_scales", "tensor_rank"]),
                              _json, max_size=5),
       module=st.text(max_size=30) | st.sampled_from(["model.layers.0.self_attn.q_proj", "q_proj"]))
def test_parse_config_then_rank_and_scale(peft_type, fields, module):
    from loretta_merge.formats import parse_config, rank_for, scale_for

    text = json.dumps({"peft_type": peft_type, **fields})
    cfg = only_loretta_errors(parse_config, text)
    if cfg is None:
        return
    r = only_loretta_errors(rank_for, cfg, module)
    if r is not None:
        assert isinstance(r, int) and r >= 1
    s = only_loretta_errors(scale_for, cfg, module)
    if s is not None:
        assert math.isfinite(s)


# --------------------------------------------------------------------------- checkpoint index / header

_shard_names = st.sampled_from(["model-00001-of-00001.safetensors", "../x.safetensors", "/etc/passwd",
                                "missing.safetensors", "", ".", "sub/../model-00001-of-00001.safetensors",
                                "config.json"]) | st.text(max_size=12)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-index")
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4)}, str(root / "model-00001-of-00001.safetensors"))
    return root


def _index(values):
    return st.one_of(
        _json,
        st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from(["a", "b", "c"]) | st.text(max_size=4),
                                                             values, max_size=4)},
                              optional={"metadata": _json}))


@FUZZ
@given(index=_index(_shard_names))
def test_checkpoint_reader_random_index(ckpt_root, index):
    _try_index(ckpt_root, index)


@FUZZ
@given(index=st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from(["a", "b"]),
                                                                  _shard_names | _scalar, max_size=3)
                                    | _json}))
def test_checkpoint_reader_non_string_shard_names(ckpt_root, index):
    _try_index(ckpt_root, index)


def _try_index(ckpt_root: Path, index) -> None:
    from loretta_merge.io import INDEX_NAME, CheckpointReader

    with tempfile.TemporaryDirectory(dir=ckpt_root) as tmp:
        d = Path(tmp) / "model"
        d.mkdir()
        (d / "model-00001-of-00001.safetensors").write_bytes(
            (ckpt_root / "model-00001-of-00001.safetensors").read_bytes())
        (d / INDEX_NAME).write_text(json.dumps(index))
        reader = only_loretta_errors(CheckpointReader, d)
        if reader is not None:
            with reader:
                for key in reader.keys():  # what was accepted must be readable
                    assert tuple(reader.get(key).shape) == reader.shape(key)
                    assert reader.shard_of(key) == "model-00001-of-00001.safetensors"


@FUZZ
@given(header=_json | st.dictionaries(st.sampled_from(["a", "__metadata__"]) | st.text(max_size=3),
                                      st.fixed_dictionaries({}, optional={"dtype": _scalar, "shape": _json,
                                                                          "data_offsets": _json}),
                                      max_size=3),
       length_delta=st.integers(-4, 4), tail=st.binary(max_size=40))
def test_safetensors_header_random(ckpt_root, header, length_delta, tail):
    from loretta_merge.io import read_safetensors_header

    raw = json.dumps(header).encode()
    data = struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + tail
    with tempfile.NamedTemporaryFile(dir=ckpt_root, suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        out = only_loretta_errors(read_safetensors_header, Path(f.name))
    if out is not None:
        assert isinstance(out, dict)


# --------------------------------------------------------------------------- TT validators

_dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                           torch.bool, torch.complex64, torch.uint8])
_core = st.builds(lambda shape, dt: torch.zeros(tuple(shape), dtype=dt),
                  st.lists(st.integers(0, 4), min_size=0, max_size=5), _dtypes)
_not_tensor = st.none() | st.integers() | st.text(max_size=3) | st.lists(st.integers(0, 3), max_size=3)
_dim = (st.integers(-3, 70) | st.booleans() | st.none() | st.floats(allow_nan=True) | st.text(max_size=3)
        | st.just(2**70))


@FUZZ
@given(cores=st.lists(_core | _not_tensor, max_size=4) | _not_tensor | _core,
       rows=_dim, cols=_dim, batched=st.booleans())
def test_tt_validators_hostile_types(cores, rows, cols, batched):
    ranks = only_loretta_errors(tt.validate_cores, cores, batched=batched)
    if ranks is not None:
        assert ranks[0] == 1 and ranks[-1] == 1
    fn = tt.reconstruct_batched if batched else tt.reconstruct
    out = only_loretta_errors(fn, cores, rows, cols)
    if out is not None:
        assert out.shape[-2:] == (rows, cols)


@FUZZ
@given(modes=st.lists(st.integers(1, 4), min_size=2, max_size=4), rank=st.integers(1, 3),
       batch=st.integers(1, 3), chop=st.integers(0, 3), dt=_dtypes)
def test_tt_batched_cores_with_one_bad_core(modes, rank, batch, chop, dt):
    """Well-formed batched TTs with one core's batch size or rank changed are refused."""
    ranks = tt.tt_ranks(modes, rank)
    cores = [torch.zeros(batch, ranks[k], n, ranks[k + 1], dtype=dt) for k, n in enumerate(modes)]
    k = chop % len(cores)
    c = cores[k]
    cores[k] = torch.zeros(c.shape[0] + 1, *c.shape[1:], dtype=dt)
    rows = math.prod(modes[: len(modes) // 2])
    cols = math.prod(modes) // rows
    assert only_loretta_errors(tt.reconstruct_batched, cores, rows, cols) is None


@FUZZ
@given(n=_dim, n_modes=_dim, shapes=st.sampled_from(["paper", "auto", "PAPER", "", "x"]),
       rank=_dim, eps=st.none() | st.floats(allow_nan=True) | st.integers(-1, 2))
def test_tt_helpers_hostile_numbers(n, n_modes, shapes, rank, eps):
    assume(not (isinstance(n, int) and not isinstance(n, bool) and n > 10**7))  # factorize is exact: keep it quick
    only_loretta_errors(tt.factorize, n, n_modes if n_modes is None or isinstance(n_modes, int) else n_modes)
    only_loretta_errors(tt.matrix_modes, n, rank, shapes=shapes)
    only_loretta_errors(tt.tt_ranks, [2, 3, 2], rank)
    only_loretta_errors(tt.tt_svd, torch.ones(2, 3, 2, dtype=torch.float64), [2, 3, 2], max_rank=rank
                        if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 else None, eps=eps)


@FUZZ
@given(modes=st.none() | st.floats() | st.integers(-2, 5) | st.just([2, "3"]),
       rank=st.none() | st.floats() | st.text(max_size=2))
def test_tt_counting_helpers_hostile_types(modes, rank):
    only_loretta_errors(tt.tt_num_params, [2, 3, 2], rank)
    only_loretta_errors(tt.tt_num_params, modes, 2)
    only_loretta_errors(tt.tt_svd, torch.ones(2, 3, 2, dtype=torch.float64), modes)


# --------------------------------------------------------------------------- option parsers

@FUZZ
@example(text=float("nan"))
@example(text=float("inf"))
@given(text=st.text(max_size=12) | st.sampled_from(["5GB", "-1", "1e400", "nan", "0", "2GiB", "1.5 MB",
                                                     "10**9", "inf"]) | st.integers(-5, 10**12)
       | st.floats(allow_nan=True))
def test_parse_size_random_with_floats(text):
    from loretta_merge.io import parse_size

    size = only_loretta_errors(parse_size, text)
    if size is not None:
        assert isinstance(size, int) and size > 0


@FUZZ
@given(text=st.text(max_size=12) | st.sampled_from(["5GB", "-1", "1e400", "nan", "0", "2GiB", "1.5 MB",
                                                     "10**9", "inf", "NaNGB", "infKB"]) | st.integers(-5, 10**12))
def test_parse_size_random_text(text):
    from loretta_merge.io import parse_size

    size = only_loretta_errors(parse_size, text)
    if size is not None:
        assert isinstance(size, int) and size > 0


@FUZZ
@given(text=st.text(max_size=10) | st.sampled_from(["int7", "fp8", "float16", "bf16", "auto", "cuda:x",
                                                     "cuda:99", "tpu", "mps", "CPU", "cuda:-1"]))
def test_parse_dtype_and_device_random(text):
    from loretta_merge.io import parse_dtype, resolve_device

    only_loretta_errors(parse_dtype, text)
    dev = only_loretta_errors(resolve_device, text)
    if dev is not None:
        assert dev.type == "cpu" or torch.cuda.is_available()


@FUZZ
@given(specs=st.lists(st.text(alphabet="ab+:.0123456789-/e", max_size=14), min_size=0, max_size=3))
def test_merge_spec_random(specs):
    from loretta_merge.commands.merge import parse_merge_spec

    out = only_loretta_errors(parse_merge_spec, specs)
    if out is not None:
        _, adapters = out
        assert adapters and all(a for a, _ in adapters)
