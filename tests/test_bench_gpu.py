"""bench/bench_gpu.py on the CPU: the GPU benchmark's own code (data, one process per loader,
timing, JSON and table, anchors' wheels, smoke and cast comparison) runs here end to end with
--device cpu, so that its first run on a GPU machine only meets what needs the GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "bench_gpu.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(*args, timeout=240):
    p = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    return p


def test_load_benchmark_on_the_cpu_end_to_end(tmp_path):
    out = tmp_path / "out"
    p = run("load", "--device", "cpu", "--size", "8MiB", "--files", "2", "--dir", str(tmp_path / "data"),
            "--loaders", "limit_pread,fst_torch,fst_jax,safetensors_load_file,safetensors_safe_open,instanttensor_buffered",
            "--repeats", "2", "--cold", "", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((out / "bench_gpu.json").read_text())
    rows = {r["loader"]: r for r in result["rows"]}
    assert set(rows) == {"limit_pread", "fst_torch", "fst_jax", "safetensors_load_file", "safetensors_safe_open"}
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["mode"] == "warm"
        assert len(row["times"]) == 3 and row["further_calls"] == 2, row
        assert row["first_GBps"] > 0 and row["median_GBps"] > 0
    data = result["data"]
    # Every loader loaded every tensor byte (the pread limit reads whole files).
    for name in ("fst_torch", "fst_jax", "safetensors_load_file", "safetensors_safe_open"):
        assert rows[name]["bytes"] == data["tensor_bytes"] and rows[name]["tensors"] == data["tensors"]
    assert rows["limit_pread"]["bytes"] == data["file_bytes"]
    assert rows["fst_torch"]["devices"] == ["cpu"]
    assert rows["fst_torch"]["backend"]
    assert {"loader": "instanttensor_buffered", "reason": "GPU only"} in result["skipped"]
    table = (out / "bench_gpu.md").read_text()
    assert "| fst_torch | warm |" in table and "| safetensors_load_file | warm |" in table


def test_a_failing_loader_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    # A loader whose process dies: its row says so, the next loader still runs, and the run
    # fails because the failing loader is fst's own.
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "broken") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "jax").mkdir()
    (tmp_path / "broken" / "jax" / "__init__.py").write_text("raise ImportError('no JAX here')\n")
    p = subprocess.run([sys.executable, str(SCRIPT), "load", "--device", "cpu", "--size", "2MiB", "--files", "1",
                        "--dir", str(tmp_path / "data"), "--loaders", "fst_jax,fst_torch", "--repeats", "1",
                        "--cold", "", "--out", str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 1, p.stderr[-3000:]
    rows = {r["loader"]: r for r in json.loads((out / "bench_gpu.json").read_text())["rows"]}
    assert rows["fst_jax"]["status"] == "failed" and "no JAX here" in rows["fst_jax"]["error"]
    assert rows["fst_torch"]["status"] == "ok"


def test_loader_past_its_time_is_cut_off(tmp_path):
    out = tmp_path / "out"
    p = run("load", "--device", "cpu", "--size", "2MiB", "--files", "1", "--dir", str(tmp_path / "data"),
            "--loaders", "fst_torch", "--timeout", "0.5", "--cold", "", "--out", str(out))
    assert p.returncode == 1
    row = json.loads((out / "bench_gpu.json").read_text())["rows"][0]
    assert row["status"] == "timeout", row


def fake_wheel(folder: Path, dist: str, module: str, body: str) -> Path:
    """A minimal pure-Python wheel, enough for pip install --target."""
    path = folder / f"{dist}-0.1-py3-none-any.whl"
    info = f"{dist}-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", body)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_anchor_wheels_install_into_a_folder_of_their_own(tmp_path):
    bg = bench_module()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    assert bg.install_anchor("instanttensor", wheels, tmp_path / "anchors")[0] is None  # none brought
    fake_wheel(wheels, "instanttensor", "instanttensor", "WHERE = 'fake'\n")
    (wheels / "instanttensor-0.0.1-cp27-cp27m-manylinux1_x86_64.whl").write_bytes(b"")  # wrong Python
    assert bg.wheel_for(wheels, "instanttensor").name == "instanttensor-0.1-py3-none-any.whl"
    target, why = bg.install_anchor("instanttensor", wheels, tmp_path / "anchors")
    assert target is not None, why
    assert (target / "instanttensor" / "__init__.py").exists()
    # Installed once: a second call reuses the folder.
    assert bg.install_anchor("instanttensor", wheels, tmp_path / "anchors") == (target, "")
    # runai's humanize is missing: installed all the same, and said so.
    fake_wheel(wheels, "runai_model_streamer", "runai_model_streamer", "")
    target, why = bg.install_anchor("runai", wheels, tmp_path / "anchors")
    assert target is not None and "humanize" in why
    # The machine's own Python does not see them.
    p = subprocess.run([sys.executable, "-c", "import instanttensor"], capture_output=True)
    assert p.returncode != 0


def test_smoke_compares_bit_for_bit_on_the_cpu(tmp_path):
    p = run("smoke", "--device", "cpu", "--mib", "2", "--dir", str(tmp_path), "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["ok"]
    assert [c["what"] for c in report["checks"]] == ["fst.load torch", "fst.safe_open torch", "fst.load jax"]
    assert all(c["tensors"] == 2 * (3 + 11 + 4) for c in report["checks"])


def test_cast_sources_cover_every_pattern_and_the_edges():
    bg = bench_module()
    import numpy as np

    assert len(np.unique(bg.cast_sources("BF16", 1 << 10))) == 1 << 16
    assert len(np.unique(bg.cast_sources("F8_E4M3", 1 << 10))) == 256
    f32 = bg.cast_sources("F32", 1 << 12).view(np.float32)
    assert np.isinf(f32).sum() >= 2 and np.isnan(f32).sum() >= 10
    assert (f32 == np.float32(65520.0)).any()  # the F16 overflow tie


@pytest.mark.parametrize("device", ["cpu"])
def test_casts_on_the_cpu_agree_with_themselves(tmp_path, device):
    p = run("casts", "--device", device, "--samples", "4096", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "casts.json").read_text())
    assert report["pairs_checked"] >= 20 and report["pairs_agree"] == report["pairs_checked"]
    assert {"src": "BF16", "dst": "F16"} in [{"src": x["src"], "dst": x["dst"]} for x in report["pairs"]]
