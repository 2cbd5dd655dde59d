"""Every bad input gets a clear answer: paths, indexes, arguments, environment, slices."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fst
from checkpoints import write

torch = pytest.importorskip("torch")

SRC = Path(fst.__file__).parent
README = Path(__file__).resolve().parents[1] / "README.md"  # the repository's, beside the tests


@pytest.fixture
def ckpt(tmp_path):
    return write(tmp_path / "a.safetensors", [("x", "F32", [4, 3]), ("y", "I32", [2])])


# -- paths -------------------------------------------------------------------------------

ENTRY_POINTS = {
    "load": lambda p: fst.load(p),
    "iter_tensors": lambda p: fst.iter_tensors(p),
    "safe_open": lambda p: fst.safe_open(p, "np"),
    "open_checkpoint": lambda p: fst.open_checkpoint(p),
    "a list of paths": lambda p: fst.load([p]),
    "runtime_info": lambda p: fst.runtime_info(p),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_nul_byte_in_a_path_is_refused(ckpt, entry):
    # The C++ core would stop at the NUL and open the file before it.
    with pytest.raises(ValueError, match=r"NUL byte") as err:
        ENTRY_POINTS[entry](str(ckpt) + "\0/../../x")
    assert str(ckpt) in str(err.value)


def test_nul_byte_in_an_index_is_refused(ckpt, tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors\0/../../b.safetensors"}}))
    with pytest.raises(fst.FstError, match=r"NUL byte") as err:
        fst.load(index)
    assert str(index) in str(err.value) and "'x'" in str(err.value)


def test_bytes_paths_are_decoded_like_os_fsdecode(ckpt):
    want = fst.load(ckpt)
    for path in (os.fsencode(ckpt), [os.fsencode(ckpt)]):
        got = fst.load(path)
        assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)
    with fst.safe_open(os.fsencode(ckpt), "np") as f:
        assert f.keys() == ["x", "y"]


@pytest.mark.parametrize("path", [3, None, [3], [None]], ids=repr)
def test_a_path_of_the_wrong_type_names_the_argument(path):
    with pytest.raises(TypeError, match=r"^path"):
        fst.load(path)


# -- indexes -----------------------------------------------------------------------------


def _index(tmp_path: Path, weight_map) -> Path:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_deeply_nested_index_is_an_fst_error(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}")
    with pytest.raises(fst.FstError, match="not a safetensors index"):
        fst.load(index)
    with pytest.raises(fst.FstError):
        fst.load(tmp_path)  # through the directory too


def test_empty_weight_map_is_an_error(ckpt, tmp_path):
    index = _index(tmp_path, {})
    with pytest.raises(fst.FstError, match="weight_map is empty") as err:
        fst.load(index)
    assert str(index) in str(err.value)


@pytest.fixture
def stale(tmp_path):
    """An index that names 'z', which its shard lacks, and leaves out 'y', which it holds."""
    write(tmp_path / "s1.safetensors", [("x", "F32", [4, 3]), ("y", "I32", [2])])
    write(tmp_path / "s2.safetensors", [("w", "F32", [2])])
    return _index(tmp_path, {"x": "s1.safetensors", "z": "s1.safetensors", "w": "s2.safetensors"})


@pytest.mark.parametrize("keys", [None, ["z"], ["x", "z"], ["*"], ["z*"]], ids=repr)
def test_stale_index_name_the_shard_lacks_is_an_error_when_selected(stale, keys):
    for call in (lambda: fst.load(stale, keys=keys), lambda: fst.iter_tensors(stale, keys=keys)):
        with pytest.raises(fst.FstError, match=r"'z'.*s1\.safetensors.*does not hold it") as err:
            call()
        assert str(stale) in str(err.value)


def test_stale_index_name_the_shard_lacks_through_safe_open(stale):
    with fst.safe_open(stale, "np") as f:
        assert f.keys() == ["w", "x"]
        with pytest.raises(fst.FstError, match=r"'z'.*s1\.safetensors.*does not hold it"):
            f.get_tensor("z")


def test_stale_index_loads_what_it_names_when_the_load_does_not_select_the_missing_name(stale):
    got = fst.load(stale, keys=["x", "w"])
    assert sorted(got) == ["w", "x"]
    assert fst.last_load_stats()["unindexed"] == ["y"]


def test_stale_index_tensors_it_does_not_name_are_not_loaded_and_listed_in_stats(stale):
    weight_map = json.loads(stale.read_text())["weight_map"]
    del weight_map["z"]
    _index(stale.parent, weight_map)
    assert sorted(fst.load(stale)) == ["w", "x"]
    assert fst.last_load_stats()["unindexed"] == ["y"]
    assert sorted(name for name, _ in fst.iter_tensors(stale, budget=8)) == ["w", "x"]
    assert fst.last_load_stats()["unindexed"] == ["y"]
    assert sorted(fst.load(stale, keys=["*"])) == ["w", "x"]
    with pytest.raises(KeyError, match="'y'"):
        fst.load(stale, keys=["y"])  # the index is the checkpoint's table of contents
    assert fst.open_checkpoint(stale).unindexed() == ["y"]
    # Without an index, every tensor of every file is the checkpoint.
    assert sorted(fst.load(sorted(stale.parent.glob("*.safetensors")))) == ["w", "x", "y"]
    assert fst.last_load_stats()["unindexed"] == []


def test_index_decides_between_two_copies_of_a_name(tmp_path):
    write(tmp_path / "a.safetensors", [("x", "F32", [2]), ("z", "F32", [1])], seed=1)
    write(tmp_path / "b.safetensors", [("x", "F32", [2]), ("y", "F32", [1])], seed=2)
    index = _index(tmp_path, {"x": "b.safetensors", "y": "b.safetensors", "z": "a.safetensors"})
    got = fst.load(index)
    assert np.array_equal(got["x"], fst.load(tmp_path / "b.safetensors", keys=["x"])["x"])
    assert fst.open_checkpoint(index).unindexed() == ["x"]  # a.safetensors' copy
    with pytest.raises(fst.HeaderError, match="duplicate tensor"):
        fst.load(sorted(tmp_path.glob("*.safetensors")))  # without the index, two copies clash


def test_stale_index_in_a_sharded_jax_load(stale):
    jax = pytest.importorskip("jax")
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(jax.make_mesh((1,), ("a",), devices=jax.devices("cpu")[:1]), PartitionSpec())
    with pytest.raises(fst.FstError, match=r"'z'.*s1\.safetensors.*does not hold it"):
        fst.load(stale, framework="jax", sharding=sharding)
    assert sorted(fst.load(stale, framework="jax", sharding=sharding, keys=["x", "w"])) == ["w", "x"]
    assert fst.last_load_stats()["unindexed"] == ["y"]


def test_stale_index_in_a_distributed_load(stale, monkeypatch):
    import socket

    dist = pytest.importorskip("torch.distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("FST_DISTRIBUTED", "collective")
        with pytest.raises(fst.FstError, match=r"'z'.*s1\.safetensors.*does not hold it"):
            fst.load(stale, framework="torch", process_group=dist.group.WORLD)
        got = fst.load(stale, framework="torch", process_group=dist.group.WORLD, keys=["x", "w"])
        assert sorted(got) == ["w", "x"]
        assert fst.last_load_stats()["unindexed"] == ["y"]
    finally:
        dist.destroy_process_group()


# -- arguments ---------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ("threads", dict(threads=1.5), TypeError),
    ("threads", dict(threads="4"), TypeError),
    ("threads", dict(threads=True), TypeError),
    ("threads", dict(threads=2**40), ValueError),
    ("threads", dict(threads=-1), ValueError),
    ("keys", dict(keys=[None]), TypeError),
    ("keys", dict(keys=["x", 3]), TypeError),
    ("keys", dict(keys=7), TypeError),
    ("backend", dict(backend="warp"), ValueError),
    ("backend", dict(backend=3), TypeError),
]


@pytest.mark.parametrize("name,kwargs,kind", BAD_ARGUMENTS, ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_bad_arguments_name_the_argument(ckpt, name, kwargs, kind):
    for call in (fst.load, fst.iter_tensors):
        with pytest.raises(kind, match=rf"^{name}\b") as err:
            call(ckpt, **kwargs)
        assert "\n" not in str(err.value) and "incompatible" not in str(err.value)
    if "threads" in kwargs:
        with pytest.raises(kind, match=r"^threads\b"):
            fst.open_checkpoint(ckpt, threads=kwargs["threads"])
    if "backend" in kwargs:
        with pytest.raises(kind, match=r"^backend\b"):
            fst.safe_open(ckpt, "np", backend=kwargs["backend"])


@pytest.mark.parametrize("budget,kind", [(2**70, ValueError), (2**64, ValueError), (0, ValueError),
                                          (-5, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_budget_names_the_argument(ckpt, budget, kind):
    with pytest.raises(kind, match=r"^budget\b") as err:
        fst.iter_tensors(ckpt, budget=budget)
    assert "\n" not in str(err.value)


def test_largest_budget_and_threads_are_accepted(ckpt):
    from fst import _settings

    got = dict(fst.iter_tensors(ckpt, budget=2**64 - 1, threads=_settings.MAX_THREADS))
    assert sorted(got) == ["x", "y"]


# -- environment -------------------------------------------------------------------------

BAD_ENVIRONMENT = [
    ("FST_THREADS", "abc"),
    ("FST_THREADS", "-2"),
    ("FST_THREADS", "1e3"),
    ("FST_BACKEND", "warp"),
    ("FST_STAGING_BUDGET", "abc"),
    ("FST_STAGING_BUDGET", "0"),
    ("FST_STAGING_BUDGET", str(2**64)),
    ("FST_PINNED_BUDGET", "lots"),
    ("FST_STAGING_BUFFER", "-1"),
    ("FST_STAGING_BUFFER", "5000"),
    ("FST_GDS_BUFFER", "4097"),
    ("FST_DISTRIBUTED", "sometimes"),
]


@pytest.mark.parametrize("variable,value", BAD_ENVIRONMENT)
def test_bad_environment_is_refused_by_every_entry_point(ckpt, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    for entry, call in ENTRY_POINTS.items():
        if entry == "runtime_info":
            continue  # reports the environment as it is, bad values included
        with pytest.raises(ValueError, match=rf"^{variable}={re.escape(repr(value))}: ") as err:
            call(ckpt)
        assert "\n" not in str(err.value), entry


def test_empty_environment_values_mean_the_default(ckpt, monkeypatch):
    from fst import _settings

    for variable in _settings.VARIABLES:
        monkeypatch.setenv(variable.name, "")
    assert sorted(fst.load(ckpt)) == ["x", "y"]
    assert _settings.threads(None) == 0 and _settings.backend(None) == "auto"
    assert _settings.staging_budget(None) == 256 << 20


def _readme_variables() -> dict[str, str]:
    text = README.read_text()
    table = text.split("### Environment variables", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`FST_"):
            rows[cells[0].strip("`")] = cells[2]
    return rows


def test_readme_table_of_variables_matches_the_settings_module():
    from fst import _settings

    documented = _readme_variables()
    ours = {v.name: v.readme_default for v in _settings.VARIABLES}
    ours.update(_settings.READ_ELSEWHERE)
    assert documented == ours


def test_only_the_settings_module_reads_fst_variables():
    readers = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "_settings.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\benviron\b|getenv", line) and "FST_" in line:
                readers.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not readers, "\n".join(readers)


# -- get_slice ---------------------------------------------------------------------------

SHAPES = {"t3": [5, 4, 3], "t1": [6], "one": [1, 2], "empty": [0, 3], "scalar": []}


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("slices") / "s.safetensors",
                 [(name, "F32", shape) for name, shape in SHAPES.items()], prefix=b"\x01")
    full_np = fst.load(path)
    full_pt = fst.load(path, framework="torch")
    with fst.safe_open(path, "np") as f_np, fst.safe_open(path, "pt") as f_pt:
        yield {"np": (f_np, full_np), "pt": (f_pt, full_pt)}


# Every dimension above is at most 6: bounds from -9 to 9 reach past both ends of each.
_BOUND = st.one_of(st.none(), st.integers(-9, 9))
_COMPONENT = st.one_of(
    st.integers(-8, 7),
    st.builds(slice, _BOUND, _BOUND, st.one_of(st.none(), st.integers(-3, 3))),
    st.just(Ellipsis),
    st.just(None),
)


@st.composite
def _indexes(draw):
    name = draw(st.sampled_from(sorted(SHAPES)))
    parts = draw(st.lists(_COMPONENT, max_size=len(SHAPES[name]) + 1))
    index = tuple(parts) if draw(st.booleans()) or len(parts) != 1 else parts[0]
    return name, index


_EXAMPLES = os.environ.get("FST_FUZZ_EXAMPLES")
SLICE_FUZZ = settings(
    max_examples=int(_EXAMPLES) if _EXAMPLES else 3000,
    derandomize=not _EXAMPLES,
    database=None,
    deadline=None,
    print_blob=True,
)


def _bits(x) -> bytes:
    # numpy copies any strides (a torch view of one row may keep a stride of 2) in C order.
    return (x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).tobytes()


def _outcome(thunk):
    try:
        return "ok", thunk()
    except Exception as exc:  # noqa: BLE001 (the framework decides which)
        return type(exc), None


@pytest.mark.parametrize("framework", ["np", "pt"])
@SLICE_FUZZ
@given(case=_indexes())
def test_get_slice_follows_the_framework_indexing(sliced, framework, case):
    name, index = case
    f, full = sliced[framework]
    want_kind, want = _outcome(lambda: full[name][index])
    got_kind, got = _outcome(lambda: f.get_slice(name)[index])
    assert got_kind == want_kind, (name, index)
    if want_kind == "ok":
        assert tuple(got.shape) == tuple(want.shape), (name, index)
        assert _bits(got) == _bits(want), (name, index)


def test_get_slice_torch_refuses_negative_steps_even_when_empty(sliced):
    f, full = sliced["pt"]
    for index in [slice(1, 3, -1), slice(3, 1, -1), slice(None, None, -1)]:
        with pytest.raises(ValueError, match="step must be greater than zero"):
            full["t3"][index]
        with pytest.raises(ValueError, match="step must be greater than zero"):
            f.get_slice("t3")[index]
