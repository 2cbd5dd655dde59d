"""``fst.torch.load_into``: a checkpoint's tensors written into existing parameters and buffers,
in place, with at most a budget of extra memory.

Each destination takes one of three routes:

- **mapped**: a CPU destination whose file is in the page cache is converted or copied straight
  out of a mapping of its bytes (``fst._mapped``), in spans of at most the budget and
  $FST_STAGING_BUFFER mapped one at a time: one pass over the data, as the reference's copy
  out of its own mapping, with memory bounded by a span rather than the model (1 GiB, warm,
  2 cores: level with ``load_state_dict(load_file())`` on the same dtype, 8-11% faster
  converting BF16 to float32, where reading into a buffer and converting out of it was 1.9x
  slower).
- **direct**: a contiguous CPU destination of the file's dtype whose file is not cached
  receives the file's bytes at its own address (``Checkpoint.read_into``, one call for all of
  them, reads in parallel): no copy, no extra memory.
- **bounce**: everything else (another dtype or a non-contiguous view from storage, a CUDA
  tensor) is read in groups into a host buffer of at most ``budget`` bytes and
  $FST_STAGING_BUFFER (two, pinned, when a destination is on a GPU), then converted or copied
  into the destination piece by piece. A tensor larger than the buffer is cut into pieces of
  whole rows (or, for a contiguous one, element ranges).

Conversions follow torch's own ``Tensor.to()``, as ``load_state_dict`` does: on the CPU with
fst's converter (bit-identical to the installed torch) where it has the pair and the piece is
contiguous, else with ``copy_``, which is torch itself. CUDA pieces are copied with
``copy_(non_blocking=True)`` on torch's current stream of their device, so they start after the
work already queued there and whatever the caller queues next runs after them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from . import _core, _settings
from ._loading import Keys, key_patterns, open_checkpoint, record_stats
from ._mapped import mapped_span
from ._paths import PathArg
from ._progress import Progress, make_progress
from .adapters.torch import TORCH_DTYPES, conversion_mode
from .errors import UnsupportedError

# The file's dtype as torch holds it (the torch adapter's table). F4 is two values a byte:
# torch's float4_e2m1fn_x2, whose last dimension is half the file's (as fst.load gives it).
_TORCH_DTYPE: dict[str, torch.dtype] = TORCH_DTYPES
_FORMAT_NAME: dict[torch.dtype, str] = {d: n for n, d in _TORCH_DTYPE.items()}

_ALIGN = 64  # each piece's place in the bounce buffer, so that any dtype may view it
_DCP_HINT = "load sharded or deferred tensors with torch.distributed.checkpoint and fst.dcp.Reader"


@dataclass
class _Write:
    name: str
    dest: torch.Tensor
    file: int
    offset: int  # absolute, in the file
    dtype: torch.dtype  # the file's, as torch holds it


def load_into(
    target: Any,
    path: PathArg,
    *,
    strict: bool = True,
    keys: Keys = None,
    budget: Optional[int] = None,
    progress: Progress = None,
) -> tuple[list[str], list[str]]:
    """Write the checkpoint's tensors into `target`'s existing tensors; see fst.torch.load_into."""
    _settings.check_environment()
    budget = _settings.staging_budget(budget)
    patterns = key_patterns(keys)
    if isinstance(target, torch.nn.Module):
        state, owner = target.state_dict(keep_vars=True), type(target).__name__
    elif isinstance(target, Mapping):
        state, owner = dict(target), type(target).__name__
    else:
        raise TypeError(f"load_into writes into a torch.nn.Module or a state dict, not {type(target).__name__}")

    ckpt = open_checkpoint(path)
    entries = {e.name: e for e in ckpt.entries()}
    if patterns is not None:
        chosen = _matcher(patterns, entries, state)
        entries = {n: e for n, e in entries.items() if chosen(n)}
        state = {n: t for n, t in state.items() if chosen(n)}

    writes, errors = [], []
    for name, dest in state.items():
        if name not in entries:
            continue
        _refuse_unwritable(name, dest)
        _, fmt, shape, _begin, _end, file, offset = entries[name]
        dtype = _TORCH_DTYPE.get(fmt)
        if dtype is None:
            raise UnsupportedError(f"tensor {name!r}: torch has no dtype for {fmt}")
        file_shape = torch.Size(shape[:-1] + (shape[-1] // 2,) if fmt == "F4" and shape else shape)
        if dest.shape != file_shape:
            # The message of load_state_dict's.
            errors.append(f"size mismatch for {name}: copying a param with shape {file_shape} from checkpoint, "
                          f"the shape in current model is {dest.shape}.")
            continue
        _check_conversion(name, dtype, dest.dtype)
        writes.append(_Write(name, dest, file, offset, dtype))
    unexpected = [n for n in entries if n not in state]
    missing = _missing(state, entries, writes)
    if strict:
        if unexpected:
            errors.insert(0, "unexpected keys: " + ", ".join(unexpected))
        if missing:
            errors.insert(0, "missing keys: " + ", ".join(missing))
    if errors:  # before any write: the destinations are as they were
        raise RuntimeError(f"Error(s) in loading state_dict for {owner}:\n\t" + "\n\t".join(errors))

    writes = _distinct(writes)
    started = time.perf_counter()
    total = sum(w.dest.numel() * w.dtype.itemsize for w in writes)
    callback, close = make_progress(progress, total, "fst load_into")
    direct, mapped, bounced = [], [], []
    cached = _cached_files(ckpt, [w.file for w in writes if w.dest.device.type == "cpu"])
    for w in writes:
        (mapped if w.dest.device.type == "cpu" and w.file in cached else direct if _is_direct(w)
         else bounced).append(w)
    threads = _settings.threads(None)
    try:
        with torch.no_grad():
            done = _read_direct(ckpt, direct, threads, callback, total)
            # Spans of a staging buffer's size: as fast here as spans of the whole budget
            # (within 5%, 1-2 GiB), for 18 MiB of extra memory instead of 258.
            done = _copy_mapped(ckpt, mapped, min(budget, _settings.staging_buffer()), callback, done, total)
            buffer_bytes = _read_bounced(ckpt, bounced, budget, threads, callback, done, total)
            # Direct reads and host conversions write through the tensors' addresses, which
            # autograd does not see: mark every destination modified in place, as copy_ would.
            _bump_versions([w.dest for w in writes])
    finally:
        close()
    record_stats({"backend": "pread", "tensors": len(writes), "unindexed": ckpt.unindexed(), "bytes": total,
                  "bytes_read": total, "resident": None, "seconds": time.perf_counter() - started,
                  "threads": threads or _core.default_threads(),
                  "reason": f"load_into: {len(direct)} tensors read straight into their destinations, "
                            f"{len(mapped)} converted or copied out of the page cache, "
                            f"{len(bounced)} through a {buffer_bytes}-byte buffer"}, "torch")
    return missing, unexpected


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    """Bump each tensor's autograd version counter: in one call where torch takes a list (2.5
    on), else one at a time."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _matcher(patterns: list[str], entries: Mapping[str, Any], state: Mapping[str, Any]):
    """Whether a name is one `keys=` selects: an exact name, or a glob (the core's rule, as in
    its selection for fst.load). An exact name that is neither in the checkpoint nor a
    destination is an error, as in fst.load."""
    exact = set()
    globs = []
    for p in patterns:
        if p in entries or p in state or not any(c in p for c in "*?["):
            if p not in entries and p not in state:
                raise KeyError(f"keys: {p!r} is neither a tensor of the checkpoint nor a destination")
            exact.add(p)
        else:
            globs.append(p)
    return lambda name: name in exact or any(_core.name_matches(g, name) for g in globs)


def _refuse_unwritable(name: str, dest: Any) -> None:
    if not isinstance(dest, torch.Tensor):
        raise TypeError(f"destination {name!r} is a {type(dest).__name__}, not a torch tensor")
    if type(dest) not in (torch.Tensor, torch.nn.Parameter):
        if torch.distributed.is_available():
            try:
                from torch.distributed.tensor import DTensor
            except ImportError:  # torch before 2.4
                from torch.distributed._tensor import DTensor

            if isinstance(dest, DTensor):
                raise UnsupportedError(f"destination {name!r} is a DTensor: load_into writes whole local "
                                       f"tensors; {_DCP_HINT}")
        if torch.nn.parameter.is_lazy(dest):
            raise UnsupportedError(f"destination {name!r} is an uninitialized lazy parameter: run the "
                                   f"module once (or materialize it) before loading into it")
    if dest.layout != torch.strided or dest.is_quantized:
        raise UnsupportedError(f"destination {name!r} is a {dest.layout} tensor"
                               f"{' (quantized)' if dest.is_quantized else ''}: load_into writes dense tensors")
    if dest.device.type == "meta":
        raise UnsupportedError(f"destination {name!r} is a meta tensor, which has no memory to write into: "
                               f"materialize the model first (e.g. module.to_empty(device=...)), or {_DCP_HINT}")
    if dest.device.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"destination {name!r} is on {dest.device}: load_into writes CPU and CUDA tensors")


_CONVERTIBLE: dict[tuple[torch.dtype, torch.dtype], bool] = {}


def _check_conversion(name: str, src: torch.dtype, dst: torch.dtype) -> None:
    """Refuse, before any write, a pair of dtypes that copy_ cannot convert (a probe of torch)."""
    if src == dst:
        return
    ok = _CONVERTIBLE.get((src, dst))
    if ok is None:
        try:
            torch.zeros(2, dtype=src).to(dst)
            ok = True
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _CONVERTIBLE[(src, dst)] = ok
    if not ok:
        raise UnsupportedError(f"tensor {name!r}: torch does not convert {src} to the destination's {dst}")


def _view_key(t: torch.Tensor) -> tuple:
    """What makes two tensors the same memory seen the same way (tied weights); for a tensor
    without an address of its own (meta, a wrapper subclass), the object itself."""
    if t.device.type != "meta" and type(t) in (torch.Tensor, torch.nn.Parameter):
        return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.is_conj(), t.is_neg())
    return ("object", id(t))


def _missing(state: Mapping[str, torch.Tensor], entries: Mapping[str, Any], writes: list[_Write]) -> list[str]:
    """Destinations the checkpoint does not name, less those that are the same tensor as one it
    does (tied weights: a checkpoint stores them once)."""
    loaded = {_view_key(w.dest) for w in writes}
    return [n for n, t in state.items() if n not in entries and _view_key(t) not in loaded]


def _distinct(writes: list[_Write]) -> list[_Write]:
    """One write per destination: when a checkpoint holds tied weights under several names, the
    last wins, as in load_state_dict, and no two reads race on the same memory."""
    last = {}
    for w in writes:
        last[_view_key(w.dest)] = w
    return list(last.values())


def _raw(t: torch.Tensor) -> bool:
    """Whether t's memory holds its values as they are (no lazy conjugation or negation)."""
    return not (t.is_conj() or t.is_neg())


def _is_direct(w: _Write) -> bool:
    return w.dest.device.type == "cpu" and w.dest.dtype == w.dtype and w.dest.is_contiguous() and _raw(w.dest)


def _read_direct(ckpt, writes: list[_Write], threads: int, callback, total: int) -> int:
    rows = [(w.file, w.offset, w.dest.numel() * w.dtype.itemsize, w.dest.data_ptr()) for w in writes]
    rows = [r for r in rows if r[2]]
    if not rows:
        return 0
    report = None if callback is None else (lambda d, _t: callback(d, total))
    return ckpt.read_into(np.array(rows, dtype=np.uint64), threads=threads, progress=report)


def _pieces(dest: torch.Tensor, first: int, limit: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(view of `dest`, index of its first element in the file's row-major order) covering
    `dest` in pieces of at most `limit` elements (at least one row of one element)."""
    n = dest.numel()
    if n == 0:
        return
    if dest.is_contiguous():
        flat = dest.view(-1)
        for a in range(0, n, limit):
            yield flat[a:a + limit], first + a
        return
    per_row = n // dest.shape[0]
    if per_row <= limit:
        step = limit // per_row
        for a in range(0, dest.shape[0], step):
            yield dest[a:a + step], first + a * per_row
    else:
        for i in range(dest.shape[0]):
            yield from _pieces(dest[i], first + i * per_row, limit)


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _converted_on_host(w: _Write) -> int:
    """Bytes per element of a CUDA destination of another dtype, which is converted on the host
    into the buffer and then copied as it is (0 for the others). torch's own copy_ from the
    CPU converts there too, with a temporary of its own; fst converts into memory it has."""
    return w.dest.element_size() if w.dest.device.type == "cuda" and w.dest.dtype != w.dtype else 0


def _groups(writes: list[_Write], capacity: int) -> Iterator[list[tuple[_Write, torch.Tensor, int, int, int]]]:
    """Groups of (write, piece, index of its first element, place of its file bytes in the
    buffer, place of its converted bytes or -1) that fit in `capacity` bytes."""
    group, used = [], 0
    for w in writes:
        size, converted = w.dtype.itemsize, _converted_on_host(w)
        # A piece alone always fits: its two parts, and the alignment between them.
        limit = max(1, (capacity - _ALIGN) // (size + converted))
        for piece, first in _pieces(w.dest, 0, limit):
            n = piece.numel()
            for start in (_align(used), 0):
                at = start
                conv_at = _align(at + n * size) if converted else -1
                end = conv_at + n * converted if converted else at + n * size
                if end <= capacity or not group:
                    break
                yield group
                group = []
            group.append((w, piece, first, at, conv_at))
            used = end
    if group:
        yield group


@functools.cache
def _fst_converts(src: torch.dtype, dst: torch.dtype) -> bool:
    names = _FORMAT_NAME.get(src), _FORMAT_NAME.get(dst)
    return None not in names and _core.conversion_supported(*names)


def _convert(src: torch.Tensor, out: torch.Tensor, mode: str) -> None:
    """Contiguous flat host tensors: src's elements converted into out, as torch's .to() does."""
    if _fst_converts(src.dtype, out.dtype):
        _core.convert(src.view(torch.uint8).numpy(), _FORMAT_NAME[src.dtype], _FORMAT_NAME[out.dtype],
                      out=out.view(torch.uint8).numpy(), mode=mode)
    else:
        out.copy_(src)


# A file this much in the page cache is converted out of a mapping (as the core's host loads
# decide between a mapping and reads).
_CACHED = 0.98


def _cached_files(ckpt, files: list[int]) -> set[int]:
    """The files among `files` whose data is in the page cache (by path: a hint only, the
    mapping itself goes through the parsed descriptor)."""
    return {f for f in set(files) if _core.page_cache_residency(ckpt.files[f]) >= _CACHED}


def _spans(writes: list[_Write], limit: int) -> Iterator[tuple[int, int, int, list[tuple[_Write, torch.Tensor, int]]]]:
    """(file, first byte, end, pieces): the writes' pieces in file order, gathered into spans
    of one file of at most `limit` bytes (a piece, of at most `limit` bytes, starts a new span
    when it does not fit). Each piece is (write, view of its destination, its absolute offset)."""
    pieces = [(w, piece, w.offset + first * w.dtype.itemsize)
              for w in writes for piece, first in _pieces(w.dest, 0, max(1, limit // w.dtype.itemsize))]
    pieces.sort(key=lambda p: (p[0].file, p[2]))
    span: list[tuple[_Write, torch.Tensor, int]] = []
    span_end = 0
    for p in pieces:
        end = p[2] + p[1].numel() * p[0].dtype.itemsize
        if span and (p[0].file != span[0][0].file or end - span[0][2] > limit):
            yield span[0][0].file, span[0][2], span_end, span
            span = []
        span_end = max(span_end, end) if span else end
        span.append(p)
    if span:
        yield span[0][0].file, span[0][2], span_end, span


def _copy_mapped(ckpt, writes: list[_Write], span_limit: int, callback, done: int, total: int) -> int:
    """CPU destinations whose bytes are in the page cache: converted or copied straight out of
    mappings of the file (fst._mapped), one pass over the data where the bounce buffer takes
    two (a read into it, then the conversion out of it), and a user-space copy where a read
    is the kernel's (10% faster here). Spans of at most `span_limit` bytes of the file, one
    mapping each, so no more than that is mapped at a time."""
    mode = conversion_mode()
    for file, first, end, pieces in _spans(writes, span_limit):
        # In the page cache already: asking for it again would cost 1% of the copy.
        with mapped_span(ckpt, file, first, end - first, prefetch_span=False) as raw:
            for w, piece, offset in pieces:
                nbytes = piece.numel() * w.dtype.itemsize
                src = raw[offset - first:offset - first + nbytes].view(w.dtype)
                if piece.dtype != w.dtype and piece.is_contiguous() and _raw(piece):
                    _convert(src, piece.detach().view(-1), mode)
                else:
                    piece.copy_(src.view(piece.shape))
                done += nbytes
            del src, raw
        if callback is not None:
            callback(done, total)
    # Bytes copied out of a file rewritten meanwhile are refused, as read_into refuses reads.
    for f in {w.file for w in writes}:
        ckpt.check_unchanged(f)
    return done


def _read_bounced(ckpt, writes: list[_Write], budget: int, threads: int, callback, done: int, total: int) -> int:
    """Read `writes` through one bounce buffer of at most `budget` bytes (two, pinned, when
    some destination is on a GPU: one is read into while the other's copies run). Returns the
    bytes of the buffers."""
    if not writes:
        return 0
    cost = [w.dtype.itemsize + _converted_on_host(w) for w in writes]
    need = sum(w.dest.numel() * c + 2 * _ALIGN for w, c in zip(writes, cost))  # everything in one group
    on_gpu = any(w.dest.device.type == "cuda" for w in writes)
    halves = 2 if on_gpu and need > budget // 2 else 1
    # A buffer of $FST_STAGING_BUFFER (16 MiB) reused is faster than one of the whole budget
    # used once: its pages are faulted in once, and what was read is still in the CPU's cache
    # when it is converted.
    capacity = max(min(need, budget // halves, _settings.staging_buffer()), max(cost) + 2 * _ALIGN)
    buffers = [torch.empty(capacity, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(halves)]
    # Requests small enough that every reader has some of a group.
    max_request = max(256 << 10, capacity // (2 * (threads or _core.default_threads())))
    pending: list[list[torch.cuda.Event]] = [[] for _ in range(halves)]
    mode = conversion_mode()
    for k, group in enumerate(_groups(writes, capacity)):
        buf = buffers[k % halves]
        for event in pending[k % halves]:  # this half's last copies have left it
            event.synchronize()
        base = buf.data_ptr()
        rows = np.array([(w.file, w.offset + first * w.dtype.itemsize, piece.numel() * w.dtype.itemsize, base + at)
                         for w, piece, first, at, _ in group], dtype=np.uint64)
        offset = done
        done += ckpt.read_into(rows, threads=threads, max_request=max_request,
                               progress=None if callback is None else (lambda d, _t: callback(offset + d, total)))
        devices = set()
        for w, piece, _first, at, conv_at in group:
            n = piece.numel()
            src = buf[at:at + n * w.dtype.itemsize].view(w.dtype)
            if piece.device.type == "cuda":
                if conv_at >= 0:
                    out = buf[conv_at:conv_at + n * piece.element_size()].view(piece.dtype)
                    _convert(src, out, mode)
                    src = out
                # On the current stream: after what the caller queued, before what it queues next.
                piece.copy_(src.view(piece.shape), non_blocking=True)
                devices.add(piece.device)
            elif piece.dtype != w.dtype and piece.is_contiguous() and _raw(piece):
                _convert(src, piece.detach().view(-1), mode)
            else:
                piece.copy_(src.view(piece.shape))
        pending[k % halves] = [torch.cuda.current_stream(d).record_event() for d in devices]
    return capacity * halves
