"""Differential fuzzing of fst's header parser against the reference (safetensors 0.8.0).

Two generators: (a) headers built from a grammar (valid and invalid dtypes, shapes, offsets
that tile or not, extra fields with nested JSON, duplicate keys, metadata variants, odd
whitespace, escaped unicode names), serialised by hand so that duplicates and odd spacing
are possible; (b) byte-level mutations of valid files (flip, overwrite, insert, delete,
truncate, in the header and in the length prefix). For every file fst and the reference
must agree on accept vs reject; accepted files must load bit for bit alike; rejected ones
must raise fst.HeaderError naming a rule the reference also reports, never anything else.

Runs derandomized with a fixed example count for CI; FST_FUZZ_EXAMPLES=N raises the count
(and explores new random examples on every run).
"""

from __future__ import annotations

import os
import random
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import fst
from malicious import (
    DTYPE_BITS,
    DTYPES,
    assert_same,
    fst_read,
    pack,
    reference_read,
    reference_rule,
    reference_rules,
)

_EXAMPLES = os.environ.get("FST_FUZZ_EXAMPLES")
FUZZ = settings(
    max_examples=int(_EXAMPLES) if _EXAMPLES else 300,
    derandomize=not _EXAMPLES,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# -- the oracle ---------------------------------------------------------------------------


def check(content: bytes) -> str:
    """Runs both implementations on `content`; returns "accept" or "reject"."""
    with tempfile.TemporaryDirectory(prefix="fst-fuzz-") as d:
        path = os.path.join(d, "f.safetensors")
        with open(path, "wb") as f:
            f.write(content)
        try:
            with safe_open(path, "np"):
                ref_error = None
        except Exception as e:  # noqa: BLE001 (the reference raises several types)
            ref_error = e
        try:
            mine = fst_read(path)
            my_error = None
        except fst.HeaderError as e:  # anything else propagates and fails the test
            mine, my_error = None, e
        if ref_error is None:
            assert my_error is None, f"fst rejects a file the reference accepts: {my_error}\n{content[:400]!r}"
            assert_same(reference_read(path), mine)
            return "accept"
        assert my_error is not None, f"fst accepts a file the reference rejects: {ref_error}\n{content[:400]!r}"
        assert my_error.file == path
        if my_error.rule != reference_rule(ref_error):
            # tied offsets: the reference's hash-map order decides which rule it meets first
            rules = reference_rules(path)
            assert my_error.rule in rules, f"fst: {my_error}; reference: {ref_error} ({rules})"
        return "reject"


# -- (a) headers from a grammar -------------------------------------------------------------

WS = ["", "", "", "", "", "", " ", " ", "\n", "\t", "\r\n", "  \t"]
BAD_WS = ["\x0c", "\x00", "\u00a0", "\v"]


@st.composite
def ws(draw, style: str) -> str:
    if style == "compact":
        return ""
    if style == "bad" and draw(st.integers(0, 30)) == 0:
        return draw(st.sampled_from(BAD_WS))
    return draw(st.sampled_from(WS))


SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def escape_u(ch: str, upper: bool) -> str:
    cp = ord(ch)
    if cp >= 0x10000:
        cp -= 0x10000
        units = [0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)]
    else:
        units = [cp]
    fmt = "\\u{:04X}" if upper else "\\u{:04x}"
    return "".join(fmt.format(u) for u in units)


NAME_TEXT = st.one_of(
    st.sampled_from(["a", "b", "c", "w", "", "a.b", "é", "中文", "😀", "x\ny", "q\"\\", "/", "\x00", "a*[?]"]),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=6),
)
BAD_STRING_PIECES = ["\\ud800", "\\udc00", "\\ud800\\u0041", "\\x", "\\u12", "\x01", "\n", "\\", "\x7f"]


@st.composite
def json_string(draw, text=NAME_TEXT, allow_bad: bool = True) -> str:
    """A JSON string token for a drawn text, escaped in a drawn way (rarely broken)."""
    s = draw(text)
    mode = draw(st.sampled_from(["plain", "plain", "plain", "all-u", "mixed"]))
    upper = draw(st.booleans())
    out = []
    for ch in s:
        if mode == "all-u" or (mode == "mixed" and draw(st.booleans())):
            out.append(escape_u(ch, upper))
        elif ch in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[ch])
        elif ord(ch) < 0x20:
            out.append(escape_u(ch, upper))
        elif ch == "/" and mode == "mixed":
            out.append("\\/")
        else:
            out.append(ch)
    if allow_bad and draw(st.integers(0, 40)) == 0:
        out.insert(draw(st.integers(0, len(out))), draw(st.sampled_from(BAD_STRING_PIECES)))
    return '"' + "".join(out) + '"'


VALID_NUMBERS = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["0", "-0", "1.5e3", "1E-2", "1e-400", "1.7976931348623157e308", "9" * 300 + ".5e-20", "0.0e999999"]),
)
NUMBER_TOKENS = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["0", "-0", "1.5e3", "1E-2", "1e400", "-1e400", "1e-400", "1.7976931348623157e308",
                     "1.7976931348623159e308", "9" * 330, "9" * 300 + ".5e-20", "0.0e999999", "01", "1.", ".5",
                     "+1", "1e", "-", "0x10", "NaN", "Infinity"]),
)  # fmt: skip


@st.composite
def json_value(draw, style: str, clean: bool, depth: int = 0) -> str:
    """Any JSON value (unless `clean`, a few invalid ones too), nested at most 3 deep, rarely
    very deep."""
    kind = draw(st.integers(0, 12 if depth < 3 else 6))
    if kind <= 1:
        return draw(json_string(allow_bad=not clean))
    if kind <= 3:
        return draw(VALID_NUMBERS if clean else NUMBER_TOKENS)
    if kind <= 5:
        return draw(st.sampled_from(["true", "false", "null"] + ([] if clean else ["nul", "True"])))
    if kind == 6:
        # nesting around serde_json's 128-level limit (2 levels are used above this value)
        n = draw(st.sampled_from([1, 100, 124, 125] + ([] if clean else [126, 127, 2000])))
        return "[" * n + "]" * n
    items = draw(st.lists(json_value(style, clean, depth + 1), max_size=3))
    sep = lambda: draw(ws(style)) + "," + draw(ws(style))  # noqa: E731
    if kind <= 9:
        body = ""
        for i, v in enumerate(items):
            body += (sep() if i else "") + v
        return "[" + draw(ws(style)) + body + draw(ws(style)) + "]"
    body = ""
    for i, v in enumerate(items):
        key = draw(json_string(allow_bad=not clean))
        body += (sep() if i else "") + key + draw(ws(style)) + ":" + draw(ws(style)) + v
    return "{" + draw(ws(style)) + body + draw(ws(style)) + "}"


BAD_DTYPES = ["f32", "F33", "", "F32 ", "bf16", "float32", "FP8", "F8", "C128", "I4"]


@st.composite
def dtype_token(draw, clean: bool) -> tuple[str, str | None]:
    """(JSON text, the dtype the reference reads from it or None if it rejects it)."""
    k = draw(st.integers(0, 25 if clean else 30))
    if k < 26:
        name = draw(st.sampled_from(DTYPES))
        if k == 25:  # serde's other spelling of a unit variant
            return '{"' + name + '":null}', name
        return '"' + name + '"', name
    if k < 29:
        return '"' + draw(st.sampled_from(BAD_DTYPES)) + '"', None
    return draw(st.sampled_from(['32', 'null', '["F32"]', '{"F32":[]}', '{"F32":null,"F16":null}', "{}"])), None


SMALL_DIMS = [0, 1, 1, 1, 2, 2, 3, 4]
HUGE_DIMS = [1 << 31, 1 << 32, 1 << 62, 1 << 63, (1 << 64) - 1, 3 << 40]
BAD_DIMS = ["-1", "1.0", "1e0", "18446744073709551616", '"1"', "null", "-0", "[1]"]


@st.composite
def dim(draw, clean: bool) -> tuple[str, int | None]:
    k = draw(st.integers(0, 38 if clean else 40))
    if k < 36:
        d = draw(st.sampled_from(SMALL_DIMS))
    elif k < 39:
        d = draw(st.sampled_from(HUGE_DIMS))
    else:
        return draw(st.sampled_from(BAD_DIMS)), None
    return str(d), d


def u64_list(values: list[str], draw, style) -> str:
    body = ""
    for i, v in enumerate(values):
        body += (draw(ws(style)) + "," + draw(ws(style)) if i else "") + v
    return "[" + draw(ws(style)) + body + draw(ws(style)) + "]"


@st.composite
def tensor_spec(draw, style: str, clean: bool):
    """A tensor before layout: name, dtype token, shape token, its size in bytes (None when
    the entry is invalid anyway), and how to perturb its data_offsets (never when `clean`)."""
    name = draw(json_string(allow_bad=not clean))
    dtype_text, dtype = draw(dtype_token(clean))
    dims = draw(st.lists(dim(clean), max_size=4))
    shape_text = u64_list([t for t, _ in dims], draw, style)
    size = None
    if dtype is not None and all(d is not None for _, d in dims):
        n = 1
        for _, d in dims:
            n *= d
        size = n * DTYPE_BITS[dtype] // 8
    bad = (lambda *xs: []) if clean else (lambda *xs: list(xs))  # noqa: E731
    perturb = draw(st.sampled_from(["none"] * 14 + bad("begin+1", "end+1", "end-1", "swap", "len1", "len3", "zero", "float")))
    fields_extra = []
    if draw(st.integers(0, 3)) == 0:
        fields_extra = draw(st.lists(st.tuples(json_string(allow_bad=not clean), json_value(style, clean)), max_size=2))
    form = draw(st.sampled_from(["object"] * 10 + ["array"] + bad("array-short", "array-long")))
    drop = draw(st.sampled_from([None] * 30 + bad("dtype", "shape", "data_offsets")))
    dup = draw(st.sampled_from([None] * 30 + bad("dtype", "shape", "data_offsets")))
    order = draw(st.permutations([0, 1, 2])) if draw(st.booleans()) else [0, 1, 2]
    return dict(name=name, dtype_text=dtype_text, shape_text=shape_text, size=size, perturb=perturb,
                extra=fields_extra, form=form, drop=drop, dup=dup, order=order)  # fmt: skip


def offsets_text(spec, begin: int, end: int, draw, style) -> str:
    p = spec["perturb"]
    vals = [str(begin), str(end)]
    if p == "begin+1":
        vals[0] = str(begin + 1)
    elif p == "end+1":
        vals[1] = str(end + 1)
    elif p == "end-1":
        vals[1] = str(end - 1)  # may be -1: an invalid JSON value for a usize
    elif p == "swap":
        vals.reverse()
    elif p == "len1":
        vals = vals[:1]
    elif p == "len3":
        vals.append(vals[1])
    elif p == "zero":
        vals = ["0", "0"]
    elif p == "float":
        vals[1] += ".0"
    return u64_list(vals, draw, style)


def entry_text(spec, offsets: str, draw, style) -> str:
    fields = [("dtype", spec["dtype_text"]), ("shape", spec["shape_text"]), ("data_offsets", offsets)]
    if spec["form"] != "object":
        vals = [v for _, v in fields]
        if spec["form"] == "array-short":
            vals = vals[:2]
        elif spec["form"] == "array-long":
            vals.append("0")
        return u64_list(vals, draw, style)
    fields = [fields[i] for i in spec["order"]]
    fields = [(k, v) for k, v in fields if k != spec["drop"]]
    if spec["dup"]:
        fields += [(k, v) for k, v in fields if k == spec["dup"]]
    items = [('"' + k + '"', v) for k, v in fields]
    for key, value in spec["extra"]:
        items.insert(draw(st.integers(0, len(items))), (key, value))
    return obj_text(items, draw, style)


def obj_text(items: list[tuple[str, str]], draw, style) -> str:
    body = ""
    for i, (k, v) in enumerate(items):
        body += (draw(ws(style)) + "," + draw(ws(style)) if i else "") + k + draw(ws(style)) + ":" + draw(ws(style)) + v
    return "{" + draw(ws(style)) + body + draw(ws(style)) + "}"


@st.composite
def metadata_text(draw, style: str, clean: bool) -> str:
    k = draw(st.integers(0, 9 if clean else 12))
    if k <= 2:
        return "null"
    if k <= 9:
        plain = st.text(st.characters(exclude_categories=("Cs",)), max_size=5)
        items = draw(st.lists(st.tuples(json_string(plain, allow_bad=False), json_string(plain, allow_bad=False)), max_size=3))
        if items and draw(st.integers(0, 4)) == 0:
            items.append((items[0][0], draw(json_string(plain, allow_bad=False))))  # duplicate key: last wins
        return obj_text(items, draw, style)
    return draw(st.sampled_from(['{"k":1}', '{"k":null}', '"v"', "[]", '{"k":{"a":"b"}}', "0"]))


@st.composite
def grammar_files(draw) -> bytes:
    # Half the files avoid every construct the reference refuses, save what layout and size
    # checks catch (huge dims, sub-byte remainders); the other half mix in broken ones.
    clean = draw(st.booleans())
    style = draw(st.sampled_from(["compact", "compact", "spaced"] + ([] if clean else ["bad"])))
    specs = draw(st.lists(tensor_spec(style, clean), max_size=6))
    # lay tensors out back to back, in an order unrelated to the order in the header
    layout = draw(st.permutations(range(len(specs))))
    offsets: dict[int, tuple[int, int]] = {}
    off = 0
    for i in layout:
        size = specs[i]["size"]
        if size is None:
            size = draw(st.integers(0, 8))
        offsets[i] = (off, off + size)
        off += size
    items = [(s["name"], entry_text(s, offsets_text(s, *offsets[i], draw, style), draw, style)) for i, s in enumerate(specs)]
    # repeated names: the same entry again, or another tensor's entry under this name
    for _ in range(draw(st.integers(0, 2)) if items and draw(st.integers(0, 5)) == 0 else 0):
        # (under `clean` too: a repeated name is fine when the last entry still tiles)
        src = draw(st.integers(0, len(items) - 1))
        dst_name = items[draw(st.integers(0, len(items) - 1))][0]
        items.insert(draw(st.integers(0, len(items))), (dst_name, items[src][1]))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1] + ([] if clean else [2])))):
        key = draw(st.sampled_from(['"__metadata__"'] * 6 + ['"__metadata\\u005f_"']))
        items.insert(draw(st.integers(0, len(items))), (key, draw(metadata_text(style, clean))))
    header = obj_text(items, draw, style)
    header = draw(st.sampled_from(["", "", "", " ", "\n\t "])) + header
    pad = draw(st.sampled_from(["", "", "", "pad8", " \t\r\n"] + ([] if clean else ["nul"])))
    raw = header.encode("utf-8", "surrogatepass")
    if pad == "pad8":
        raw += b" " * (-len(raw) % 8)
    elif pad == "nul":
        raw += b"\0" * (-len(raw) % 8 or 8)
    elif pad:
        raw += pad.encode()
    if off > 1 << 20:  # offsets past anything we write: the reference must refuse it anyway
        off = draw(st.integers(0, 64))
    data_len = max(0, off + draw(st.sampled_from([0] * (40 if clean else 12) + [-1, 1, -4, 8])))
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(data_len)
    n = len(raw) + (0 if clean else draw(st.sampled_from([0] * 30 + [-1, 1, 8, -len(raw)])))
    return pack(raw, data, n=max(n, 0))


# -- (b) byte mutations of valid files ----------------------------------------------------------

INTERESTING = b'{}[]",:0129-.eE\\ \t\n\x00\xff\x80\xc3ua'


@st.composite
def valid_files(draw) -> bytes:
    import json

    count = draw(st.integers(0, 4))
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt", "k": draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=4))}
    off = 0
    for i in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        n = 1
        for d in shape:
            n *= d
        if (n * DTYPE_BITS[dtype]) % 8:
            shape = shape + [2]
            n *= 2
        size = n * DTYPE_BITS[dtype] // 8
        header[draw(st.sampled_from(["a", "b", "w.0", "é", f"t{i}"])) + str(i)] = {
            "dtype": dtype, "shape": shape, "data_offsets": [off, off + size]}  # fmt: skip
        off += size
    items = list(header.items())
    if draw(st.booleans()):
        items.reverse()
    raw = json.dumps(dict(items), separators=(",", ":"), ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        raw += b" " * (-len(raw) % 8)
    return pack(raw, random.Random(draw(st.integers(0, 2**32))).randbytes(off))


@st.composite
def mutated_files(draw) -> bytes:
    buf = bytearray(draw(valid_files()))
    n = int.from_bytes(buf[:8], "little")
    header_end = 8 + n
    fix_prefix = draw(st.booleans())
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "set", "insert", "delete", "truncate", "prefix", "dup"]))
        # positions mostly inside the header
        if draw(st.integers(0, 4)):
            pos = draw(st.integers(8, max(8, header_end - 1)))
        else:
            pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[min(pos, len(buf) - 1)] = draw(st.sampled_from(list(INTERESTING)))
        elif op == "insert":
            ins = bytes(draw(st.lists(st.sampled_from(list(INTERESTING)), min_size=1, max_size=3)))
            buf[pos:pos] = ins
            if pos < header_end:
                header_end += len(ins)
        elif op == "delete":
            k = draw(st.integers(1, 4))
            del buf[pos : pos + k]
            if pos < header_end:
                header_end -= min(k, header_end - pos)
        elif op == "dup":  # repeat a slice of the header (duplicates keys, entries, ...)
            k = draw(st.integers(1, 40))
            buf[pos:pos] = buf[pos : pos + k]
            if pos < header_end:
                header_end += len(buf[pos : pos + k])
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))) :]
        elif op == "prefix" and len(buf) >= 8:
            new = draw(st.one_of(st.integers(-3, 3).map(lambda d: max(0, n + d)), st.integers(0, 2**64 - 1),
                                 st.sampled_from([0, 100_000_000, 100_000_001, 2**63, 2**64 - 1])))  # fmt: skip
            buf[:8] = new.to_bytes(8, "little")
            fix_prefix = False
    if fix_prefix and len(buf) >= 8 and header_end >= 8:
        buf[:8] = (header_end - 8).to_bytes(8, "little")
    return bytes(buf)


# -- the tests ---------------------------------------------------------------------------------


@FUZZ
@given(grammar_files())
def test_grammar_headers_agree_with_reference(content):
    check(content)


@FUZZ
@given(mutated_files())
def test_mutated_files_agree_with_reference(content):
    check(content)


def test_generators_reach_both_verdicts():
    """The generators are useful only if they produce accepted and rejected files alike."""
    seen: dict[str, dict[str, int]] = {"grammar": {}, "mutated": {}}

    @settings(max_examples=120, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.sampled_from(["grammar", "mutated"]), st.data())
    def run(which, data):
        content = data.draw(grammar_files() if which == "grammar" else mutated_files())
        verdict = check(content)
        seen[which][verdict] = seen[which].get(verdict, 0) + 1

    run()
    for which, verdicts in seen.items():
        assert verdicts.get("accept", 0) >= 5 and verdicts.get("reject", 0) >= 5, (which, verdicts)
