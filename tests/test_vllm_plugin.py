"""The vLLM plugin (fst.vllm) without vLLM: registration that never breaks vLLM, fst's options
in model_loader_extra_config, and the weights iterator on one rank and on two gloo ranks.

The loader itself and the engine run in scripts/vllm_check.py, in a virtual environment with
vLLM. Here vLLM is either absent (sys.modules["vllm"] = None makes its import fail, as on a
machine without it) or a stand-in holding only the registration API the plugin calls
(`register_model_loader`, `BaseModelLoader`), with the version under test.

The two-rank test starts the ranks as subprocesses running this file (see `_rank` at the end).
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from checkpoints import write  # noqa: E402

from fst.vllm import plugin  # noqa: E402
from fst.vllm.weights import FstOptions, iter_weights, natural_key, split_extra_config, stats_line  # noqa: E402

FILES = {
    "model-00002-of-00010.safetensors": [
        ("model.layers.1.mlp.experts.0.down_proj.weight", "BF16", [16, 24]),
        ("model.layers.1.mlp.experts.1.down_proj.weight", "BF16", [16, 24]),
        ("model.layers.1.mlp.experts.1.down_proj.weight_scale", "F32", [16]),
        ("model.layers.1.norm.weight", "F32", [24]),
    ],
    "model-00010-of-00010.safetensors": [
        ("lm_head.weight", "F16", [301, 33]),
        ("model.layers.2.mlp.experts.0.up_proj.weight", "F32", [40, 9]),
        ("model.layers.2.mlp.experts.3.up_proj.weight", "F32", [40, 9]),
        ("step", "I64", []),
    ],
}


def make_checkpoint(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [str(write(folder / name, entries, seed=i)) for i, (name, entries) in enumerate(FILES.items())]


def reference(files: list[str]) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in files:
        out.update(load_file(f))
    return out


def digest(tensor) -> str:
    import torch

    t = tensor.contiguous()
    raw = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    return f"{t.dtype}:{tuple(t.shape)}:" + hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def expert_filter(local: set[int]):
    """vLLM's rule (ep_weight_filter.should_skip_weight): skip heavy weights of other experts."""
    import re

    def skip(name: str) -> bool:
        m = re.search(r"\.experts\.(\d+)\.", name)
        return m is not None and name.endswith(".weight") and int(m.group(1)) not in local

    return skip


# ---- registration -------------------------------------------------------------------------


@pytest.fixture
def fresh_plugin(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", None)
    return plugin


def fake_vllm(monkeypatch, version, *, register_fails: bool = False) -> list:
    """A stand-in `vllm` with the registration API only; returns the (format, class) registered."""
    registered: list = []

    class BaseModelLoader(abc.ABC):
        def __init__(self, load_config):
            self.load_config = load_config

    def register_model_loader(load_format):
        def wrap(cls):
            if register_fails:
                raise RuntimeError("registration refused")
            if not issubclass(cls, BaseModelLoader):
                raise ValueError("The model loader must be a subclass of `BaseModelLoader`.")
            registered.append((load_format, cls))
            return cls

        return wrap

    root = types.ModuleType("vllm")
    if version is not None:
        root.__version__ = version
    executor = types.ModuleType("vllm.model_executor")
    loader = types.ModuleType("vllm.model_executor.model_loader")
    loader.register_model_loader = register_model_loader
    base = types.ModuleType("vllm.model_executor.model_loader.base_loader")
    base.BaseModelLoader = BaseModelLoader
    for name, mod in [("vllm", root), ("vllm.model_executor", executor),
                      ("vllm.model_executor.model_loader", loader),
                      ("vllm.model_executor.model_loader.base_loader", base)]:
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "fst.vllm.loader", raising=False)
    return registered


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == plugin.LOGGER_NAME and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("version, ok", [
    ("0.32.0", True), ("0.32.1+cpu", True), ("0.32.12", True), ("0.32.0rc1", True),
    ("0.31.9", False), ("0.33.0", False), ("0.320.0", False), ("1.32.0", False), ("0.3.2", False), ("dev", False),
])
def test_supported_versions(version, ok):
    assert plugin.supported(version) is ok


def test_without_vllm_the_plugin_warns_and_returns(fresh_plugin, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with caplog.at_level(logging.INFO, logger=plugin.LOGGER_NAME):
        fresh_plugin.register()
    assert fresh_plugin._registered is None
    assert len(warnings_of(caplog)) == 1 and "could not be registered" in warnings_of(caplog)[0]


def test_other_version_registers_a_loader_that_refuses(fresh_plugin, monkeypatch, caplog):
    registered = fake_vllm(monkeypatch, "0.31.2")
    with caplog.at_level(logging.INFO, logger=plugin.LOGGER_NAME):
        fresh_plugin.register()
        fresh_plugin.register()  # a second call registers nothing more
    assert [fmt for fmt, _ in registered] == ["fst"]
    warned = warnings_of(caplog)
    assert len(warned) == 1 and "0.31.2" in warned[0] and "0.32.x" in warned[0]
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x; this is vLLM 0\.31\.2"):
        registered[0][1](load_config=None)


@pytest.mark.parametrize("case", ["no version", "registration raises", "supported, loader unimportable"])
def test_the_plugin_never_raises(fresh_plugin, monkeypatch, caplog, case):
    version = {"no version": None, "registration raises": "0.40.0", "supported, loader unimportable": "0.32.0"}[case]
    registered = fake_vllm(monkeypatch, version, register_fails=case == "registration raises")
    with caplog.at_level(logging.INFO, logger=plugin.LOGGER_NAME):
        fresh_plugin.register()
    assert registered == []
    assert len(warnings_of(caplog)) == 1, warnings_of(caplog)
    if case == "supported, loader unimportable":
        # The stand-in has no DefaultModelLoader: the real loader's import fails, quietly.
        assert "could not be registered" in warnings_of(caplog)[0] and "default_loader" in warnings_of(caplog)[0]


# ---- options ------------------------------------------------------------------------------


def test_fst_options_are_taken_out_of_the_extra_config():
    extra = {"budget": 1 << 20, "backend": "pread", "threads": 2, "num_threads": 4, "enable_multithread_load": False}
    options, rest = split_extra_config(extra)
    assert options == FstOptions(budget=1 << 20, backend="pread", threads=2)
    assert rest == {"num_threads": 4, "enable_multithread_load": False}
    assert extra["budget"] == 1 << 20  # the caller's dict is left as it was
    assert split_extra_config({}) == (FstOptions(), {})
    assert split_extra_config({"budget": None}) == (FstOptions(), {})
    assert split_extra_config("not a dict") == (FstOptions(), "not a dict")  # vLLM's own error follows


@pytest.mark.parametrize("key, value, why", [
    ("budget", -1, "expected a number of bytes"), ("budget", 0, "expected a number of bytes"),
    ("budget", "1G", "must be an integer"), ("budget", True, "must be an integer"),
    ("backend", "fast", "expected auto, pread"), ("backend", 3, "must be a str"),
    ("threads", -1, "expected 0"), ("threads", 1.5, "must be an integer"),
])
def test_an_invalid_fst_option_is_refused_by_name(key, value, why):
    with pytest.raises(ValueError, match="not a valid fst option") as info:
        split_extra_config({key: value, "num_threads": 4})
    assert f"model_loader_extra_config[{key!r}]" in str(info.value) and why in str(info.value)


# ---- the iterator on one rank -------------------------------------------------------------


def test_natural_order_of_shards():
    names = ["model-00010-of-00010.safetensors", "model-00002-of-00010.safetensors"]
    assert sorted(names, key=natural_key) == names[::-1]


def test_one_rank_yields_every_tensor_bit_for_bit(tmp_path):
    files = make_checkpoint(tmp_path / "ckpt")
    ref = reference(files)
    done: list = []
    reports: list = []
    got = list(iter_weights(files[::-1], options=FstOptions(budget=1000, backend="pread"),
                            progress=lambda d, t: reports.append((d, t)), on_done=done.append))
    # vLLM's shard order (natural sort), each file in its own order.
    assert [n for n, _ in got] == [n for entries in FILES.values() for n, _, _ in entries]
    assert {n: digest(t) for n, t in got} == {n: digest(t) for n, t in ref.items()}
    total = sum(t.numel() * t.element_size() for t in ref.values())
    assert len(done) == 1
    stats = done[0]
    assert stats["tensors"] == len(ref) and stats["bytes"] == total and stats["bytes_read"] == total
    assert stats["strategy"] == "plain" and stats["files"] == 2 and stats["backend"] == "pread"
    assert reports[-1] == (total, total)
    assert "fst stats: tensors=8 bytes=%d bytes_read=%d files=2" % (total, total) in stats_line(stats)


def test_stats_are_this_loads_only(tmp_path):
    files = make_checkpoint(tmp_path / "ckpt")
    import fst

    fst.load(files[0], framework="torch")  # an earlier load on this thread
    done: list = []
    assert list(iter_weights(files, skip=lambda name: True, on_done=done.append)) == []
    assert done[0]["tensors"] == 0 and done[0]["bytes"] == 0


def test_expert_filter_reads_only_the_kept_tensors(tmp_path):
    files = make_checkpoint(tmp_path / "ckpt")
    ref = reference(files)
    skip = expert_filter({1})
    kept = {n for n in ref if not skip(n)}
    assert kept != set(ref) and "model.layers.1.mlp.experts.1.down_proj.weight_scale" in kept
    done: list = []
    got = dict(iter_weights(files, options=FstOptions(backend="pread"), skip=skip, on_done=done.append))
    assert set(got) == kept
    assert done[0]["bytes_read"] == sum(ref[n].numel() * ref[n].element_size() for n in kept)


# ---- two gloo ranks -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(tmp_path: Path, scenario: str, strategy: str, ws: int = 2, timeout: float = 120) -> list[dict]:
    port, out = free_port(), tmp_path / f"out-{scenario}-{strategy}"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", FST_THREADS="2", FST_DISTRIBUTED=strategy)
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [subprocess.Popen([sys.executable, str(HERE), scenario, str(r), str(ws), str(port), str(tmp_path), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for r in range(ws)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    report = "\n".join(f"--- rank {r} (exit {p.returncode})\n{logs[r][-3000:] if r < len(logs) else ''}"
                       for r, p in enumerate(procs))
    assert [p.returncode for p in procs] == [0] * ws, report
    return [json.loads((out / f"{r}.json").read_text()) for r in range(ws)]


@pytest.mark.parametrize("strategy", ["collective", "auto"])
def test_two_ranks_get_identical_tensors_each_byte_read_once(tmp_path, strategy):
    files = make_checkpoint(tmp_path / "ckpt")
    ref = {n: digest(t) for n, t in reference(files).items()}
    total = sum(t.numel() * t.element_size() for t in reference(files).values())
    results = spawn(tmp_path, "all", strategy)
    for res in results:
        assert res["tensors"] == ref
        assert res["stats"]["world_size"] == 2 and res["stats"]["tensors"] == len(ref)
    assert [r["stats"]["rank"] for r in results] == [0, 1]
    done, reported_total = results[0]["progress"][-1]
    assert done == reported_total > 0 and results[1]["progress"] == []
    if strategy == "collective":
        # Ranks on different machines: each byte read from storage once across the ranks.
        assert all(r["stats"]["strategy"] == "collective" for r in results)
        assert sum(r["stats"]["bytes_read"] for r in results) == total  # 1.0x the checkpoint
        assert all(0 < r["stats"]["bytes_read"] < total for r in results)
    else:
        # One machine: the ranks map the shared page cache, no collectives.
        assert all(r["stats"]["strategy"] == "local" for r in results)


def test_two_ranks_with_expert_filters_read_their_own(tmp_path):
    files = make_checkpoint(tmp_path / "ckpt")
    full = reference(files)
    results = spawn(tmp_path, "experts", "collective")
    for rank, res in enumerate(results):
        skip = expert_filter({rank})
        kept = {n: digest(t) for n, t in full.items() if not skip(n)}
        assert res["tensors"] == kept
        # Every rank loads alone, the same choice on both: no collective plan fits two selections.
        assert res["stats"]["strategy"] == "plain"
        assert res["stats"]["bytes_read"] == sum(full[n].numel() * full[n].element_size() for n in kept)
    assert results[0]["tensors"].keys() != results[1]["tensors"].keys()


def _rank(scenario: str, rank: int, ws: int, port: int, tmp: Path, out: Path) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ws,
                            timeout=datetime.timedelta(seconds=60))
    group = dist.new_group(list(range(ws)))  # passed explicitly, as the loader passes vLLM's
    files = sorted(str(p) for p in (tmp / "ckpt").glob("*.safetensors"))
    done: list = []
    skip = expert_filter({rank}) if scenario == "experts" else None
    reports: list = []
    progress = (lambda d, t: reports.append([d, t])) if rank == 0 else None  # one bar, on rank 0
    got = {n: digest(t) for n, t in iter_weights(files, options=FstOptions(budget=1500, backend="pread"),
                                                   group=group, skip=skip, progress=progress, on_done=done.append)}
    (out / f"{rank}.json").write_text(json.dumps({"tensors": got, "stats": done[0], "progress": reports}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6]))
