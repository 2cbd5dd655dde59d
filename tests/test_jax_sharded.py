"""Sharded jax.Array loading (fst.jax) against jax.device_put of the reference, bit for bit.

JAX must see 8 host devices, which XLA_FLAGS sets only before JAX starts, and other test
files of this pytest process may have started JAX already. So the checks run in child
processes (this file, run as a script) that print their results as JSON; the tests here
assert on those results. `python tests/test_jax_sharded.py single DIR` runs the
single-process checks by hand; `mp DIR PORT RANK` is one rank of the two-process run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# Mesh shape, axis names, and the specs each mesh is tried with (axis names, None for a
# dimension that is not split, a tuple for a dimension split over several axes).
MESHES = {
    "8": ((8,), ("d",)),
    "2x4": ((2, 4), ("a", "b")),
    "4x2": ((4, 2), ("a", "b")),
}
SPECS = {
    "8": {"dim0": ("d",), "dim1": (None, "d"), "replicated": ()},
    "2x4": {"dim0": ("a",), "dim0_ab": (("a", "b"),), "dim1": (None, "b"), "dim1_ba": (None, ("b", "a")),
            "both": ("a", "b"), "both_ba": ("b", "a"), "replicated": ()},
    "4x2": {"dim0": ("b",), "dim1": (None, "a"), "both": ("a", "b"), "both_ba": ("b", "a"), "replicated": ()},
}
CASES = [f"{m}-{s}" for m in MESHES for s in SPECS[m]]
DTYPES = ["BF16", "F32", "I8"]
OTHER_CHECKS = ["forms", "replicate_rest", "device_and_keys", "iter_tensors", "index_checkpoint", "indivisible",
                "bad_arguments", "load_pytree", "pytree_errors", "zero_copy"]
TIMEOUT = 240


def tensors_for(spec: tuple) -> list[tuple[str, str, list[int]]]:
    """Tensors every spec can split: each split dimension is a multiple of 8, rows and
    shards have odd byte lengths; 1-d and 0-d tensors where the spec's rank allows."""
    shapes = [[24, 40], [8, 8], [16, 8, 3]]
    if len(spec) <= 1:
        shapes += [[40]]
    if len(spec) == 0:
        shapes += [[]]
    return [(f"t{i}.{d.lower()}", d, s) for d in DTYPES for i, s in enumerate(shapes)]


# ------------------------------------------------------------------------ the children -----


def _reference(path) -> dict:
    """name -> numpy array from safetensors' own reader (torch), for every dtype used here."""
    import ml_dtypes
    import numpy as np
    import safetensors

    kinds = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "I8": np.int8, "F16": np.float16, "U8": np.uint8,
             "F64": np.float64}
    out = {}
    with safetensors.safe_open(str(path), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            raw = t.contiguous().reshape(-1).view(__import__("torch").uint8).numpy()
            dtype = f.get_slice(k).get_dtype()
            out[k] = raw.view(kinds[dtype]).reshape(tuple(t.shape))
    return out


def _same_as_device_put(got, ref, sharding) -> list[str]:
    """Differences between `got` and jax.device_put(ref, sharding): sharding, devices, bytes."""
    import jax
    import numpy as np

    want = jax.device_put(ref, sharding)
    errs = []
    if got.shape != want.shape or got.dtype != want.dtype:
        errs.append(f"shape/dtype {got.shape} {got.dtype} != {want.shape} {want.dtype}")
    if not got.sharding.is_equivalent_to(want.sharding, len(ref.shape)):
        errs.append(f"sharding {got.sharding} != {want.sharding}")
    a = sorted(got.addressable_shards, key=lambda s: s.device.id)
    b = sorted(want.addressable_shards, key=lambda s: s.device.id)
    if [s.device for s in a] != [s.device for s in b]:
        errs.append("devices differ")
    for x, y in zip(a, b):
        if x.index != y.index or np.asarray(x.data).tobytes() != np.asarray(y.data).tobytes():
            errs.append(f"shard on {x.device} differs (index {x.index} vs {y.index})")
    return errs


def _nbytes(a) -> int:
    return int(a.size) * a.dtype.itemsize


def _check_case(case: str, files: dict) -> list[str]:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import fst

    mesh_name, spec_name = case.split("-")
    shape, axes = MESHES[mesh_name]
    spec = P(*SPECS[mesh_name][spec_name])
    mesh = jax.make_mesh(shape, axes)
    # The shifted file puts every tensor at an odd offset (after a 3-byte "__prefix__").
    path = files[len(spec)]["shifted" if mesh_name == "4x2" else "aligned"]
    ref = {n: r for n, r in _reference(path).items() if n.startswith("t")}
    sharding = NamedSharding(mesh, spec)
    got = fst.load(path, framework="jax", sharding=sharding, keys="t*")
    st = fst.last_load_stats()
    errs = []
    if sorted(got) != sorted(ref):
        return [f"names {sorted(got)} != {sorted(ref)}"]
    held: dict[str, int] = {}
    for name, arr in got.items():
        errs += [f"{name}: {e}" for e in _same_as_device_put(arr, ref[name], sharding)]
        for s in arr.addressable_shards:
            k = f"{s.device.platform}:{s.device.id}"
            held[k] = held.get(k, 0) + _nbytes(s.data)
    total = sum(_nbytes(r) for r in ref.values())
    # One process: every byte of the checkpoint read exactly once, whatever the spec.
    if st["bytes"] != total or st["checkpoint_bytes"] != total:
        errs.append(f"bytes {st['bytes']} / checkpoint {st['checkpoint_bytes']} != {total}")
    if st["device_bytes"] != held:
        errs.append(f"device_bytes {st['device_bytes']} != shards held {held}")
    if sum(st["device_bytes_read"].values()) != st["bytes"]:
        errs.append(f"device_bytes_read sums to {sum(st['device_bytes_read'].values())}, not {st['bytes']}")
    # No block on two devices: each device read exactly its shards.
    if all(n == 1 for n in _replicas(mesh, spec)) and st["device_bytes_read"] != held:
        errs.append(f"device_bytes_read {st['device_bytes_read']} != shards {held}")
    if st["framework"] != "jax" or st["process_count"] != 1:
        errs.append(f"stats {st}")
    return errs


def _replicas(mesh, spec) -> list[int]:
    used = {a for p in spec if p is not None for a in (p if isinstance(p, tuple) else (p,))}
    return [n for a, n in mesh.shape.items() if a not in used]


def _check_other(check: str, files: dict, tmp: Path) -> list[str]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import fst
    from checkpoints import write

    mesh = jax.make_mesh((2, 4), ("a", "b"))
    path = files[2]["aligned"]
    ref = _reference(path)
    errs: list[str] = []

    def expect(got, name, sharding):
        errs.extend(f"{name}: {e}" for e in _same_as_device_put(got, ref[name], sharding))

    def raises(exc_type, fn, text):
        try:
            fn()
        except exc_type as e:
            if text not in str(e):
                errs.append(f"{exc_type.__name__} without {text!r}: {e}")
            return
        except Exception as e:  # noqa: BLE001
            errs.append(f"expected {exc_type.__name__} ({text}), got {type(e).__name__}: {e}")
            return
        errs.append(f"expected {exc_type.__name__} ({text}), nothing raised")

    if check == "forms":
        # A mapping of glob patterns to PartitionSpecs (with mesh=) and to Shardings.
        s_ab = NamedSharding(mesh, P("a", "b"))
        got = fst.load(path, framework="jax", mesh=mesh, sharding={"t0.*": P("a", "b"), "t1.*": s_ab, "*": P("b")})
        for name in ref:
            want = P("a", "b") if name.startswith(("t0.", "t1.")) else P("b")
            expect(got[name], name, NamedSharding(mesh, want))
        # An exact name wins over a pattern that comes first.
        got = fst.load(path, framework="jax", mesh=mesh, sharding={"t0.*": P("a"), "t0.f32": P(None, "a")})
        expect(got["t0.f32"], "t0.f32", NamedSharding(mesh, P(None, "a")))
        expect(got["t0.bf16"], "t0.bf16", NamedSharding(mesh, P("a")))
        # A callable; None leaves a tensor to device=.
        seen = []

        def rule(name, shape, dtype):
            seen.append((name, shape, dtype))
            return P(None, "b") if dtype == "BF16" else None

        got = fst.load(path, framework="jax", mesh=mesh, sharding=rule)
        if ("t0.bf16", (24, 40), "BF16") not in seen:
            errs.append(f"callable saw {seen[:3]}...")
        for name in ref:
            if name.endswith(".bf16"):
                expect(got[name], name, NamedSharding(mesh, P(None, "b")))
            else:
                expect(got[name], name, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        # A sharding that is not a NamedSharding.
        single = jax.sharding.SingleDeviceSharding(jax.devices()[5])
        got = fst.load(path, framework="jax", sharding=single, keys="t2.*")
        for name in got:
            expect(got[name], name, single)
    elif check == "replicate_rest":
        got = fst.load(path, framework="jax", mesh=mesh, sharding={"t0.*": P("a", "b")}, replicate_rest=True)
        for name in ref:
            expect(got[name], name, NamedSharding(mesh, P("a", "b") if name.startswith("t0.") else P()))
        # No mesh: the devices come from the shardings given.
        sub = jax.make_mesh((2, 2), ("x", "y"), devices=jax.devices()[4:])
        got = fst.load(path, framework="jax", sharding={"t0.*": NamedSharding(sub, P("x"))}, replicate_rest=True)
        expect(got["t1.i8"], "t1.i8", NamedSharding(sub, P()))
        st = fst.last_load_stats()
        if sorted(st["device_bytes"]) != [f"cpu:{i}" for i in range(4, 8)]:
            errs.append(f"replicated over {sorted(st['device_bytes'])}")
        if st["bytes"] != sum(_nbytes(r) for r in ref.values()):
            errs.append(f"replicated tensors read more than once: {st['bytes']}")
    elif check == "device_and_keys":
        got = fst.load(path, framework="jax", mesh=mesh, sharding={"t0.*": P("a")}, device="cpu:6",
                       keys=["t0.f32", "t2.*"])
        if sorted(got) != sorted(["t0.f32"] + [n for n in ref if n.startswith("t2.")]):
            errs.append(f"keys: {sorted(got)}")
        expect(got["t0.f32"], "t0.f32", NamedSharding(mesh, P("a")))
        for name in got:
            if name.startswith("t2."):
                expect(got[name], name, jax.sharding.SingleDeviceSharding(jax.devices()[6]))
        st = fst.last_load_stats()
        want = sum(_nbytes(ref[n]) for n in got)
        if st["bytes"] != want:
            errs.append(f"keys=: read {st['bytes']} bytes, selected {want}")
    elif check == "iter_tensors":
        rules = {"*.bf16": P("a", "b"), "*.f32": P(None, "b")}
        whole = fst.load(path, framework="jax", mesh=mesh, sharding=rules, replicate_rest=True)
        names = []
        for budget in (1, 700, 1 << 30):
            names = []
            for name, arr in fst.iter_tensors(path, framework="jax", mesh=mesh, sharding=rules, replicate_rest=True,
                                              budget=budget):
                names.append(name)
                want = whole[name]
                if arr.sharding != want.sharding or np.asarray(arr).tobytes() != np.asarray(want).tobytes():
                    errs.append(f"iter_tensors(budget={budget}) {name} differs from load")
            if names != list(whole):
                errs.append(f"iter_tensors order {names} != {list(whole)}")
            st = fst.last_load_stats()
            if st["bytes"] != sum(_nbytes(r) for r in ref.values()):
                errs.append(f"iter_tensors(budget={budget}) read {st['bytes']}")
    elif check == "index_checkpoint":
        root = tmp / "index"
        root.mkdir()
        weight_map = {}
        want = {}
        for k in range(2):
            fname = f"model-0000{k + 1}-of-00002.safetensors"
            tensors = [(f"l{k}.w{i}", "BF16", [8 * (i + 1), 16]) for i in range(3)]
            write(root / fname, tensors, seed=k, prefix=b"x" * k)  # the second file's tensors at odd offsets
            weight_map.update({t[0]: fname for t in tensors} | ({"__prefix__": fname} if k else {}))
            want.update({n: r for n, r in _reference(root / fname).items() if n != "__prefix__"})
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        got = fst.load(root / "model.safetensors.index.json", framework="jax", mesh=mesh,
                       sharding={"l*": P("b", "a")})
        for name, r in want.items():
            errs.extend(f"{name}: {e}" for e in _same_as_device_put(got[name], r, NamedSharding(mesh, P("b", "a"))))
    elif check == "indivisible":
        # JAX refuses shards of unequal size; so does fst, naming the tensor.
        odd = write(tmp / "odd.safetensors", [("odd", "F32", [6, 10])])
        raises(ValueError, lambda: fst.load(odd, framework="jax", mesh=mesh, sharding={"odd": P("b")}), "'odd'")
        raises(ValueError, lambda: fst.load(odd, framework="jax", mesh=mesh, sharding={"odd": P(None, "b")}), "'odd'")
        raises(ValueError, lambda: fst.load(odd, framework="jax", mesh=mesh, sharding={"odd": P("a", "b", "a")}),
               "'odd'")
        # What JAX does divide evenly loads: 6 rows over 2, 10 columns over 2.
        got = fst.load(odd, framework="jax", mesh=jax.make_mesh((2, 2, 2), ("x", "y", "z")),
                       sharding={"odd": P("x", "z")})
        errs.extend(_same_as_device_put(got["odd"], _reference(odd)["odd"],
                                        NamedSharding(got["odd"].sharding.mesh, P("x", "z"))))
    elif check == "bad_arguments":
        raises(ValueError, lambda: fst.load(path, framework="jax", sharding={"*": P("a")}), "mesh=")
        raises(ValueError, lambda: fst.load(path, framework="jax", replicate_rest=True), "replicate_rest")
        raises(TypeError, lambda: fst.load(path, framework="jax", sharding=42), "sharding=")
        raises(TypeError, lambda: fst.load(path, framework="jax", mesh=mesh, sharding={"*": "a"}), "PartitionSpec")
        raises(ValueError, lambda: fst.load(path, framework="numpy", mesh=mesh), "framework='jax'")
        raises(KeyError, lambda: fst.load(path, framework="jax", mesh=mesh, keys="nope"), "nope")
        raises(ValueError, lambda: list(fst.iter_tensors(path, framework="jax", mesh=mesh, budget=0)), "budget")
    elif check == "load_pytree":
        s_ab, s_b = NamedSharding(mesh, P("a", "b")), NamedSharding(mesh, P(None, "b"))
        tree = {
            "t0": {"bf16": jax.ShapeDtypeStruct((24, 40), jnp.bfloat16, sharding=s_ab),
                   "f32": jax.ShapeDtypeStruct((24, 40), jnp.float32, sharding=s_b)},
            "t1.i8": jax.ShapeDtypeStruct((8, 8), jnp.int8),  # a full name beside nested ones
        }
        got = fst.jax.load_pytree(path, tree)
        if set(got) != {"t0", "t1.i8"} or set(got["t0"]) != {"bf16", "f32"}:
            errs.append(f"tree structure {jax.tree_util.tree_structure(got)}")
        expect(got["t0"]["bf16"], "t0.bf16", s_ab)
        expect(got["t0"]["f32"], "t0.f32", s_b)
        expect(got["t1.i8"], "t1.i8", jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        st = fst.last_load_stats()
        want = sum(_nbytes(ref[n]) for n in ("t0.bf16", "t0.f32", "t1.i8"))
        if st["bytes"] != want:
            errs.append(f"load_pytree read {st['bytes']} bytes for {want}")
        listed = write(tmp / "listed.safetensors", [("t2.1.i8", "I8", [16, 8, 3]), ("t2.0.w", "F32", [8, 4])])
        lref = _reference(listed)
        # Lists: positions are part of the names ("t2.0.w").
        tree2 = {"t2": [{"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("b")))},
                        {"i8": jax.ShapeDtypeStruct((16, 8, 3), jnp.int8, sharding=NamedSharding(mesh, P("b")))}]}
        got2 = fst.jax.load_pytree(listed, tree2)
        if jax.tree_util.tree_structure(got2) != jax.tree_util.tree_structure(tree2):
            errs.append("list tree structure changed")
        errs.extend(_same_as_device_put(got2["t2"][0]["w"], lref["t2.0.w"], NamedSharding(mesh, P("b"))))
        errs.extend(_same_as_device_put(got2["t2"][1]["i8"], lref["t2.1.i8"], NamedSharding(mesh, P("b"))))
        # A leaf without a sharding goes to device=.
        got3 = fst.jax.load_pytree(path, {"t0.f32": jax.ShapeDtypeStruct((24, 40), jnp.float32)}, device="cpu:2")
        expect(got3["t0.f32"], "t0.f32", jax.sharding.SingleDeviceSharding(jax.devices()[2]))
    elif check == "pytree_errors":
        from fst.jax import PytreeMismatchError

        sds = jax.ShapeDtypeStruct
        raises(PytreeMismatchError, lambda: fst.jax.load_pytree(path, {"t0": {"bf16": sds((24, 41), jnp.bfloat16)}}),
               "t0.bf16: shape (24, 40) in the checkpoint, (24, 41) in the tree")
        raises(ValueError, lambda: fst.jax.load_pytree(path, {"t0": {"nope": sds((1,), jnp.float32)}}),
               "not in the checkpoint: t0.nope")
        raises(fst.FstError, lambda: fst.jax.load_pytree(path, {"t0.f32": sds((24, 40), jnp.bfloat16)}),
               "dtype F32 in the checkpoint, bfloat16 in the tree")
        raises(ValueError, lambda: fst.jax.load_pytree(path, {"t0.f32": sds((24, 40), jnp.float32), "t0": {
            "f32": sds((24, 40), jnp.float32)}}), "same tensor")
    elif check == "zero_copy":
        # Whole row blocks become device buffers in place, whether the file's data is 64-byte
        # aligned (a file mapping) or not (read into aligned memory); replicas share them.
        # F64 blocks (JAX without x64 makes them F32) are converted once per block.
        tensors = [("r", "F32", [16, 24]), ("c", "BF16", [8, 8]), ("d", "F64", [8, 4])]
        rules = {"r": P("a"), "c": P(), "d": P("a")}
        for shift, backend in ((0, "mmap"), (8, "mmap"), (8, "pread")):
            f = _write_at(tmp / f"at{shift}.safetensors", tensors, shift)
            fref = _reference(f)
            got = fst.load(f, framework="jax", mesh=mesh, sharding=rules, backend=backend)
            st = fst.last_load_stats()
            label = f"data at {shift} mod 64, {backend}"
            for name, spec in rules.items():
                want = NamedSharding(mesh, spec)
                errs.extend(f"{label}: {e}" for e in _same_as_device_put(got[name], fref[name], want))
            if (st["host_copies"], st["zero_copy"]) != (2, 16):
                errs.append(f"{label}: {st['host_copies']} copies, {st['zero_copy']} in place")
            for name in rules:
                by_block: dict[str, set] = {}
                for sh in got[name].addressable_shards:
                    by_block.setdefault(str(sh.index), set()).add(sh.data.unsafe_buffer_pointer())
                if any(len(v) != 1 for v in by_block.values()):
                    errs.append(f"{label}: replicas of a block of {name} do not share one buffer")
                if any(ptr % 64 for v in by_block.values() for ptr in v):
                    errs.append(f"{label}: a block of {name} is not 64-byte aligned")
    else:
        errs.append(f"unknown check {check}")
    return errs


def _write_at(path: Path, tensors: list, shift: int) -> Path:
    """A checkpoint whose data starts `shift` bytes past a multiple of 64 (random contents)."""
    import numpy as np

    from checkpoints import nbytes, random_bytes

    rng = np.random.default_rng(shift)
    header, blobs, offset = {}, [], 0
    for name, dtype, shape in tensors:
        n = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        blobs.append(random_bytes(n, dtype, rng))
        offset += n
    text = json.dumps(header).encode()
    text += b" " * ((shift - 8 - len(text)) % 64)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return path


def _write_files(tmp: Path) -> dict:
    from checkpoints import write

    files = {}  # by the rank of the specs the file's tensors suit
    for rank in (0, 1, 2):
        tensors = tensors_for((None,) * rank)
        files[rank] = {
            "aligned": write(tmp / f"rank{rank}.safetensors", tensors, seed=rank),
            "shifted": write(tmp / f"rank{rank}-shifted.safetensors", tensors, seed=rank, prefix=b"abc"),
        }
    return files


def child_single(tmp: Path) -> dict:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax

    results = {"devices": len(jax.devices())}
    files = _write_files(tmp)
    for case in CASES + OTHER_CHECKS:
        try:
            errs = _check_case(case, files) if case in CASES else _check_other(case, files, tmp)
        except Exception:  # noqa: BLE001
            errs = [traceback.format_exc()]
        results[case] = errs
    return results


def child_rank(tmp: Path, port: int, rank: int) -> dict:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    import numpy as np

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                                   initialization_timeout=60)
    except Exception as exc:  # noqa: BLE001
        return {"skip": f"jax.distributed on CPU: {type(exc).__name__}: {exc}"}
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    import fst

    out: dict = {"rank": rank, "process_index": jax.process_index(), "errors": [], "cases": {}}
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    path = tmp / "mp.safetensors"
    ref = _reference(path)
    # "dim1_across": columns split between the processes; each reads the rows it needs
    # whole (the covering row range) and cuts its columns on the host.
    for label, spec in {"both": P("a", "b"), "dim0": P("a"), "dim1": P(None, "b"), "swapped": P("b", "a"),
                        "dim1_across": P(None, "a"), "replicated": P()}.items():
        sharding = NamedSharding(mesh, spec)
        # "__prefix__" goes to device=; "dim0" reads into fst's own (aligned) memory, which the
        # local devices then take in place.
        got = fst.load(path, framework="jax", sharding={"w.*": sharding}, backend="pread" if label == "dim0" else None)
        st = fst.last_load_stats()
        need = 0  # the rows of this process's blocks, each once
        for name, arr in got.items():
            r = ref[name]
            for s in arr.addressable_shards:
                if np.asarray(s.data).tobytes() != np.ascontiguousarray(r[s.index]).tobytes():
                    out["errors"].append(f"{label} {name}: shard on {s.device} differs")
            rows = set()
            for s in arr.addressable_shards:
                rows.update(range(*s.index[0].indices(r.shape[0])) if r.ndim else [0])
            need += len(rows) * (_nbytes(r) // max(1, r.shape[0] if r.ndim else 1))
            # A block on several local devices is placed once: they share one buffer.
            by_block: dict[str, set] = {}
            for s in arr.addressable_shards:
                by_block.setdefault(str(s.index), set()).add(s.data.unsafe_buffer_pointer())
            if any(len(v) != 1 for v in by_block.values()):
                out["errors"].append(f"{label} {name}: replicas of a block do not share one buffer")
            if name.startswith("w.") and arr.is_fully_addressable:
                out["errors"].append(f"{label} {name}: fully addressable {arr.is_fully_addressable}")
        # The whole arrays, gathered (as integers: the gather may add zeros, which turns
        # -0.0 into 0.0): every process got its part right.
        as_int = jax.jit(lambda x: jax.lax.bitcast_convert_type(x, jnp.int16))
        for name, arr in (("w.bf16", as_int(got["w.bf16"])), ("w.i8", got["w.i8"])):
            gathered = np.asarray(multihost_utils.process_allgather(arr, tiled=True))
            if gathered.tobytes() != ref[name].tobytes():
                out["errors"].append(f"{label}: gathered {name} differs from the checkpoint "
                                     f"({int((gathered.view(np.uint8) != ref[name].view(np.uint8)).sum())} bytes)")
        out["cases"][label] = {"bytes": st["bytes"], "need": need, "process_index": st["process_index"],
                               "process_count": st["process_count"], "copies": st["host_copies"],
                               "in_place": st["zero_copy"],
                               "held": sorted(st["device_bytes"]), "read_for": sorted(st["device_bytes_read"]),
                               "local": sorted(f"cpu:{d.id}" for d in jax.local_devices())}
    jax.distributed.shutdown()
    return out


# ------------------------------------------------------------------------ the tests --------


def _run(args: list[str], timeout: int = TIMEOUT) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(HERE))
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    pytest.importorskip("jax")
    return _run(["single", str(tmp_path_factory.mktemp("sharded"))])


def test_child_sees_eight_devices(single):
    assert single["devices"] == 8


@pytest.mark.parametrize("case", CASES)
def test_mesh_and_spec(single, case):
    assert single[case] == [], "\n".join(single[case])


@pytest.mark.parametrize("check", OTHER_CHECKS)
def test_behaviour(single, check):
    assert single[check] == [], "\n".join(single[check])


def test_import_fst_does_not_import_jax():
    code = "import sys, fst; assert 'jax' not in sys.modules; import fst.jax; fst.jax.load_pytree; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_two_processes(tmp_path):
    pytest.importorskip("jax")
    from checkpoints import write

    write(tmp_path / "mp.safetensors", [("w.bf16", "BF16", [16, 24]), ("w.f32", "F32", [8, 40]),
                                        ("w.i8", "I8", [24, 8])], prefix=b"z")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "mp", str(tmp_path), str(port), str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(HERE))
             for r in range(2)]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, f"rank failed ({p.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any("skip" in o for o in outs):
        pytest.skip(next(o["skip"] for o in outs if "skip" in o))
    total = 16 * 24 * 2 + 8 * 40 * 4 + 24 * 8  # the "w.*" tensors; each rank also reads the 1-byte prefix
    assert sorted(o["process_index"] for o in outs) == [0, 1]
    for o in outs:
        assert o["errors"] == [], o["errors"]
        for label, c in o["cases"].items():
            assert c["process_count"] == 2 and c["process_index"] == o["process_index"]
            assert c["held"] == c["local"], f"{label}: stats name devices of another process"
            assert set(c["read_for"]) <= set(c["local"]), label
            # Each process read exactly the rows its own devices hold.
            assert c["bytes"] == c["need"], (label, c)
    for label in ("both", "dim0"):  # rows split across the processes: every byte read once in all
        assert sum(o["cases"][label]["bytes"] for o in outs) == total + 2, label
    assert all(o["cases"]["replicated"]["bytes"] == total + 1 for o in outs)
    # 3 tensors x 4 local devices + the prefix, all without a copy, on each process's devices.
    assert all((o["cases"]["dim0"]["copies"], o["cases"]["dim0"]["in_place"]) == (0, 13) for o in outs)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    mode = sys.argv[1]
    if mode == "single":
        result = child_single(Path(sys.argv[2]))
    elif mode == "mp":
        result = child_rank(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
