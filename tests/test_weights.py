"""Tests for l2l_optim.weights: file format, strict validation, fingerprints, registry, hub, CLI."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from random_nets import random_simple

import l2l_optim
from l2l_optim import hub
from l2l_optim import weights as W
from l2l_optim import weight_file as WF
from l2l_optim.weight_file import read_header
from l2l_optim.nets import DMOptimizerNet, RNNPropNet
from l2l_optim.weights import (
    FORMAT,
    LoadedWeights,
    WeightsError,
    fingerprint,
    list_weights,
    load_weights,
    save_weights,
)

SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def header_of(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def write_raw(path: Path, tensors: dict, meta: dict) -> Path:
    save_file(tensors, str(path), metadata=meta)
    return path


def valid_meta(net) -> dict:
    return {
        "format": FORMAT,
        "arch": net.arch,
        "config": json.dumps(net.config),
        "package_version": l2l_optim.__version__,
        "fingerprint": fingerprint(net),
    }


# ------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "net",
    [random_simple(1), random_simple(2, bias=True), random_simple(3, aggregate=False),
     DMOptimizerNet(), RNNPropNet(hidden_size=4, eps=1e-6)],
    ids=["simple", "simple-bias", "simple-noagg", "dm", "rnnprop-small"],
)
def test_round_trip_keeps_weights_config_and_metadata(tmp_path, net):
    meta = {"recipe": "unit test", "seed": 7, "final_meta_loss": 0.125, "extra": {"a": [1, 2]}}
    path = save_weights(net, tmp_path / "w.safetensors", metadata=meta)
    assert path == tmp_path / "w.safetensors"
    loaded = load_weights(path)
    assert isinstance(loaded, LoadedWeights)
    assert type(loaded.net) is type(net)
    assert loaded.net.config == net.config
    assert same_weights(loaded.net, net)
    assert not loaded.net.training
    assert loaded.path == path
    assert loaded.fingerprint == fingerprint(net) == loaded.metadata["fingerprint"]
    md = loaded.metadata
    assert md["format"] == FORMAT
    assert md["arch"] == net.arch
    assert json.loads(md["config"]) == net.config
    assert md["package_version"] == l2l_optim.__version__
    assert md["recipe"] == "unit test"  # strings stored as they are
    assert json.loads(md["seed"]) == 7 and json.loads(md["final_meta_loss"]) == 0.125
    assert json.loads(md["extra"]) == {"a": [1, 2]}


def test_saved_tensors_are_fp32_even_for_a_double_net(tmp_path):
    net = random_simple(4).double()
    path = save_weights(net, tmp_path / "w.safetensors")
    _, header = header_of(path)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}
    assert load_weights(path).fingerprint == fingerprint(net)


def test_directory_source_and_destination(tmp_path):
    net = random_simple(5)
    path = save_weights(net, tmp_path)  # an existing directory
    assert path == tmp_path / "weights.safetensors"
    assert same_weights(load_weights(tmp_path).net, net)
    assert same_weights(load_weights(str(tmp_path)).net, net)
    nested = save_weights(net, tmp_path / "a" / "b" / "w.safetensors")  # parents created
    assert nested.is_file()


def test_write_is_atomic(tmp_path, monkeypatch):
    old, new = random_simple(6), random_simple(7)
    path = save_weights(old, tmp_path / "w.safetensors")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(W.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_weights(new, path)
    monkeypatch.undo()
    # the old file is intact and no temporary file is left behind
    assert same_weights(load_weights(path).net, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    save_weights(new, path)  # overwriting works
    assert same_weights(load_weights(path).net, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


@pytest.mark.parametrize("key", ["format", "arch", "config", "package_version", "fingerprint"])
def test_reserved_metadata_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="reserved"):
        save_weights(random_simple(), tmp_path / "w.safetensors", metadata={key: "x"})
    assert not (tmp_path / "w.safetensors").exists()


def test_save_rejects_non_nets(tmp_path):
    with pytest.raises(TypeError, match="CoordinatewiseNet"):
        save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")


# ------------------------------------------------------------------------ fingerprint


def test_fingerprint_is_stable_and_sensitive():
    a = random_simple(8)
    fp = fingerprint(a)
    assert re.fullmatch("[0-9a-f]{16}", fp)
    assert fingerprint(random_simple(8)) == fp  # same weights, new object
    b = random_simple(8)
    with torch.no_grad():
        b.w_hh[3, 4] = torch.nextafter(b.w_hh[3, 4], torch.tensor(float("inf")))
    assert fingerprint(b) != fp  # one ulp
    assert fingerprint(random_simple(8, hidden_size=11)) != fingerprint(random_simple(8))
    # the config counts even when the tensors are equal
    c1, c2 = DMOptimizerNet(hidden_size=3), DMOptimizerNet(hidden_size=3, preproc_p=5.0)
    c2.load_state_dict(c1.state_dict())
    assert fingerprint(c1) != fingerprint(c2)


# --------------------------------------------------------------------- strict loading


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="no such weight file") as e:
        load_weights(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value)
    with pytest.raises(WeightsError, match="weights.safetensors"):
        load_weights(tmp_path)  # a directory without weights.safetensors


def test_weights_error_is_a_value_error():
    assert issubclass(WeightsError, ValueError)


@SETTINGS
@given(cut=st.floats(0.0, 0.999))
def test_any_truncation_is_detected(tmp_path, cut):
    path = tmp_path / "w.safetensors"
    if not path.exists():
        save_weights(random_simple(9), path)
    data = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: int(cut * len(data))])
    with pytest.raises(WeightsError) as e:
        load_weights(bad)
    assert str(bad) in str(e.value)


@SETTINGS
@given(pos=st.floats(0.0, 0.999), bit=st.integers(0, 7))
def test_any_flipped_bit_in_the_body_is_detected(tmp_path, pos, bit):
    path = tmp_path / "w.safetensors"
    if not path.exists():
        save_weights(random_simple(10), path)
    data = bytearray(path.read_bytes())
    n, _ = header_of(path)
    body = len(data) - (8 + n)
    data[8 + n + int(pos * body)] ^= 1 << bit
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="fingerprint mismatch|NaN or Inf") as e:
        load_weights(bad)
    assert str(bad) in str(e.value)


def test_garbage_and_corrupted_headers(tmp_path):
    good = save_weights(random_simple(11), tmp_path / "good.safetensors")
    data = good.read_bytes()
    cases = {
        "empty": b"",
        "garbage": os.urandom(64),
        "huge-length": struct.pack("<Q", 1 << 60) + data[8:],
        "bad-json": data[:8] + b"{" * 8 + data[16:],
        "extra-bytes": data + b"\0\0\0\0",
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(WeightsError) as e:
            load_weights(bad)
        assert str(bad) in str(e.value), name


DEEP = 200_000  # far beyond Python's recursion limit, far below the header size limit


def raw_file(path: Path, header: bytes, body: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


def test_deeply_nested_json_in_the_header_is_a_weights_error(tmp_path):
    header = b'{"__metadata__": {"format": "x"}, "t": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    path = raw_file(tmp_path / "nested.safetensors", header)
    with pytest.raises(WeightsError, match="corrupted header \\(JSON nested too deeply to read\\)") as e:
        load_weights(path)
    assert str(path) in str(e.value)
    with pytest.raises(WeightsError, match="nested too deeply"):
        read_header(path)  # what `l2l-optim info` reads


def test_a_deeply_nested_config_is_a_weights_error(tmp_path):
    net = random_simple(16)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = write_raw(tmp_path / "cfg.safetensors", tensors, valid_meta(net) | {"config": "[" * DEEP + "]" * DEEP})
    with pytest.raises(WeightsError, match="bad config \\(JSON nested too deeply to read\\)") as e:
        load_weights(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("zipped, kind", [(True, "a zip archive, e.g. a torch.save pickle"),
                                          (False, "a pickle, e.g. torch.save")], ids=["zip", "legacy"])
def test_a_torch_save_file_is_named_for_what_it_is(tmp_path, zipped, kind):
    path = tmp_path / "weights.pt"
    torch.save(random_simple(17).state_dict(), path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(WeightsError) as e:
        load_weights(path)
    assert str(e.value) == f"{path}: not a safetensors file ({kind})"
    from l2l_optim.optimizer import SimpleOptimizer

    with pytest.raises(WeightsError, match=re.escape(kind)):
        SimpleOptimizer([torch.zeros(2, requires_grad=True)], weights=path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_any_pickle_is_named_for_what_it_is(tmp_path, protocol):
    import pickle

    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"w_hh": [0.0] * 100}, protocol=protocol))
    with pytest.raises(WeightsError, match=re.escape("not a safetensors file (a pickle, e.g. torch.save)")):
        load_weights(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=600))
def test_random_bytes_are_a_weights_error(tmp_path, blob):
    path = tmp_path / "random.safetensors"
    path.write_bytes(blob)
    with pytest.raises(WeightsError) as e:
        load_weights(path)
    assert str(path) in str(e.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(max_size=300), body=st.binary(max_size=300))
def test_random_bytes_behind_a_plausible_length_are_a_weights_error(tmp_path, header, body):
    path = raw_file(tmp_path / "random.safetensors", b"{" + header, body)
    with pytest.raises(WeightsError):
        load_weights(path)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**20) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entry=JSON, config=JSON, body=st.binary(max_size=64))
def test_any_json_in_a_tensor_entry_or_the_config_is_a_weights_error(tmp_path, entry, config, body):
    net = random_simple(18)
    meta = valid_meta(net) | {"config": json.dumps(config)}
    for header in ({"__metadata__": meta, "w_hh": entry}, {"__metadata__": meta, **{
            k: {"dtype": "F32", "shape": list(v.shape), "data_offsets": [0, 4 * v.numel()]}
            for k, v in net.state_dict().items()}}):
        path = raw_file(tmp_path / "fuzz.safetensors", json.dumps(header).encode(), body)
        with pytest.raises(WeightsError):
            load_weights(path)


def test_tampered_metadata_is_detected(tmp_path):
    net = random_simple(12)
    t = {k: v.contiguous() for k, v in net.state_dict().items()}
    meta = valid_meta(net)
    write_raw(tmp_path / "ok.safetensors", t, meta)
    assert load_weights(tmp_path / "ok.safetensors").fingerprint == meta["fingerprint"]
    bad = dict(meta, fingerprint="0123456789abcdef")
    with pytest.raises(WeightsError, match="fingerprint mismatch"):
        load_weights(write_raw(tmp_path / "fp.safetensors", t, bad))
    # a config edit that still builds and fits the tensor shapes: only the hash notices
    dm = DMOptimizerNet(hidden_size=3)
    swapped = dict(valid_meta(dm), config=json.dumps(dict(dm.config, output_scale=0.2)))
    dt = {k: v.contiguous() for k, v in dm.state_dict().items()}
    with pytest.raises(WeightsError, match="fingerprint mismatch"):
        load_weights(write_raw(tmp_path / "cfg.safetensors", dt, swapped))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t, m: m.pop("fingerprint"), "lacks fingerprint"),
        (lambda t, m: m.pop("arch"), "lacks arch"),
        (lambda t, m: m.update(format="l2l-optim-weights/99"), "unsupported weight format"),
        (lambda t, m: m.update(arch="transformer"), "unknown architecture 'transformer'"),
        (lambda t, m: m.update(config="{not json"), "bad config"),
        (lambda t, m: m.update(config='{"hidden_sise": 10}'), "bad config"),
        (lambda t, m: t.pop("w_hh"), r"missing \['w_hh'\]"),
        (lambda t, m: t.update(bonus=torch.zeros(2)), r"unexpected \['bonus'\]"),
        (lambda t, m: t.update(w_hh=torch.zeros(10, 11)), "has shape"),
        (lambda t, m: t.update(w_hh=t["w_hh"].double()), "dtype F64"),
        (lambda t, m: t.update(w_hh=t["w_hh"].half()), "dtype F16"),
        (lambda t, m: t["w_ih"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
    ],
    ids=["no-fingerprint", "no-arch", "format", "unknown-arch", "config-json", "config-kw",
         "missing-key", "extra-key", "shape", "dtype64", "dtype16", "nan"],
)
def test_invalid_files_are_rejected(tmp_path, change, match):
    net = random_simple(13)
    t = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    m = valid_meta(net)
    change(t, m)
    path = write_raw(tmp_path / "bad.safetensors", t, m)
    with pytest.raises(WeightsError, match=match) as e:
        load_weights(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"hidden_size": 100000}, r"bad config: hidden_size=100000 is outside \[1, 1024\]"),
        ({"hidden_size": 0}, r"bad config: hidden_size=0 is outside \[1, 1024\]"),
        ({"hidden_size": 10.0}, r"bad config: hidden_size=10.0 is not a finite int"),
        ({"hidden_size": True}, r"bad config: hidden_size=True is not a finite int"),
        ({"bias": "yes"}, r"bad config: bias='yes' is not a bool"),
        ({"hidden_size": 10, "layers": 4}, r"bad config: unknown keys \['layers'\] for a 'simple' net"),
        ([10], r"bad config: \[10\] is not a JSON object"),
    ],
    ids=["huge", "zero", "float", "bool-as-int", "str-as-bool", "unknown-key", "list"],
)
def test_a_config_is_checked_before_any_net_is_built(tmp_path, monkeypatch, config, match):
    net = random_simple(14)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = write_raw(tmp_path / "cfg.safetensors", tensors, valid_meta(net) | {"config": json.dumps(config)})
    assert path.stat().st_size < 2000
    built = []
    monkeypatch.setattr(WF, "build_net", lambda *a, **k: built.append(a) or pytest.fail("built a net"))
    with pytest.raises(WeightsError, match=match) as e:
        load_weights(path)
    assert str(path) in str(e.value) and built == []


def test_a_large_file_that_is_not_ours_is_refused_from_its_header_alone(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [75_000_000],
                               "data_offsets": [0, 300_000_000]}}).encode()
    path = tmp_path / "foreign-300mb.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 300_000_000)  # sparse: 300 MB long, no disk used
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError, match="not an l2l-optim weight file"):
            load_weights(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_a_body_longer_than_its_header_says_is_refused_before_it_is_read(tmp_path):
    good = save_weights(random_simple(15), tmp_path / "good.safetensors")
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(good.read_bytes())
    with open(padded, "r+b") as f:
        f.truncate(300_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError, match=r"corrupted weight file \(300000000 bytes, the header describes"):
            load_weights(padded)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_loading_weights_leaves_the_global_rng_alone(tmp_path):
    path = save_weights(DMOptimizerNet(hidden_size=3), tmp_path / "dm.safetensors")
    state = torch.get_rng_state()
    load_weights(path)
    assert torch.equal(torch.get_rng_state(), state)


def test_foreign_safetensors_file(tmp_path):
    path = write_raw(tmp_path / "foreign.safetensors", {"x": torch.zeros(3)}, {})
    with pytest.raises(WeightsError, match="not an l2l-optim weight file"):
        load_weights(path)


def test_requested_arch(tmp_path):
    path = save_weights(DMOptimizerNet(hidden_size=3), tmp_path / "dm.safetensors")
    assert load_weights(path, arch="dm").net.arch == "dm"
    with pytest.raises(WeightsError, match="holds 'dm' weights, but 'simple' was requested"):
        load_weights(path, arch="simple")


# -------------------------------------------------------------------------- registry


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Two shipped-weights directories: the package one shadows the repository one."""
    pkg, repo = tmp_path / "_weights", tmp_path / "weights"
    pkg.mkdir()
    repo.mkdir()
    monkeypatch.setattr(W, "weights_dirs", lambda: [pkg, repo])
    return pkg, repo


def test_registry_lists_and_loads_shipped_names(registry):
    pkg, repo = registry
    nets = {"simple": random_simple(14), "dm": DMOptimizerNet(hidden_size=3)}
    save_weights(nets["simple"], pkg / "simple.safetensors", metadata={"recipe": "r1"})
    save_weights(random_simple(15), repo / "simple.safetensors")  # shadowed
    save_weights(nets["dm"], repo / "dm.safetensors", metadata={"recipe": "r2"})
    (repo / "README.md").write_text("model card, not weights")
    listed = list_weights()
    assert list(listed) == ["dm", "simple"]
    assert listed["simple"]["recipe"] == "r1" and listed["dm"]["arch"] == "dm"
    assert listed["simple"]["fingerprint"] == fingerprint(nets["simple"])
    for name, net in nets.items():
        loaded = load_weights(name)
        assert same_weights(loaded.net, net)
        assert loaded.path.name == f"{name}.safetensors"
    assert l2l_optim.list_weights() == listed  # lazily exported


def test_unknown_name_lists_the_available_ones(registry):
    pkg, _ = registry
    with pytest.raises(WeightsError, match="unknown weights 'simple'; shipped weights: none"):
        load_weights("simple")
    save_weights(random_simple(), pkg / "simple.safetensors")
    save_weights(random_simple(aggregate=False), pkg / "simple-noagg.safetensors")
    with pytest.raises(WeightsError, match="unknown weights 'simple-rms'; .*simple, simple-noagg"):
        load_weights("simple-rms")


def test_list_weights_reads_only_headers(registry):
    pkg, _ = registry
    path = save_weights(random_simple(), pkg / "simple.safetensors")
    data = bytearray(path.read_bytes())
    n, _ = header_of(path)
    data[-1] ^= 0xFF  # body damage: load notices, the cheap listing does not read it
    path.write_bytes(bytes(data))
    assert "simple" in list_weights()
    with pytest.raises(WeightsError):
        load_weights("simple")


def test_default_dirs_include_the_repository_weights():
    repo_weights = Path(W.__file__).resolve().parents[2] / "weights"
    assert repo_weights.is_dir()  # the tests run from a checkout
    assert repo_weights in W.weights_dirs()
    assert all(d.is_dir() for d in W.weights_dirs())


# -------------------------------------------------------------------------------- hub


def test_the_file_format_alone_refuses_hub_addresses():
    # weights.py reads files; downloading is the Hub module's, which the public
    # l2l_optim.load_weights is
    with pytest.raises(WeightsError, match="Hub addresses are loaded by l2l_optim.load_weights"):
        W.load_weights("hf://org/repo/w.safetensors")
    assert l2l_optim.load_weights is hub.load_weights


def test_hub_offline_fails_fast_with_advice(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError) as e:
        hub.load_weights("hf://someone/some-repo/simple.safetensors")
    msg = str(e.value)
    assert "someone/some-repo" in msg and "HF_HUB_OFFLINE" in msg
    assert "shipped name" in msg and "local path" in msg


@pytest.mark.parametrize(
    "source, match",
    [
        ("hf://org/repo/weights.bin", r"invalid filename 'weights.bin': weights on the Hub are .safetensors"),
        ("hf://org/repo/../w.safetensors", r"invalid filename '../w.safetensors'"),
        ("hf://org/repo/a//w.safetensors", r"invalid filename 'a//w.safetensors'"),
        ("hf://org/re po/w.safetensors", r"invalid repo id 'org/re po'"),
    ],
    ids=["suffix", "dotdot", "empty-part", "repo-id"],
)
def test_hub_address_errors_name_their_cause_even_offline(tmp_path, monkeypatch, no_network, source, match):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=match) as e:
        hub.load_weights(source)
    assert time.perf_counter() - t0 < 5
    assert "not in the local cache" not in str(e.value)


def test_hub_download_is_used_and_validated(tmp_path, monkeypatch, no_network):
    import huggingface_hub

    net = random_simple(17)
    local = save_weights(net, tmp_path / "dl" / "w.safetensors")
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw.get("revision"), kw.get("local_files_only")))
        if filename == "missing.safetensors":
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError("404 not found")
        return str(local)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: True)  # the fake download is the Hub here
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = hub.load_weights("hf://org/repo@v1/sub/w.safetensors", arch="simple")
    assert same_weights(loaded.net, net)
    assert calls[-1] == ("org/repo", "sub/w.safetensors", "v1", False)
    hub.load_weights("hf://org/repo")
    assert calls[-1][:2] == ("org/repo", "weights.safetensors")
    with pytest.raises(WeightsError, match="no file 'missing.safetensors' in the Hub repo 'org/repo'"):
        hub.load_weights("hf://org/repo/missing.safetensors")
    with pytest.raises(WeightsError, match="expected hf://"):
        hub.load_weights("hf://just-a-name")
