"""Sharded JAX loading on this machine: fst against safetensors + jax.device_put.

    python bench/bench_jax.py [--size 2GiB] [--repeat 3] [--mesh 2x4] [--layout tp,fsdp_tp]
                              [--dir DIR] [--json OUT]

A BF16 checkpoint of --size (transformer-like layers stored like Hugging Face Linear
weights, (out, in): attention 2048x2048, w_gate/w_up 8192x2048, w_down 2048x8192, 1-d
norms; written like safetensors does, the header padded to 8 bytes, so the data is not
64-byte aligned) is sharded over a 2-axis mesh ("data", "model") of host CPU devices (8 by
default, via XLA_FLAGS) with each --layout:

  tp       Megatron tensor parallelism, replicated over "data":
           wq/wk/wv/w_gate/w_up P("model", None) (row blocks), wo/w_down P(None, "model")
  fsdp_tp  2-D: wq/wk/wv/w_gate/w_up P("model", "data"), wo/w_down P("data", "model")
           (every block cut along both dimensions)
  and the rest (norms) replicated (replicate_rest=True).

  fst:       fst.load(path, framework="jax", mesh=mesh, sharding=rules, replicate_rest=True)
  reference: safetensors.flax.load_file(path), then jax.device_put(x, sharding) per tensor

Every load runs in a fresh process, warm (the file in the page cache); the time runs from
just before the load call to after every shard is ready and one byte in each 4 KiB page
of every shard has been read. Medians over --repeat runs; fst's bytes read come from
fst.last_load_stats().
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fst import benchmark as bm

D, F = 2048, 8192  # model and MLP widths
MiB, GiB = 1 << 20, 1 << 30


def parse_size(text: str) -> int:
    units = {"kib": 1 << 10, "mib": MiB, "gib": GiB, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "": 1}
    num = text.rstrip("KMGiBkmgib")
    return int(float(num) * units[text[len(num):].lower()])


def tensors_of(size: int) -> list[tuple[str, list[int]]]:
    """(name, shape) of BF16 tensors adding up to about `size` bytes."""
    per_layer = 2 * (4 * D * D + 3 * D * F + 2 * D)
    tensors = []
    for i in range(max(1, round(size / per_layer))):
        p = f"layers.{i}"
        tensors += [(f"{p}.attn_norm", [D])]
        tensors += [(f"{p}.attn.{w}", [D, D]) for w in ("wq", "wk", "wv", "wo")]
        tensors += [(f"{p}.mlp_norm", [D]), (f"{p}.mlp.w_gate", [F, D]), (f"{p}.mlp.w_up", [F, D]),
                    (f"{p}.mlp.w_down", [D, F])]
    return tensors


def write_checkpoint(path: Path, size: int) -> int:
    import numpy as np

    rng = np.random.default_rng(0)
    header, offset = {}, 0
    tensors = tensors_of(size)
    for name, shape in tensors:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in tensors:
            # Finite values (bf16 with a bounded exponent): both loaders see ordinary weights.
            bits = rng.integers(0, 1 << 16, int(np.prod(shape)), dtype=np.uint16) & 0xBFFF
            f.write(bits.tobytes())
    return offset


def rules_for(layout: str) -> dict[str, tuple]:
    """Name pattern -> partition spec (as a tuple) of a layout."""
    column, row = {"tp": (("model", None), (None, "model")),
                   "fsdp_tp": (("model", "data"), ("data", "model"))}[layout]
    out = {f"*.attn.{w}": column for w in ("wq", "wk", "wv")}
    out |= {"*.mlp.w_gate": column, "*.mlp.w_up": column, "*.attn.wo": row, "*.mlp.w_down": row}
    return out


# ------------------------------------------------------------------------ one timed load ---


def child(loader: str, path: str, mesh_shape: tuple[int, ...], layout: str) -> dict:
    n = 1
    for m in mesh_shape:
        n *= m
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import fnmatch

    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh(mesh_shape, ("data", "model"))
    rules = {k: P(*v) for k, v in rules_for(layout).items()}

    def sharding_for(name):
        for pattern, spec in rules.items():
            if fnmatch.fnmatchcase(name, pattern):
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    jax.block_until_ready(jax.device_put(np.zeros(8, np.float32), NamedSharding(mesh, P())))  # start the runtime
    stats = None
    t0 = time.perf_counter()
    if loader == "fst":
        import fst

        out = fst.load(path, framework="jax", mesh=mesh, sharding=rules, replicate_rest=True)
        stats = fst.last_load_stats()
    else:
        from safetensors.flax import load_file

        host = load_file(path)
        out = {k: jax.device_put(v, sharding_for(k)) for k, v in host.items()}
        del host
    jax.block_until_ready(out)
    t_ready = time.perf_counter()
    touched = 0
    for arr in out.values():
        for s in arr.addressable_shards:
            b = np.asarray(s.data).reshape(-1).view(np.uint8)
            touched += int(b[::4096].sum())
    t1 = time.perf_counter()
    held = sum(s.data.nbytes for a in out.values() for s in a.addressable_shards)
    res = {"seconds": t1 - t0, "ready_seconds": t_ready - t0, "held_bytes": held, "touched": touched,
           "devices": len(jax.devices())}
    if stats is not None:
        res["stats"] = {k: stats[k] for k in ("backend", "reason", "bytes", "bytes_read", "host_copies", "zero_copy",
                                              "read_seconds", "threads", "device_bytes_read")}
    return res


def run_child(loader: str, path: Path, mesh: str, layout: str) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, __file__, "--child", loader, str(path), "--mesh", mesh, "--layout", layout],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{loader} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm(path: Path) -> None:
    """Read the whole file, so that it is in the page cache (as far as memory allows)."""
    with open(path, "rb") as f:
        while f.read(64 * MiB):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mesh", default="2x4")
    ap.add_argument("--layout", default="tp,fsdp_tp", help="comma-separated: tp, fsdp_tp")
    ap.add_argument("--dir", default=None, help="where the checkpoint goes (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--child", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    mesh_shape = tuple(int(x) for x in args.mesh.split("x"))
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], mesh_shape, args.layout)))
        return

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench_jax.safetensors"
        size = parse_size(args.size)
        print(f"writing {size / GiB:.2f} GiB BF16 checkpoint ...", file=sys.stderr, flush=True)
        data_bytes = write_checkpoint(path, size)
        layouts = args.layout.split(",")
        load_before = os.getloadavg()[0]
        result = {
            "machine": bm.describe_machine(bm.machine_info()),
            "checkpoint": {"bytes": data_bytes, "tensors": len(tensors_of(size)), "dtype": "BF16"},
            "mesh": args.mesh, "repeat": args.repeat, "layouts": {},
        }
        for lay in layouts:
            runs: dict[str, list[dict]] = {"fst": [], "safetensors+device_put": []}
            for r in range(args.repeat):
                for loader in runs:
                    warm(path)
                    res = run_child("fst" if loader == "fst" else "reference", path, args.mesh, lay)
                    runs[loader].append(res)
                    print(f"  {lay} run {r + 1} {loader:<24} {res['seconds']:.3f} s", file=sys.stderr, flush=True)
            med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
            st = runs["fst"][-1]["stats"]
            result["devices"] = runs["fst"][0]["devices"]
            result["layouts"][lay] = {
                "rules": {k: list(v) for k, v in rules_for(lay).items()},
                "median_seconds": med,
                "speedup": med["safetensors+device_put"] / med["fst"],
                "fst_bytes": st["bytes"],
                "fst_bytes_over_checkpoint": st["bytes"] / data_bytes,
                "fst_stats": st,
                "runs": {k: [x["seconds"] for x in v] for k, v in runs.items()},
                "ready_seconds": {k: statistics.median(x["ready_seconds"] for x in v) for k, v in runs.items()},
            }
    result["load_average"] = [load_before, os.getloadavg()[0]]
    print(f"machine: {result['machine']}")
    print(f"1-minute load average before / after: {result['load_average'][0]:.2f} / {result['load_average'][1]:.2f}")
    print(f"checkpoint: {data_bytes / GiB:.2f} GiB BF16, {result['checkpoint']['tensors']} tensors; "
          f"mesh {args.mesh} ({result['devices']} host devices); warm page cache; medians of {args.repeat} "
          "fresh processes")
    for lay, r in result["layouts"].items():
        st = r["fst_stats"]
        print(f"layout {lay}:")
        for k, v in r["median_seconds"].items():
            print(f"  {k:<24} {v:8.3f} s   (runs: {', '.join(f'{x:.3f}' for x in r['runs'][k])};"
                  f" ready before touching pages: {r['ready_seconds'][k]:.3f} s)")
        print(f"  speedup fst vs safetensors+device_put: {r['speedup']:.2f}x")
        print(f"  fst bytes read: {st['bytes']} = {r['fst_bytes_over_checkpoint']:.3f}x the checkpoint "
              f"(backend {st['backend']}: {st['reason']}; {st['host_copies']} blocks copied on the host, "
              f"{st['zero_copy']} taken in place)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
