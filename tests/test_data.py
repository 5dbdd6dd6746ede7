"""Tests for l2l_optim.data: where datasets are looked for, and loaders turned into tensors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fake_idx import make_fake_datasets
from l2l_optim import data
from l2l_optim.data import DatasetNotFoundError, load_dataset, materialize


@pytest.fixture
def no_default_roots(tmp_path, monkeypatch):
    """Only the ``root`` argument and ``$L2L_DATA`` can hold data: the defaults are empty."""
    monkeypatch.delenv("L2L_DATA", raising=False)
    monkeypatch.setattr(data, "_SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_the_root_argument_and_l2l_data_are_searched(tmp_path, monkeypatch, no_default_roots):
    root = make_fake_datasets(tmp_path / "data", n_train=30, n_test=10)
    x, y = load_dataset("mnist", "train", root=root)
    assert x.shape == (30, 1, 28, 28) and y.shape == (30,)
    monkeypatch.setenv("L2L_DATA", str(root))
    assert load_dataset("fashion-mnist", "test")[0].shape == (10, 1, 28, 28)


def test_a_checkout_beside_the_working_directory_is_not_searched(tmp_path, monkeypatch, no_default_roots):
    # ../shared/data is where a development checkout keeps its data; a library must not look there
    make_fake_datasets(tmp_path / "shared" / "data", n_train=30, n_test=10)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", "train")
    assert "shared" not in str(err.value)


def test_materialize_concatenates_the_batches_and_keeps_the_loader_batch_size():
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    xs, ys, bs = materialize(DataLoader(TensorDataset(x, y), batch_size=4))
    assert torch.equal(xs, x) and torch.equal(ys, y) and bs == 4
    xs, ys, bs = materialize([(x[:3], y[:3]), (x[3:], y[3:])])
    assert torch.equal(ys, y) and bs == 3  # no batch_size attribute: the first batch's size

    class Loader(list):
        batch_size = 8  # a loader's own batch size wins over its first batch's

    assert materialize(Loader([(x[:3], y[:3]), (x[3:], y[3:])]))[2] == 8
