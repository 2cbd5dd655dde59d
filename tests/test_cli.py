"""The fst command: info, verify, bench, demo, doctor, and errors as one line."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fst import benchmark as bm
from fst.cli import app

pytest.importorskip("safetensors")

runner = CliRunner()

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return bm.make_checkpoint(tmp_path_factory.mktemp("sharded"), "2MiB", files=3, dtype="BF16")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return bm.make_checkpoint(tmp_path_factory.mktemp("single"), "1MiB", files=1, dtype="F32")


def _corrupt_length(path, value=10**12):
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", value)
    path.write_bytes(bytes(data))


def _corrupt_json(path):
    data = bytearray(path.read_bytes())
    data[8] = ord("[")
    path.write_bytes(bytes(data))


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b'{"a":1}' + b" " * 9)
    return path


def test_info_text(single):
    r = invoke("info", single.path, "--limit", "3")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert f"tensors: {single.tensors}" in out
    assert "F32" in out and "model.embed_tokens.weight" in out
    assert f"first 3 of {single.tensors}" in out
    assert '{"format": "pt"}' in out


def test_info_json(sharded):
    r = invoke("info", sharded.path, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["tensor_count"] == sharded.tensors == len(data["tensors"])
    assert data["nbytes"] == sharded.nbytes
    assert len(data["files"]) == 3 and sum(f["tensors"] for f in data["files"]) == sharded.tensors
    assert all(f["metadata"] == {"format": "pt"} for f in data["files"])
    assert data["dtypes"] == {"BF16": {"count": sharded.tensors, "bytes": sharded.nbytes}}
    for t in data["tensors"]:
        a = t["alignment"]
        assert a & (a - 1) == 0 and a <= 4096 and t["offset"] % a == 0
        assert a == 4096 or (t["offset"] // a) % 2 == 1
    assert sum(data["alignment"].values()) == sharded.tensors
    # offsets are absolute: the first tensor of a file starts right after its header
    first = data["tensors"][0]
    assert first["offset"] == 8 + data["files"][0]["header_len"]
    limited = json.loads(invoke("info", sharded.path, "--json", "--limit", "2").stdout)
    assert len(limited["tensors"]) == 2 and limited["tensor_count"] == sharded.tensors


def test_verify_good_and_against_safetensors(sharded):
    r = invoke("verify", sharded.path)
    assert r.exit_code == 0, r.output
    assert "all good" in r.stdout and r.stdout.count("ok ") == 3
    r = invoke("verify", sharded.path, "--against", "safetensors")
    assert r.exit_code == 0, r.output
    assert f"{sharded.tensors} tensors bit-identical to safetensors" in r.stdout


def test_verify_lists_every_bad_file(tmp_path):
    ck = bm.make_checkpoint(tmp_path, "1MiB", files=3, dtype="BF16")
    _corrupt_length(ck.files[0])
    _corrupt_json(ck.files[2])
    r = invoke("verify", ck.path)
    assert r.exit_code == 1
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 2, r.stderr
    assert all(e.startswith("error: ") for e in errors)
    assert str(ck.files[0]) in errors[0] and str(ck.files[2]) in errors[1]
    assert "ok " in r.stdout and str(ck.files[1]) in r.stdout
    assert "Traceback" not in r.output


def test_verify_index_mismatch(tmp_path):
    ck = bm.make_checkpoint(tmp_path, "1MiB", files=2, dtype="BF16")
    index = json.loads(ck.index.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = ck.files[1].name if index["weight_map"][name] == ck.files[0].name else ck.files[0].name
    ck.index.write_text(json.dumps(index))
    r = invoke("verify", ck.path)
    assert r.exit_code == 1
    assert name in r.stderr and r.stderr.startswith("error: index")


@pytest.mark.parametrize("command", ["info", "verify", "doctor"])
def test_malformed_file_is_one_line(bad_file, command):
    r = invoke(command, bad_file)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad_file) in lines[0]
    assert "Traceback" not in r.output


def test_missing_file_is_one_line(tmp_path):
    r = invoke("info", tmp_path / "nope.safetensors")
    assert r.exit_code == 1
    assert r.stderr.strip().count("\n") == 0 and "nope.safetensors" in r.stderr and "No such file" in r.stderr


def test_debug_shows_the_exception(bad_file):
    import fst

    r = invoke("--debug", "info", bad_file)
    assert r.exit_code != 0
    assert isinstance(r.exception, fst.HeaderError)


def test_real_process_one_line_and_success(bad_file, single):
    bad = subprocess.run([sys.executable, "-m", "fst", "info", str(bad_file)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr and bad.stdout == ""
    ok = subprocess.run([sys.executable, "-m", "fst", "info", str(single.path), "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["tensor_count"] == single.tensors
    version = subprocess.run([sys.executable, "-m", "fst", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("fst ")


def test_doctor(sharded):
    r = invoke("doctor")
    assert r.exit_code == 0, r.output
    assert "CUDA driver:" in r.stdout and "cuFile" in r.stdout
    r = invoke("doctor", sharded.path)
    assert r.exit_code == 0, r.output
    assert "a CPU load would use:" in r.stdout and "O_DIRECT" in r.stdout and "3 files" in r.stdout
    data = json.loads(invoke("doctor", sharded.path, "--json").stdout)
    assert data["path"]["auto_backend"] in ("pread", "direct", "mmap")
    assert "cuda_driver" in data and "cufile" in data


def test_demo_end_to_end():
    r = invoke("demo", "--size", "8MiB")
    assert r.exit_code == 0, r.output
    assert "bit-identical to safetensors" in r.stdout
    for framework in bm.available_frameworks():
        assert any(line.startswith(framework) and line.rstrip().endswith("yes") for line in r.stdout.splitlines())


def test_demo_names_a_framework_it_could_not_use(tmp_path):
    # A jax that is installed but broken shadows the real one: the demo must say so, run the
    # other frameworks, and not claim jax was compared.
    fake = tmp_path / "shadow" / "jax"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('this jax is broken on purpose')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "fst", "demo", "--size", "4MiB"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not run: jax: installed but failed to import: ImportError: this jax is broken on purpose" in r.stdout
    assert not any(line.startswith("jax") for line in r.stdout.splitlines())
    assert any(line.startswith("numpy") and line.rstrip().endswith("yes") for line in r.stdout.splitlines())


def test_bench_plot_and_json(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "x.png"
    r = invoke("bench", "--size", "16MiB", "--repeat", "1", "--plot", png, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    rows = {(row["loader"], row["mode"]): row for row in data["rows"]}
    assert ("fst", "warm") in rows and ("safetensors", "warm") in rows
    modes = data["config"]["modes"]
    assert "warm" in modes and ("cold" in modes or data["warnings"])
    for mode in modes:
        row = rows[("fst", mode)]
        assert row["status"] == "ok" and row["median"] > 0 and row["ratio"] > 0 and row["backend"]
        assert row["checksum"] == rows[("safetensors", mode)]["checksum"]


def test_bench_table_on_a_given_path(single):
    r = invoke("bench", single.path, "--framework", "numpy", "--no-cold", "--repeat", "1", "--quiet")
    assert r.exit_code == 0, r.output
    assert "median s" in r.stdout and "GB/s" in r.stdout
    lines = [line for line in r.stdout.splitlines() if line.startswith(("fst ", "safetensors "))]
    assert any(line.split()[:2] == ["fst", "warm"] for line in lines)
    assert any(line.split()[:2] == ["safetensors", "warm"] for line in lines)


def test_bench_bad_arguments(single):
    r = invoke("bench", single.path, "--size", "lots")
    assert r.exit_code != 0
    r = invoke("bench", single.path, "--compare", "nope", "--no-cold", "--repeat", "1", "--quiet")
    assert r.exit_code == 1 and r.stderr.startswith("error: unknown loader")
