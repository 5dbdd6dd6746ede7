"""Tests for l2l_optim.hub: save_pretrained / from_pretrained / push_to_hub, never on the network.

Every test runs with sockets refused (a connection attempt fails the call that made it); Hub
repos come from a local Hugging Face cache built here (``HF_HUB_CACHE``), and uploads from a
monkeypatched ``HfApi``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from l2l_optim import hub
from l2l_optim.finetuning import finetune
from l2l_optim.nets import DMOptimizerNet, RNNPropNet, SimpleOptimizerNet
from l2l_optim.optimizer import DMOptimizer, LearnedOptimizer, RNNProp, SimpleOptimizer
from l2l_optim.weights import WeightsError, fingerprint, save_weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _refuse_the_network(no_network):
    """Every test here runs with connections beyond this machine refused (conftest)."""
    return no_network


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache, offline as if HF_HUB_OFFLINE=1 was set before Python started."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def go_online(monkeypatch):
    """Offline mode off; the network is still refused (no_network)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def cache_repo(cache: Path, repo_id: str, source_dir: Path) -> None:
    """Put a directory's files into the cache as repo_id at COMMIT (main), as a download would."""
    owner, name = repo_id.split("/")
    root = cache / f"models--{owner}--{name}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in source_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


def seeded(cls, **config):
    torch.manual_seed(0)
    net = cls(**config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


OPTIMIZERS = [
    pytest.param(SimpleOptimizer, lambda: seeded(SimpleOptimizerNet), id="simple"),
    pytest.param(DMOptimizer, lambda: seeded(DMOptimizerNet, hidden_size=4), id="dm"),
    pytest.param(RNNProp, lambda: seeded(RNNPropNet, hidden_size=4), id="rnnprop"),
]


def train_steps(opt, params, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


# ---------------------------------------------------------------------- local directories


@pytest.mark.parametrize("cls, make", OPTIMIZERS)
def test_save_then_from_pretrained_gives_bit_identical_updates(tmp_path, cls, make):
    a = [torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    opt = cls(a, weights=make(), lr=0.5)
    assert opt.save_pretrained(tmp_path / "repo") == tmp_path / "repo"
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["README.md", "weights.safetensors"]
    again = cls.from_pretrained(tmp_path / "repo", b, lr=0.5)
    generic = LearnedOptimizer.from_pretrained(str(tmp_path / "repo"), [torch.zeros(2, requires_grad=True)])
    assert type(again) is cls and type(generic) is cls
    assert again.meta_fingerprint == opt.meta_fingerprint
    train_steps(opt, a)
    train_steps(again, b)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_the_model_card_has_front_matter_the_recipe_and_the_results(tmp_path):
    # simple-v0: shipped weights meta-trained by meta_fit, whose card shows its recipe and results
    SimpleOptimizer([torch.zeros(2, requires_grad=True)], weights="simple-v0").save_pretrained(
        tmp_path / "shipped", repo_id="me/simple")
    card = ModelCard.load(tmp_path / "shipped" / "README.md")
    assert card.data.library_name == "l2l-optim" and card.data.license == "apache-2.0"
    assert {"learned-optimizer", "l2l-optim-simple", "pytorch"} <= set(card.data.tags)
    text = card.text
    assert 'SimpleOptimizer.from_pretrained("me/simple", model.parameters())' in text
    assert "## Meta-training recipe" in text and "python -m l2l_optim meta-fit --trajectories 20" in text
    assert "| held-out evaluation loss of the selected net | 0.0598" in text
    v0 = SimpleOptimizer([torch.zeros(1, requires_grad=True)], weights="simple-v0").net
    assert f"| fingerprint | `{fingerprint(v0)}` |" in text

    hub.save_pretrained(seeded(SimpleOptimizerNet), tmp_path / "fresh")
    fresh = ModelCard.load(tmp_path / "fresh" / "README.md").text
    assert "No measured results travel with these weights." in fresh and "## Meta-training recipe" not in fresh
    assert "opt.eval()" not in text + fresh
    # the default weights run inside Schedule-Free averaging: the card says how to evaluate
    SimpleOptimizer([torch.zeros(2, requires_grad=True)]).save_pretrained(tmp_path / "default")
    assert "call `opt.eval()` before evaluating" in ModelCard.load(tmp_path / "default" / "README.md").text


def test_changed_weights_do_not_claim_their_source_recipe(tmp_path):
    opt = SimpleOptimizer([torch.zeros(2, requires_grad=True)])
    shipped = opt.meta_fingerprint
    with torch.no_grad():
        opt.net.w_out.mul_(2.0)
    opt.save_pretrained(tmp_path / "changed")
    text = (tmp_path / "changed" / "README.md").read_text()
    assert "## Meta-training recipe" not in text
    assert f"changed after they were loaded from weights with fingerprint `{shipped}`" in text


def test_a_finetune_result_is_saved_with_its_card_and_accepted_as_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = x.sum(1, keepdim=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    result = finetune(model, DataLoader(TensorDataset(x, y), batch_size=20), loss_fn=F.mse_loss,
                      subsample=0.5, trajectories=2, unroll=3, max_unrolls=2, progress=False)
    result.save_pretrained(tmp_path / "ft")
    text = (tmp_path / "ft" / "README.md").read_text()
    assert "## Fine-tuning" in text and '"base_weights": "simple (' in text
    assert "| trajectory | initial loss | final loss | target | reached |" in text
    params = list(model.parameters())
    direct = SimpleOptimizer(params, weights=result)
    loaded = SimpleOptimizer.from_pretrained(tmp_path / "ft", params)
    assert direct.meta_fingerprint == loaded.meta_fingerprint == fingerprint(result.net)
    assert direct.net is not result.net


def test_from_pretrained_errors_lose_nothing(tmp_path, hf_cache):
    SimpleOptimizer([torch.zeros(2, requires_grad=True)]).save_pretrained(tmp_path / "simple")
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(WeightsError, match=r"holds 'simple' weights, but 'dm' was requested"):
        DMOptimizer.from_pretrained(tmp_path / "simple", p)
    with pytest.raises(TypeError, match=r"^from_pretrained takes the weights from repo_id_or_dir"):
        SimpleOptimizer.from_pretrained(tmp_path / "simple", p, weights="simple")
    with pytest.raises(WeightsError, match=r"^\./nowhere: no such directory, and not a Hugging Face Hub repo id"):
        SimpleOptimizer.from_pretrained("./nowhere", p)
    with pytest.raises(WeightsError, match=r"^a/b/c: no such directory, and not a Hugging Face Hub repo id"):
        SimpleOptimizer.from_pretrained("a/b/c", p)
    with pytest.raises(WeightsError, match=r"a local directory has no revision \(got revision='v1'\)"):
        SimpleOptimizer.from_pretrained(tmp_path / "simple", p, revision="v1")
    with pytest.raises(TypeError, match=r"^from_pretrained needs a directory or a Hub repo id, got int"):
        SimpleOptimizer.from_pretrained(3, p)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is a file, not a directory"):
        SimpleOptimizer(p).save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


# ----------------------------------------------------------------------- the local cache


def test_a_cached_repo_loads_with_no_network(tmp_path, hf_cache, monkeypatch, no_network):
    net = seeded(DMOptimizerNet, hidden_size=4)
    hub.save_pretrained(net, tmp_path / "src")
    cache_repo(hf_cache, "someone/dm-opt", tmp_path / "src")
    p = [torch.zeros(3, requires_grad=True)]
    assert DMOptimizer.from_pretrained("someone/dm-opt", p).meta_fingerprint == fingerprint(net)
    assert DMOptimizer.from_pretrained("someone/dm-opt", p, revision=COMMIT).meta_fingerprint == fingerprint(net)
    assert DMOptimizer(p, weights="hf://someone/dm-opt").meta_fingerprint == fingerprint(net)
    assert no_network == []
    # not offline: the refused connection makes the cached copy the answer, quickly
    go_online(monkeypatch)
    t0 = time.perf_counter()
    assert DMOptimizer.from_pretrained("someone/dm-opt", p).meta_fingerprint == fingerprint(net)
    assert time.perf_counter() - t0 < 10


def test_an_offline_miss_is_one_clear_error_within_seconds(hf_cache, monkeypatch):
    p = [torch.zeros(2, requires_grad=True)]
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        SimpleOptimizer.from_pretrained("someone/missing", p)
    assert time.perf_counter() - t0 < 5
    assert str(e.value) == (
        "hf://someone/missing/weights.safetensors: cannot get it from the Hugging Face Hub: "
        "'weights.safetensors' of 'someone/missing' is not in the local cache and HF_HUB_OFFLINE "
        "is set; use a shipped name (see `l2l-optim info`) or a local path instead"
    )
    go_online(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=r"the Hub cannot be reached and 'weights.safetensors' of "
                                           r"'someone/missing' is not in the local cache"):
        SimpleOptimizer.from_pretrained("someone/missing", p)
    assert time.perf_counter() - t0 < 10


def test_a_cached_repo_with_an_oversized_config_is_refused(tmp_path, hf_cache):
    net = seeded(SimpleOptimizerNet)
    path = save_weights(net, tmp_path / "src" / "weights.safetensors")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["config"] = json.dumps({"hidden_size": 100000})
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    cache_repo(hf_cache, "someone/huge", tmp_path / "src")
    with pytest.raises(WeightsError, match=r"bad config: hidden_size=100000 is outside \[1, 1024\]"):
        SimpleOptimizer.from_pretrained("someone/huge", [torch.zeros(2, requires_grad=True)])


def test_constructors_and_local_loads_never_touch_the_network(tmp_path, no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    p = [torch.zeros(2, requires_grad=True)]
    for cls in (SimpleOptimizer, DMOptimizer, RNNProp):
        opt = cls(p)
        opt.save_pretrained(tmp_path / cls.__name__)
        cls.from_pretrained(tmp_path / cls.__name__, p)
    assert no_network == []


# ---------------------------------------------------------------------------- uploading


def test_push_to_hub_uploads_the_weights_and_the_card(monkeypatch):
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create", repo_id, kw))

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        files = {f.name: f.read_bytes() for f in folder.iterdir()}
        calls.append(("upload", kw["repo_id"], sorted(files), kw["allow_patterns"], kw["revision"]))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    opt = SimpleOptimizer([torch.zeros(2, requires_grad=True)])
    assert opt.push_to_hub("me/simple", private=True) == "commit-info"
    assert calls == [
        ("create", "me/simple", {"private": True, "exist_ok": True}),
        ("upload", "me/simple", ["README.md", "weights.safetensors"],
         ["weights.safetensors", "README.md"], None),
    ]

    def refuse(self, **kw):
        raise PermissionError("401 unauthorized")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    with pytest.raises(WeightsError, match=r"^push_to_hub: cannot upload to 'me/simple' "
                                           r"\(PermissionError: 401 unauthorized\)$"):
        opt.push_to_hub("me/simple")


def test_the_hub_methods_are_public():
    for cls in (SimpleOptimizer, DMOptimizer, RNNProp, LearnedOptimizer):
        assert callable(cls.from_pretrained) and callable(cls.save_pretrained) and callable(cls.push_to_hub)
