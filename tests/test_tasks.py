"""Tests for the optimizee models (l2l_optim.models) and the tasks built on them (l2l_optim.tasks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fake_idx import make_fake_datasets
from l2l_optim.models import (MLP5_WIDTH, RESNET_NARROW_WIDTH, ResNetSmall, base_mlp, lenet, mlp5, resnet_narrow,
                              resnet_small)
from l2l_optim.tasks import TASKS, Task, make_task, subsample_task
from l2l_optim.training import evaluate_model

BASE = 397_510


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_and_ratios():
    assert n_params(base_mlp()) == BASE
    assert n_params(lenet()) == 61_706
    assert n_params(mlp5()) == 6_368_050
    assert 15.9 < n_params(mlp5()) / BASE < 16.1  # the paper's 16x 5-layer MLP
    assert MLP5_WIDTH == 1330
    assert n_params(resnet_small()) == 11_172_810
    assert 27.5 < n_params(resnet_small()) / BASE < 28.5  # ResNet-18 size, ~28x
    assert RESNET_NARROW_WIDTH == 16 and n_params(resnet_narrow()) == 701_178
    assert 1.7 < n_params(resnet_narrow()) / BASE < 1.8  # fig5b-long's ResNet, 1.76x


def test_narrow_resnet_is_resnet18s_layout_at_a_quarter_of_the_width():
    narrow, full = resnet_narrow(), resnet_small()
    assert isinstance(narrow, ResNetSmall)
    assert [n for n, _ in narrow.named_parameters()] == [n for n, _ in full.named_parameters()]
    assert all(pn.shape[:2] == tuple(d // 4 for d in pf.shape[:2]) for (_, pn), (_, pf)
               in zip(narrow.named_parameters(), full.named_parameters()) if pn.dim() == 4 and pn.shape[1] > 1)
    assert narrow.fc.in_features == 128 and full.fc.in_features == 512


def test_mlp5_has_five_linear_layers():
    layers = [m for m in mlp5(32).modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in layers] == [(784, 32), (32, 32), (32, 32), (32, 32), (32, 10)]


@pytest.mark.parametrize("factory", [lenet, lambda: mlp5(64), lambda: resnet_small(8), resnet_small,
                                     resnet_narrow])
def test_models_map_mnist_images_to_ten_logits(factory):
    torch.manual_seed(0)
    out = factory()(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


def test_resnet_has_batchnorm_buffers():
    m = resnet_small(8)
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    names = dict(m.named_buffers())
    assert any(k.endswith("running_mean") for k in names)


def test_registry_entries():
    assert TASKS["mnist-lenet"] == ("mnist", lenet)
    assert TASKS["fmnist-lenet"] == ("fashion-mnist", lenet)
    assert TASKS["mnist-mlp5"] == ("mnist", mlp5)
    assert TASKS["fmnist-resnet"] == ("fashion-mnist", resnet_small)
    assert TASKS["fmnist-resnet16"] == ("fashion-mnist", resnet_narrow)
    assert TASKS["mnist-mlp"][0] == "mnist"  # the base task is untouched


def test_functional_loss_with_batchnorm_matches_the_module_and_updates_only_the_given_buffers():
    task = Task("t", lambda: resnet_small(8), train=(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))),
                batch_size=16)
    params, buffers = task.init_params(3)
    params2, _ = task.init_params(3)
    assert all(torch.equal(params[k], params2[k]) for k in params)  # seeded init
    template_buffers = {k: v.clone() for k, v in task.module.named_buffers()}
    batch = task.sample_batch(torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in buffers.items()}
    f = task.loss(params, buffers, batch)

    torch.manual_seed(3)
    model = resnet_small(8).train()
    expected = nn.functional.cross_entropy(model(batch[0]), batch[1])
    torch.testing.assert_close(f, expected)
    # train-mode BatchNorm updated the running statistics of the buffers passed in ...
    assert not torch.equal(before["stem.1.running_mean"], buffers["stem.1.running_mean"])
    torch.testing.assert_close(buffers["stem.1.running_mean"], dict(model.named_buffers())["stem.1.running_mean"])
    # ... and not the template module's
    assert all(torch.equal(template_buffers[k], v) for k, v in task.module.named_buffers())
    # gradients flow to every parameter
    ps = {k: v.requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad(task.loss(ps, buffers, batch), list(ps.values()))
    assert all(torch.isfinite(g).all() for g in grads)
    out = functional_call(task.module, {**params, **buffers}, (batch[0],))
    assert out.shape == (16, 10)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return make_fake_datasets(tmp_path_factory.mktemp("data"), n_train=300, n_test=100)


@pytest.mark.parametrize("name", ["mnist-lenet", "fmnist-lenet", "mnist-mlp5", "fmnist-resnet", "fmnist-resnet16"])
def test_make_task_reads_local_idx_files(fake_root, name):
    task = make_task(name, root=fake_root, batch_size=8, with_test=True)
    x, y = task.train
    assert x.shape == (300, 1, 28, 28) and y.shape == (300,)
    assert task.test[0].shape == (100, 1, 28, 28)
    assert task.batch_size == 8


def test_evaluate_a_functional_small_resnet_on_the_test_split(fake_root):
    task = make_task("fmnist-lenet", root=fake_root, with_test=True)
    task = Task("r", lambda: resnet_small(4), train=task.train, test=task.test)
    params, buffers = task.init_params(0)
    buffers = {k: v + 0.5 if k.endswith("running_mean") else v for k, v in buffers.items()}  # eval mode shows it
    ev = evaluate_model(task.module, task.test, task.loss_fn, state={**params, **buffers})
    model = task.model_fn()
    model.load_state_dict({**params, **buffers})
    with torch.no_grad():
        out = model.eval()(task.test[0])
    expected = {"test_loss": float(nn.functional.cross_entropy(out, task.test[1])),
                "test_acc": float((out.argmax(1) == task.test[1]).float().mean())}
    assert ev == pytest.approx(expected, rel=1e-5)
    assert ev != pytest.approx(evaluate_model(task.module, task.test), rel=1e-3)  # the template's own values
    assert task.module.training  # evaluation restores train mode


def test_subsample_task_replaces_only_the_training_data():
    task = Task("t", lenet, train=(torch.randn(20, 1, 28, 28), torch.arange(20) % 10),
                test=(torch.randn(4, 1, 28, 28), torch.arange(4)), batch_size=5)
    x, y = task.train[0][:10], task.train[1][:10]
    sub = subsample_task(task, x, y)
    assert sub.train[0] is x and sub.train[1] is y
    assert (sub.name, sub.model_fn, sub.test, sub.batch_size) == (task.name, task.model_fn, task.test, 5)
    assert task.train[0].shape[0] == 20
