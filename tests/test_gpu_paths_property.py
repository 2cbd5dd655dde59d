"""Property test of the two paths to GPU memory, run on the CPU through their host stand-ins:
the pinned staging ring (a host copy engine; pieces copied one by one or whole requests placed
by a batched move) and the GPU Direct Storage plan (O_DIRECT into a
host bulk buffer, the host twins of the move and conversion kernels). Random checkpoints of
several files (random dtypes, shapes and start offsets), random selections of whole tensors
and of dimension-0 rows (out of file order, repeated), random buffer sizes and conversions:
every tensor must be the reference's bytes (or torch's .to() of them), 256-byte aligned.

Derandomized with a fixed example count for CI; FST_FUZZ_EXAMPLES=N raises the count (and
explores new random examples on every run).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safetensors.torch import load_file

import fst
from fst import _core
from checkpoints import assert_same_bits, load_conversion, raw_bytes, write

_EXAMPLES = os.environ.get("FST_FUZZ_EXAMPLES")
PROPERTY = settings(
    max_examples=int(_EXAMPLES) if _EXAMPLES else 100,
    derandomize=not _EXAMPLES,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
         "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I32": torch.int32,
         "U8": torch.uint8, "I64": torch.int64, "BOOL": torch.bool}
FLOATS = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"]
PAGE = 4096

tensor_spec = st.tuples(st.sampled_from(list(TORCH)),
                        st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple))
file_spec = st.tuples(st.integers(0, 9),  # bytes of prefix: shifts every tensor of the file
                      st.lists(tensor_spec, min_size=1, max_size=8))


@st.composite
def cases(draw):
    files = draw(st.lists(file_spec, min_size=1, max_size=3))
    names = [(f, i) for f, (_, tensors) in enumerate(files) for i in range(len(tensors))]
    picks = []
    for _ in range(draw(st.integers(1, 12))):
        f, i = draw(st.sampled_from(names))
        shape = files[f][1][i][1]
        if shape and shape[0] > 0 and draw(st.booleans()):
            first = draw(st.integers(0, shape[0] - 1))
            picks.append((f, i, first, draw(st.integers(1, shape[0] - first))))
        else:
            picks.append((f, i, 0, None))
    return {
        "files": files,
        "picks": picks,
        "seed": draw(st.integers(0, 1000)),
        "target": draw(st.sampled_from([None] + FLOATS)),
        "buffer_pages": draw(st.integers(1, 6)),
        "bulk_pages": draw(st.integers(2, 12)),
        "merge_gap": draw(st.sampled_from([0, PAGE, 1 << 20])),
        "threads": draw(st.integers(1, 3)),
        "batch_pieces": draw(st.sampled_from([1, 2, 8, 2**32 - 1])),
    }


def _expected(ref: dict, name: str, first: int, rows, target):
    t = ref[name]
    if rows is not None:
        t = t[first:first + rows]
    if target is not None and t.is_floating_point():
        t = load_conversion(t, TORCH[target])
    return t


@pytest.mark.parametrize("path_kind", ["staged", "gds"])
@PROPERTY
@given(case=cases())
def test_gpu_paths_deliver_the_reference_bytes(path_kind, case):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ref = {}
        for f, (prefix, tensors) in enumerate(case["files"]):
            entries = [(f"f{f}.t{i}", dtype, list(shape)) for i, (dtype, shape) in enumerate(tensors)]
            pad = [(f"f{f}.pad", "U8", [prefix])] if prefix else []  # shifts every later tensor
            path = write(folder / f"part{f}.safetensors", pad + entries, seed=case["seed"] + f)
            ref.update(load_file(str(path)))
        ckpt = fst.open_checkpoint(folder)
        rows = [(f"f{f}.t{i}", first, (1 << 64) - 1 if n is None else n) for f, i, first, n in case["picks"]]
        selection = ckpt.select_rows(rows)
        if case["target"] is not None:
            selection = selection.with_dtypes(case["target"], [])
        if path_kind == "staged":
            buffer_bytes = case["buffer_pages"] * PAGE
            options = _core.StagingOptions(threads=case["threads"], budget=2 * buffer_bytes, buffer_bytes=buffer_bytes,
                                           batch_pieces=case["batch_pieces"])
            pending = selection.start_staged(-1, options, sink=fst._core._testing.host_sink(copy_delay_us=5))
        else:
            options = _core.GdsOptions(threads=case["threads"], request_bytes=case["buffer_pages"] * PAGE,
                                       bulk_bytes=max(case["bulk_pages"], 2) * PAGE, merge_gap=case["merge_gap"])
            pending = selection.start_gds(-1, options)
        loaded = pending.wait()
        assert loaded.casts == []  # both stand-ins convert, as the GPU kernels do
        got = [torch.from_dlpack(t) for _, t in loaded.to_dlpack([False] * len(fst._core.DTYPE_NAMES))]
        assert len(got) == len(case["picks"])
        for (f, i, first, n), t in zip(case["picks"], got):
            name = f"f{f}.t{i}"
            want = _expected(ref, name, first, n, case["target"])
            assert t.dtype == want.dtype and tuple(t.shape) == tuple(want.shape), name
            assert t.data_ptr() % 256 == 0, name
            if case["target"] is None:
                assert raw_bytes(t) == raw_bytes(want), name
            else:
                assert_same_bits(t, want, name)
