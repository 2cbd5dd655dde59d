"""Builders of safetensors files, good and bad, for the parser tests, and the oracle that
compares fst with the reference implementation (the `safetensors` package) on one file.

Every builder returns the whole file as bytes; `write` puts it on disk. The case tables
(`REJECT_CASES`, `ACCEPT_CASES`) follow the accept/reject tables of
shared/reference/safetensors-format.md, one entry per trigger.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import ml_dtypes
import numpy as np

import fst

# -- builders -----------------------------------------------------------------------------

DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}  # fmt: skip
DTYPES = list(DTYPE_BITS)

# What each dtype must come out as from fst.load(framework="numpy"); F4/F6 have none.
NUMPY_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
}  # fmt: skip
# Dtypes the reference's own numpy path can materialise (it lacks bf16/fp8/sub-byte).
REFERENCE_NUMPY = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64", "C64"}


def nbytes(dtype: str, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * DTYPE_BITS[dtype] // 8


def pattern(n: int, seed: int = 0) -> bytes:
    """n deterministic, non-trivial data bytes."""
    return bytes((i * 131 + seed * 17 + 7) & 0xFF for i in range(n))


def pack(header: bytes | str, data: bytes = b"", *, n: Optional[int] = None) -> bytes:
    """8-byte little-endian length (len(header) unless `n` is given), header, data."""
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def entry(dtype: str, shape: list, begin: int, end: Optional[int] = None) -> dict:
    if end is None:
        end = begin + nbytes(dtype, shape)
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def tiled(specs: list[tuple[str, str, list[int]]], metadata: Any = None, seed: int = 0) -> tuple[dict, bytes]:
    """(header dict, data) for tensors (name, dtype, shape) laid out back to back."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    for name, dtype, shape in specs:
        header[name] = entry(dtype, shape, off)
        off += nbytes(dtype, shape)
    return header, pattern(off, seed)


def simple(header: Any, data: bytes = b"") -> bytes:
    return pack(dumps(header), data)


def write(path: Path | str, content: bytes) -> str:
    Path(path).write_bytes(content)
    return str(path)


A4 = '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'  # one F32 scalar-ish tensor
D4 = pattern(4)


def one_f32(extra: str = "", name: str = '"a"') -> bytes:
    """{"a": F32 [1] at [0, 4] plus `extra` fields in the entry} with 4 data bytes."""
    return pack('{' + name + ':{"dtype":"F32","shape":[1],"data_offsets":[0,4]' + extra + "}}", D4)


def nested(depth: int) -> str:
    """A JSON value of `depth` nested arrays."""
    return "[" * depth + "]" * depth


def many_tensors(count: int) -> bytes:
    """`count` F32 tensors (alternately [] and [1]) of 4 bytes each, built fast."""
    parts = [
        f'"model.layers.{i:07d}.self_attn.q_proj.weight":{{"dtype":"F32","shape":{"[]" if i & 1 else "[1]"},'
        f'"data_offsets":[{4 * i},{4 * i + 4}]}}'
        for i in range(count)
    ]
    header = ("{" + ",".join(parts) + "}").encode()
    header += b" " * (-len(header) % 8)
    return pack(header, np.arange(count, dtype=np.float32).tobytes())


# -- case tables ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reject:
    id: str
    content: bytes
    rule: str
    tensor: Optional[str] = None


@dataclass(frozen=True)
class Accept:
    id: str
    content: bytes


def _reject_cases() -> list[Reject]:
    c: list[Reject] = []
    add = lambda id, content, rule, tensor=None: c.append(Reject(id, content, rule, tensor))  # noqa: E731
    good = dumps({"a": entry("F32", [1], 0)})

    # header too small
    add("empty-file", b"", "header too small")
    add("7-bytes", b"\x10\0\0\0\0\0\0", "header too small")
    # header too large
    add("n-1e8-plus-1", pack(good, D4, n=100_000_001), "header too large")
    add("n-2^63", pack(good, D4, n=1 << 63), "header too large")
    add("n-2^64-1", pack(good, D4, n=(1 << 64) - 1), "header too large")
    add("n-2^64-8", pack(good, D4, n=(1 << 64) - 8), "header too large")
    # invalid header length
    add("n-past-eof", pack(good, n=len(good) + 1), "invalid header length")
    add("n-past-eof-by-data", pack(good, D4, n=len(good) + 5), "invalid header length")
    add("n-1e8-short-file", pack(good, D4, n=100_000_000), "invalid header length")
    # invalid UTF-8
    for id, bad in [("ff-byte", b"\xff"), ("lone-continuation", b"\x80"), ("overlong-slash", b"\xc0\xaf"),
                    ("overlong-3", b"\xe0\x80\xaf"), ("utf8-surrogate", b"\xed\xa0\x80"),
                    ("above-10ffff", b"\xf4\x90\x80\x80"), ("truncated-2", b"\xc3")]:  # fmt: skip
        add(f"utf8-{id}", pack(b'{"a' + bad + b'":' + good[5:-1] + b"}", D4), "invalid UTF-8")
    add("utf8-truncated-at-end", pack(good + b"\xe2\x82", D4), "invalid UTF-8")
    # invalid JSON: syntax
    add("json-truncated", pack(good[:-1], D4), "invalid JSON")
    add("json-trailing-comma", pack(good[:-1] + b",}", D4), "invalid JSON")
    add("json-single-quotes", pack(good.replace(b'"', b"'"), D4), "invalid JSON")
    add("json-missing-colon", pack(b'{"a" ' + good[5:], D4), "invalid JSON")
    add("json-trailing-garbage", pack(good + b"x", D4), "invalid JSON")
    add("json-two-objects", pack(good + b"{}", D4), "invalid JSON")
    add("json-nonstandard-ws", pack(b"\x0c" + good, D4), "invalid JSON")
    add("top-level-array", pack(b"[]"), "invalid JSON")
    add("top-level-array-of-tensor", pack(b"[" + good + b"]", D4), "invalid JSON")
    add("top-level-string", pack(b'"a"'), "invalid JSON")
    add("top-level-null", pack(b"null"), "invalid JSON")
    add("n-zero", pack(b""), "invalid JSON")
    add("n-zero-with-data", pack(b"", D4), "invalid JSON")
    add("only-spaces", pack(b"        "), "invalid JSON")
    add("nul-padding", pack(good + b"\0" * 5, D4), "invalid JSON")
    add("nul-before", pack(b"\0" + good, D4), "invalid JSON")
    # invalid JSON: schema
    add("unknown-dtype", simple({"a": entry("F33", [1], 0, 4)}, D4), "invalid JSON", "a")
    add("lower-case-dtype", simple({"a": entry("f32", [1], 0, 4)}, D4), "invalid JSON", "a")
    add("dtype-not-string", simple({"a": {"dtype": 32, "shape": [1], "data_offsets": [0, 4]}}, D4), "invalid JSON", "a")
    add("dtype-map-non-null", pack('{"a":{"dtype":{"F32":[]},"shape":[1],"data_offsets":[0,4]}}', D4), "invalid JSON", "a")
    add("dtype-map-two-keys", pack('{"a":{"dtype":{"F32":null,"I32":null},"shape":[1],"data_offsets":[0,4]}}', D4), "invalid JSON", "a")
    add("dtype-map-empty", pack('{"a":{"dtype":{},"shape":[1],"data_offsets":[0,4]}}', D4), "invalid JSON", "a")
    add("negative-dim", simple({"a": entry("F32", [-1], 0, 4)}, D4), "invalid JSON", "a")
    add("minus-zero-dim", pack('{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}'), "invalid JSON", "a")
    add("float-dim", pack('{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', D4), "invalid JSON", "a")
    add("exponent-dim", pack('{"a":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}', D4), "invalid JSON", "a")
    add("dim-2^64", simple({"a": entry("F32", [1 << 64], 0, 4)}, D4), "invalid JSON", "a")
    add("string-dim", simple({"a": entry("F32", ["1"], 0, 4)}, D4), "invalid JSON", "a")
    add("shape-not-list", simple({"a": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}, D4), "invalid JSON", "a")
    add("negative-offset", simple({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, D4), "invalid JSON", "a")
    add("float-offset", pack('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}}', D4), "invalid JSON", "a")
    for field in ("dtype", "shape", "data_offsets"):
        e = entry("F32", [1], 0, 4)
        del e[field]
        add(f"missing-{field}", simple({"a": e}, D4), "invalid JSON", "a")
    add("duplicate-field", pack('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"shape":[1]}}', D4), "invalid JSON", "a")
    add("data-offsets-len-0", simple({"a": {"dtype": "F32", "shape": [1], "data_offsets": []}}, D4), "invalid JSON", "a")
    add("data-offsets-len-1", simple({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}, D4), "invalid JSON", "a")
    add("data-offsets-len-3", simple({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, D4), "invalid JSON", "a")
    add("entry-not-object", simple({"a": "F32"}, D4), "invalid JSON", "a")
    add("entry-null", simple({"a": None}), "invalid JSON", "a")
    add("entry-array-too-short", pack('{"a":["F32",[1]]}', D4), "invalid JSON", "a")
    add("entry-array-too-long", pack('{"a":["F32",[1],[0,4],0]}', D4), "invalid JSON", "a")
    add("metadata-int-value", simple({"__metadata__": {"k": 1}, "a": entry("F32", [1], 0)}, D4), "invalid JSON")
    add("metadata-null-value", simple({"__metadata__": {"k": None}, "a": entry("F32", [1], 0)}, D4), "invalid JSON")
    add("metadata-nested-value", simple({"__metadata__": {"k": {"x": "y"}}, "a": entry("F32", [1], 0)}, D4), "invalid JSON")
    add("metadata-string", simple({"__metadata__": "v", "a": entry("F32", [1], 0)}, D4), "invalid JSON")
    add("metadata-list", simple({"__metadata__": [], "a": entry("F32", [1], 0)}, D4), "invalid JSON")
    add("metadata-twice", pack('{"__metadata__":{"k":"v"},' + A4 + ',"__metadata__":{"k":"v"}}', D4), "invalid JSON")
    add("metadata-twice-null", pack('{"__metadata__":null,"__metadata__":null}'), "invalid JSON")
    add("deep-nesting-10000", one_f32(',"x":' + nested(10_000)), "invalid JSON", "a")
    add("deep-nesting-128", one_f32(',"x":' + nested(126)), "invalid JSON", "a")  # + object + entry = 128
    add("deep-objects-10000", one_f32(',"x":' + '{"k":' * 10_000 + "1" + "}" * 10_000), "invalid JSON", "a")
    add("lone-leading-surrogate", pack('{"\\ud800":' + A4[4:] + "}", D4), "invalid JSON")
    add("lone-trailing-surrogate", pack('{"\\udc00":' + A4[4:] + "}", D4), "invalid JSON")
    add("surrogate-then-non-surrogate", pack('{"\\ud800\\u0041":' + A4[4:] + "}", D4), "invalid JSON")
    add("surrogate-in-extra-field", one_f32(',"x":"\\udfff"'), "invalid JSON", "a")
    add("raw-control-char-in-name", pack('{"a\x01b":' + A4[4:] + "}", D4), "invalid JSON")
    add("raw-newline-in-name", pack('{"a\nb":' + A4[4:] + "}", D4), "invalid JSON")
    add("raw-tab-in-metadata", pack('{"__metadata__":{"k":"\t"},' + A4 + "}", D4), "invalid JSON")
    add("bad-escape", pack('{"a\\x":' + A4[4:] + "}", D4), "invalid JSON")
    add("short-unicode-escape", pack('{"a\\u12":' + A4[4:] + "}", D4), "invalid JSON")
    # serde_json refuses numbers that overflow f64, even in fields it then ignores
    add("number-out-of-range", one_f32(',"x":1e400'), "invalid JSON", "a")
    add("negative-number-out-of-range", one_f32(',"x":-1.8e308'), "invalid JSON", "a")
    add("long-integer-out-of-range", one_f32(',"x":' + "9" * 400), "invalid JSON", "a")
    add("bad-number-leading-zero", one_f32(',"x":01'), "invalid JSON", "a")
    add("bad-number-dot", one_f32(',"x":1.'), "invalid JSON", "a")
    add("bad-literal", one_f32(',"x":nul'), "invalid JSON", "a")
    add("bare-word", one_f32(',"x":NaN'), "invalid JSON", "a")

    # invalid offset
    h, d = tiled([("a", "F32", [1]), ("b", "F32", [1])])
    h["b"]["data_offsets"] = [8, 12]
    add("hole", simple(h, pattern(12)), "invalid offset", "b")
    add("hole-at-start", simple({"a": entry("F32", [1], 4)}, pattern(8)), "invalid offset", "a")
    add("overlap", simple({"a": entry("F32", [2], 0), "b": entry("F32", [1], 4)}, pattern(8)), "invalid offset", "b")
    add("same-range-twice", simple({"a": entry("F32", [1], 0), "b": entry("I32", [1], 0)}, D4), "invalid offset", "b")
    add("end-before-begin", simple({"a": entry("F32", [1], 0), "b": entry("F32", [0], 4, 0)}, D4), "invalid offset", "b")
    add("duplicate-name-other-offsets",
        pack('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
             pattern(8)), "invalid offset", "a")  # fmt: skip
    add("offset-past-u64-end", simple({"a": entry("U8", [1], (1 << 64) - 1, (1 << 64) - 1)}, b""), "invalid offset", "a")
    # overflow
    add("shape-product-overflow", simple({"a": entry("F32", [1 << 32, 1 << 32], 0, 0)}), "overflow", "a")
    add("shape-product-overflow-many", simple({"a": entry("U8", [1 << 16] * 5, 0, 0)}), "overflow", "a")
    add("bits-overflow", simple({"a": entry("F32", [1 << 62], 0, 0)}), "overflow", "a")
    add("bits-overflow-f4", simple({"a": entry("F4", [1 << 62], 0, 0)}), "overflow", "a")
    # misaligned sub-byte
    add("f4-shape-3", simple({"a": entry("F4", [3], 0, 2)}, pattern(2)), "misaligned sub-byte", "a")
    add("f4-shape-3-floor", simple({"a": entry("F4", [3], 0, 1)}, pattern(1)), "misaligned sub-byte", "a")
    add("f6-shape-1", simple({"a": entry("F6_E2M3", [1], 0, 1)}, pattern(1)), "misaligned sub-byte", "a")
    add("f6-shape-2x3", simple({"a": entry("F6_E3M2", [2, 3], 0, 5)}, pattern(5)), "misaligned sub-byte", "a")
    # invalid tensor info
    add("span-too-small", simple({"a": entry("F32", [2], 0, 4)}, D4), "invalid tensor info", "a")
    add("span-too-large", simple({"a": entry("F32", [1], 0, 8)}, pattern(8)), "invalid tensor info", "a")
    add("empty-tensor-with-bytes", simple({"a": entry("F32", [2, 0], 0, 4)}, D4), "invalid tensor info", "a")
    add("scalar-with-no-bytes", simple({"a": entry("F32", [], 0, 0)}), "invalid tensor info", "a")
    add("f4-wrong-span", simple({"a": entry("F4", [4], 0, 4)}, D4), "invalid tensor info", "a")
    # incomplete buffer
    add("trailing-bytes", simple({"a": entry("F32", [1], 0)}, D4 + b"\0"), "incomplete buffer")
    add("trailing-bytes-no-tensors", pack(b"{}", b"\0"), "incomplete buffer")
    add("truncated-data", simple({"a": entry("F32", [2], 0)}, D4), "incomplete buffer")
    add("truncated-data-empty", simple({"a": entry("F32", [1], 0)}), "incomplete buffer")
    add("offsets-past-eof", simple({"a": entry("U8", [1 << 40], 0)}, D4), "incomplete buffer")
    big = (1 << 61) - 1  # eight of these end 8 bytes short of 2^64: 8 + N + end wraps
    add("tiles-up-to-2^64", simple({f"t{i}": entry("U8", [big], i * big) for i in range(8)}, b"abc"), "incomplete buffer")
    return c


def _accept_cases() -> list[Accept]:
    c: list[Accept] = []
    add = lambda id, content: c.append(Accept(id, content))  # noqa: E731
    h, d = tiled([("a", "F32", [2, 3]), ("b", "I64", [2]), ("c", "U8", [3])])
    body = dumps(h)
    add("plain", pack(body, d))
    add("whitespace-before-brace", pack(b" \t\r\n" + body, d))
    add("trailing-spaces", pack(body + b"    ", d))
    add("trailing-tab-cr-lf", pack(body + b"\t\r\n \r\n", d))
    add("spaced-everywhere", pack(json.dumps(h, indent=2, separators=(" , ", " : ")).encode(), d))
    add("empty-object", pack(b"{}"))
    add("empty-object-padded", pack(b"{}      "))
    add("empty-object-inner-space", pack(b"{ \n }"))
    add("metadata-null", simple({"__metadata__": None, **h}, d))
    add("metadata-empty", simple({"__metadata__": {}, **h}, d))
    add("metadata-strings", simple({"__metadata__": {"format": "pt", "ünï": "\u00e9\u4e2d", "": ""}, **h}, d))
    add("metadata-last", simple({**h, "__metadata__": {"k": "v"}}, d))
    add("metadata-duplicate-key", pack(b'{"__metadata__":{"k":"1","k":"2"},' + body[1:], d))
    add("metadata-only", simple({"__metadata__": {"k": "v"}}, b""))
    add("metadata-escaped-key", pack(b'{"__metadata\\u005f_":{"k":"v"},' + body[1:], d))
    add("extra-fields", pack(
        '{"a":{"x":1,"dtype":"F32","y":[{"z":null,"w":[true,false]}],"shape":[2],"data_offsets":[0,8],'
        '"x":"dup","n":-1.5e-3,"big":1.7976931348623157e308,"tiny":1e-400,"huge_int":' + "9" * 300 + "e-10}}",
        pattern(8)))  # fmt: skip
    add("extra-field-metadata-name", one_f32(',"__metadata__":5'))
    add("nesting-127", one_f32(',"x":' + nested(125)))
    add("empty-name", simple({"": entry("F32", [1], 0)}, D4))
    add("unicode-names", simple({"é": entry("F32", [1], 0), "中文": entry("U8", [1], 4), "😀": entry("I8", [2], 5)}, pattern(7)))
    add("escaped-names", pack('{"a\\u0000b":' + A4[4:] + ',"\\ud83d\\ude00\\n\\"\\\\\\/\\b\\f\\r\\t":'
                              '{"dtype":"U8","shape":[],"data_offsets":[4,5]}}', pattern(5)))  # fmt: skip
    add("glob-chars-in-names", simple({"a*": entry("F32", [1], 0), "[b]?": entry("F32", [1], 4)}, pattern(8)))
    add("empty-tensor", simple({"a": entry("F32", [2, 0], 0, 0)}))
    add("empty-tensors-among-others", simple({"z": entry("F32", [0], 0, 0), "a": entry("F32", [1], 0), "e": entry("F64", [3, 0, 2], 4, 4)}, D4))
    add("empty-tensor-huge-dim", simple({"a": entry("U8", [1 << 40, 0], 0, 0)}))
    add("scalar", simple({"a": entry("F32", [], 0)}, D4))
    add("scalars-all-dtypes", simple(*tiled([(f"s_{t}", t, []) for t in NUMPY_DTYPES])))
    add("header-length-odd", pack(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x01"))
    add("header-length-not-multiple-of-8", pack(body + b" ", d))
    add("f32-at-odd-offset", simple({"a": entry("U8", [1], 0), "b": entry("F32", [2, 3], 1)}, pattern(25)))
    add("f64-at-offset-3", simple({"a": entry("U8", [3], 0), "b": entry("F64", [5], 3), "c": entry("C64", [2], 43)}, pattern(59)))
    add("bf16-at-odd-offset", simple({"a": entry("BOOL", [1], 0), "b": entry("BF16", [4], 1)}, b"\x01" + pattern(8)))
    add("i16-u64-unaligned", simple({"a": entry("I8", [1], 0), "b": entry("I16", [3], 1), "c": entry("U64", [2], 7)}, pattern(23)))
    add("duplicate-identical", pack(b'{' + A4.encode() + b"," + A4.encode() + b"}", D4))
    add("duplicate-replaced", pack(b'{"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},' + A4.encode() + b"}", D4))
    add("entry-as-array", pack('{"a":["F32",[1],[0,4]]}', D4))
    add("entry-as-array-mixed", pack('{"a":["F32",[2],[0,8]],"b":{"dtype":"U8","shape":[1],"data_offsets":[8,9]}}', pattern(9)))
    add("dtype-as-unit-variant-map", pack('{"a":{"dtype":{"F32":null},"shape":[1],"data_offsets":[0,4]}}', D4))
    add("dtype-map-in-array-entry", pack('{"a":[{ "BF16" : null },[2],[0,4]]}', D4))
    add("bool-non-canonical-bytes", simple({"a": entry("BOOL", [4], 0)}, b"\x00\x01\x02\xff"))
    add("nan-payloads", simple({"a": entry("F32", [2], 0)}, b"\x01\x00\xc0\x7f\xff\xff\xff\xff"))
    all_dtypes = [(f"t_{t}", t, [2, 4]) for t in DTYPES]
    h, d = tiled(all_dtypes, seed=3)
    add("all-dtypes", simple(h, d))
    add("all-dtypes-reversed", simple(dict(reversed(list(h.items()))), d))
    add("sub-byte-ok", simple({"f4": entry("F4", [3, 2], 0), "f6a": entry("F6_E2M3", [4], 3), "f6b": entry("F6_E3M2", [2, 4], 6)}, pattern(12)))
    add("unsorted-offsets", simple({"b": entry("F32", [1], 4), "a": entry("F32", [1], 0)}, pattern(8)))
    return c


REJECT_CASES = _reject_cases()
ACCEPT_CASES = _accept_cases()


# -- the oracle ---------------------------------------------------------------------------


@dataclass
class Parsed:
    """A file as one implementation reads it: name -> (dtype, shape, raw bytes)."""

    tensors: dict[str, tuple[str, tuple[int, ...], bytes]]
    metadata: Optional[dict[str, str]]


def reference_read(path: str) -> Parsed:
    """The reference's reading of a file; raises whatever the reference raises."""
    from safetensors import deserialize, safe_open

    with safe_open(path, "np") as f:
        metadata = f.metadata()
        info = {}
        for k in f.keys():
            s = f.get_slice(k)
            info[k] = (s.get_dtype(), tuple(s.get_shape()))
        arrays = {}
        for k, (dtype, shape) in info.items():
            if dtype in REFERENCE_NUMPY and numpy_can_hold(shape, NUMPY_DTYPES[dtype]):
                arrays[k] = f.get_tensor(k)
    raw = {name: t for name, t in deserialize(Path(path).read_bytes())}
    assert set(raw) == set(info), "reference: safe_open and deserialize disagree on names"
    tensors = {}
    for k, (dtype, shape) in info.items():
        assert raw[k]["dtype"] == dtype and tuple(raw[k]["shape"]) == shape
        data = bytes(raw[k]["data"])
        if k in arrays:
            assert arrays[k].dtype == NUMPY_DTYPES[dtype] and arrays[k].shape == shape
            assert arrays[k].tobytes() == data
        tensors[k] = (dtype, shape, data)
    return Parsed(tensors, metadata)


def numpy_can_hold(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    try:
        np.empty(shape, dtype)
    except (ValueError, MemoryError):
        return False
    return True


def fst_read(path: str) -> Parsed:
    """fst's reading of a file through open_checkpoint and load(framework="numpy").

    Checks on the way that load gives each tensor with the right numpy dtype and shape,
    aligned to its itemsize, and that the dtypes numpy lacks (F4, F6) are refused cleanly.
    """
    ckpt = fst.open_checkpoint(path)
    names = ckpt.names()
    assert len(ckpt) == len(names) == len(set(names))
    content = Path(path).read_bytes()
    data_start = 8 + int.from_bytes(content[:8], "little")
    infos = {n: ckpt.info(n) for n in names}
    loadable = [n for n, (dtype, shape, _, _) in infos.items()
                if dtype in NUMPY_DTYPES and numpy_can_hold(shape, NUMPY_DTYPES[dtype])]  # fmt: skip
    arrays = fst.load(path, framework="numpy", keys=loadable) if loadable else {}
    assert sorted(arrays) == sorted(loadable)
    tensors = {}
    for n, (dtype, shape, (begin, end), file_index) in infos.items():
        assert file_index == 0
        if n in arrays:
            arr = arrays[n]
            assert arr.dtype == NUMPY_DTYPES[dtype], (n, arr.dtype, dtype)
            assert arr.shape == shape, (n, arr.shape, shape)
            assert arr.flags.c_contiguous
            assert arr.ctypes.data % arr.dtype.itemsize == 0, f"{n}: misaligned at {arr.ctypes.data:#x}"
            data = arr.reshape(-1).view(np.uint8).tobytes()
        else:
            # No numpy array can hold it: F4/F6, or a dim past what numpy allows (with a 0
            # elsewhere in the shape). load must say so with a clean error.
            # (numpy's own ValueError, or fst's UnsupportedError for a dimension past 2^63-1).
            expected = fst.UnsupportedError if dtype not in NUMPY_DTYPES else (ValueError, fst.UnsupportedError)
            try:
                fst.load(path, framework="numpy", keys=[n])
            except expected:
                pass
            else:
                raise AssertionError(f"fst.load gave a numpy array for {dtype} {shape}")
            data = content[data_start + begin : data_start + end]
        tensors[n] = (dtype, shape, data)
    return Parsed(tensors, ckpt.metadata(0))


def assert_same(ref: Parsed, mine: Parsed) -> None:
    assert sorted(mine.tensors) == sorted(ref.tensors)
    for name, (dtype, shape, data) in ref.tensors.items():
        m_dtype, m_shape, m_data = mine.tensors[name]
        assert (m_dtype, m_shape) == (dtype, shape), name
        assert m_data == data, f"{name}: data differs"
    assert mine.metadata == ref.metadata


# The reference's error text for each of fst's rules.
REFERENCE_MESSAGES = {
    "header too small": "header too small",
    "header too large": "header too large",
    "invalid header length": "invalid header length",
    "invalid UTF-8": "invalid UTF-8",
    "invalid JSON": "invalid JSON",
    "invalid offset": "invalid offset",
    "overflow": "overflow computing buffer size",
    "misaligned sub-byte": "slicing for subbytes",
    "invalid tensor info": "invalid shape, data type, or offset",
    "incomplete buffer": "incomplete metadata",
}


def reference_rule(error: BaseException) -> Optional[str]:
    """fst's name for the rule a reference error reports (None if it names none)."""
    text = str(error)
    for rule, needle in REFERENCE_MESSAGES.items():
        if needle in text:
            return rule
    return None


def reference_rules(path: str, tries: int = 16) -> set[str]:
    """Every rule the reference reports for a bad file over a few tries: it sorts tensors by
    offsets in hash-map order, so with tied offsets the broken rule it finds can vary."""
    from safetensors import safe_open

    rules = set()
    for _ in range(tries):
        try:
            with safe_open(path, "np"):
                pass
        except Exception as e:  # noqa: BLE001 (the reference's errors are of several types)
            rules.add(reference_rule(e))
    return rules
