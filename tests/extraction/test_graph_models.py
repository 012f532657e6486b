"""Graph path on models that are not chains, against dense float64 references."""

import copy

import pytest
import torch
from torch import nn

from curvkit.errors import ShapeError, UnsupportedModuleError
from curvkit.extraction import extract
from tests.extraction.graph_models import (
    DT,
    TiedHeadLM,
    dense_ef,
    dense_ggn,
    flat_index,
    joint_index,
    per_example_grads,
    problem,
    sub,
    trainable,
)
from tests.reference import assert_allclose_report, kron_block, mc_error_bound

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in model.modules())


def _autograd_grads(model, loss_func, X, y):
    ref = copy.deepcopy(model)
    loss_func(ref(X), y).backward()
    return [p.grad for p in trainable(ref)], ref


CASES = [
    ("cnn", "ce"),
    ("conv3d", "mse"),
    ("resnet", "ce"),
    ("resnet", "bce"),
    ("reused", "mse"),
    ("reused", "ce"),
    ("dict", "ce"),
    ("tied", "ce"),
    ("gpt", "ce"),
]


@pytest.mark.parametrize("name,loss", CASES, ids=[f"{m}-{loss}" for m, loss in CASES])
def test_grad_batch_grad_and_diag_ggn_match_dense(name, loss):
    model, loss_func, X, y = problem(name, loss, n=3)
    expected, _ = _autograd_grads(model, loss_func, X, y)
    q = ("batch_grad", "diag_ggn") if name != "gpt" else ("batch_grad", "kflr")
    rec = extract(model, loss_func, X, y, q)
    assert _no_hooks(model)
    for p, g in zip(trainable(model), expected):
        assert_allclose_report(p.grad, g, msg="grad", **TOL)
    # every trainable parameter appears in exactly one record
    assert sorted(map(id, rec.params)) == sorted(map(id, trainable(model)))
    idx = flat_index(model, rec.params)
    pe = per_example_grads(model, loss_func, X, y)[:, idx]
    bg = torch.cat([b.flatten(1) for r in rec for b in r.batch_grad], 1)
    assert_allclose_report(bg, pe, msg="batch_grad", **TOL)
    if name != "gpt":
        diag = torch.cat([d.flatten() for r in rec for d in r.diag_ggn])
        ggn = dense_ggn(model, loss_func, X, y)
        assert_allclose_report(diag, ggn.diagonal()[idx], msg="diag_ggn", **TOL)


@pytest.mark.parametrize("name", ["resnet", "dict"])
def test_norm_layer_blocks_are_the_exact_blocks(name):
    model, loss_func, X, y = problem(name, "ce", n=4)
    rec = extract(model, loss_func, X, y, ("kflr", "empirical"))
    ggn, ef = dense_ggn(model, loss_func, X, y), dense_ef(model, loss_func, X, y)
    norms = [r for r in rec if r.block == "dense"]
    assert norms and all(r.A is None and r.G == {} for r in norms)
    for r in norms:
        idx = flat_index(model, r.params)
        assert_allclose_report(r.dense["kflr"], sub(ggn, idx), msg=r.name, **TOL)
        assert_allclose_report(r.dense["empirical"], sub(ef, idx), msg=r.name, **TOL)


def test_layer_norm_empirical_block_of_sequences_is_exact():
    """Per-sequence empirical Fisher of the transformer's LayerNorm parameters."""
    model, loss_func, X, y = problem("gpt", "ce", n=3)
    rec = extract(model, loss_func, X, y, ("empirical",))
    ef = dense_ef(model, loss_func, X, y)
    for r in rec:
        if r.block == "dense":
            idx = flat_index(model, r.params)
            assert_allclose_report(r.dense["empirical"], sub(ef, idx), msg=r.name, **TOL)


@pytest.mark.parametrize("name", ["cnn", "resnet", "dict", "reused"])
def test_linear_factors_exact_for_a_single_datum(name):
    """N = 1: G ⊗ A of a Linear layer on [N, in] (called once) is its exact GGN / EF block."""
    model, loss_func, X, y = problem(name, "ce", n=1)
    rec = extract(model, loss_func, X, y, ("kflr", "empirical"))
    ggn, ef = dense_ggn(model, loss_func, X, y), dense_ef(model, loss_func, X, y)
    checked = 0
    for r in rec:
        if isinstance(r.module, nn.Linear) and r.calls == 1:
            idx = joint_index(model, r.module.weight, r.module.bias if r.has_bias else None)
            for kind, dense in (("kflr", ggn), ("empirical", ef)):
                block = kron_block(r.G[kind], r.A)
                assert_allclose_report(block, sub(dense, idx), msg=f"{r.name} {kind}", **TOL)
            checked += 1
    assert checked >= 1


class _GroupedReflect(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 5, groups=2, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_grouped_reflect_conv_single_location_exact():
    """A kernel covering the reflect-padded input (one location), N = 1: per-group blocks exact."""
    torch.manual_seed(0)
    model = _GroupedReflect().to(DT)
    X = torch.randn(1, 4, 3, 3, dtype=DT)
    y = torch.tensor([2])
    loss_func = nn.CrossEntropyLoss()
    rec = extract(model, loss_func, X, y, ("kflr",))
    r = rec[0]
    assert r.block == "kron_grouped" and r.A.shape == (2, 2 * 25 + 1, 2 * 25 + 1)
    assert r.G["kflr"].shape == (2, 2, 2)
    ggn = dense_ggn(model, loss_func, X, y)
    full = joint_index(model, model.conv.weight, model.conv.bias)  # [4 * 51]
    for g in range(2):
        idx = full[g * 2 * 51 : (g + 1) * 2 * 51]
        block = kron_block(r.G["kflr"][g], r.A[g])
        assert_allclose_report(block, sub(ggn, idx), msg=f"group {g}", **TOL)


def test_embedding_factors_exact_with_one_token_and_linear_mse():
    """Embedding -> Linear with MSE, one token per example: J and Λ are constant, KFLR exact."""
    torch.manual_seed(0)

    class EmbLin(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 3, padding_idx=5)
            self.lin = nn.Linear(3, 2)

        def forward(self, idx):
            return self.lin(self.emb(idx))

    model = EmbLin().to(DT)
    X = torch.tensor([0, 3, 3, 1, 5, 0, 2])
    y = torch.randn(7, 2, dtype=DT)
    for reduction in ("mean", "sum"):
        loss_func = nn.MSELoss(reduction=reduction)
        rec = extract(model, loss_func, X, y, ("kflr",))
        ggn = dense_ggn(model, loss_func, X, y)
        emb, lin = rec
        assert emb.block == "embedding" and emb.A is None
        R = 1 / 7 if reduction == "mean" else 1.0
        counts = torch.tensor([2.0, 1, 1, 2, 0, 0], dtype=DT)  # padding index 5 not counted
        assert_allclose_report(emb.A_diag, R * counts, **TOL)
        idx = flat_index(model, [model.emb.weight])
        block = torch.kron(torch.diag(emb.A_diag), emb.G["kflr"])
        # the padding row gets no gradient: its GGN block vanishes
        expected = sub(ggn, idx)
        expected[15:18] = expected[:, 15:18] = 0.0
        assert_allclose_report(block, expected, msg=f"embedding {reduction}", **TOL)
        jidx = joint_index(model, model.lin.weight, model.lin.bias)
        assert_allclose_report(kron_block(lin.G["kflr"], lin.A), sub(ggn, jidx), **TOL)


def test_kfac_converges_to_kflr_with_many_samples():
    model, loss_func, X, y = problem("dict", "ce", n=4)
    gen = torch.Generator().manual_seed(0)
    rec = extract(model, loss_func, X, y, ("kfac", "kflr"), mc_samples=4000, generator=gen)
    for r in rec:
        if r.block == "kron":
            err = (r.G["kfac"] - r.G["kflr"]).abs().max()
            assert err < 4 * mc_error_bound(4000, r.G["kflr"].abs().max())
        else:
            err = (r.dense["kfac"] - r.dense["kflr"]).abs().max()
            assert err < 4 * mc_error_bound(4000, r.dense["kflr"].abs().max())


def test_batchnorm_train_mode():
    model, loss_func, X, y = problem("resnet", "ce", n=4)
    model.train()
    for q in ("batch_grad", "empirical", "diag_ggn"):
        with pytest.raises(UnsupportedModuleError, match=r"BatchNorm2d 'bn0'.*train mode"):
            extract(model, loss_func, X, y, (q,))
    buffers = [b.clone() for b in model.buffers()]
    with pytest.raises(ShapeError, match="N = len"):
        extract(model, loss_func, X, y[:3], ("kflr",))  # fails after the forward pass
    for b, saved in zip(model.buffers(), buffers):
        assert torch.equal(b, saved)
    assert all(p.grad is None for p in model.parameters()) and _no_hooks(model)
    expected, ref = _autograd_grads(model, loss_func, X, y)
    rec = extract(model, loss_func, X, y, ("kflr", "kfac"))
    for p, g in zip(trainable(model), expected):
        assert_allclose_report(p.grad, g, **TOL)
    for b, r in zip(model.buffers(), ref.buffers()):  # one forward pass: statistics moved once
        assert_allclose_report(b, r, rtol=1e-14, atol=0)
    assert {r.name for r in rec if r.block == "dense"} == {"bn0", "bn1", "bn2"}
    # the last BatchNorm's block is its exact GGN block (batch statistics, no BN after it)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    ggn = dense_ggn(ref, loss_func, X, y)
    bn2 = next(r for r in rec if r.name == "bn2")
    assert_allclose_report(bn2.dense["kflr"], sub(ggn, flat_index(model, bn2.params)), **TOL)


def test_positions_shared_by_the_batch():
    model, loss_func, X, y = problem("gpt_shared_pos", "ce", n=4)
    with pytest.raises(ShapeError, match="Embedding 'pos'.*leading dimension 3, not the batch"):
        extract(model, loss_func, X, y, ("batch_grad",))
    expected, _ = _autograd_grads(model, loss_func, X, y)
    extract(model, loss_func, X, y, ("kflr", "kfac"))
    for p, g in zip(trainable(model), expected):
        assert_allclose_report(p.grad, g, **TOL)
    with pytest.raises(ShapeError, match="one output row per example"):
        extract(*problem("gpt", "ce", n=3), ("diag_ggn",))


def test_tied_weights():
    model, loss_func, X, y = problem("tied", "ce", n=4)
    with pytest.raises(UnsupportedModuleError, match=r"Linear 'l1'.*shares parameters with \['l2'"):
        extract(model, loss_func, X, y, ("kflr",))
    assert _no_hooks(model) and all(p.grad is None for p in model.parameters())
    rec = extract(model, loss_func, X, y, ("kflr",), unsupported="gradient")
    assert [r.name for r in rec] == ["inp", "out"]
    assert [n for n, _, _ in rec.unfactored] == ["l1", "l2"]
    expected, _ = _autograd_grads(model, loss_func, X, y)
    for p, g in zip(trainable(model), expected):
        assert_allclose_report(p.grad, g, **TOL)


def test_parameter_used_outside_its_module():
    torch.manual_seed(0)
    model = TiedHeadLM().to(DT)
    X, y = torch.tensor([0, 4, 2, 2, 5]), torch.tensor([1, 0, 3, 5, 2])
    loss_func = nn.CrossEntropyLoss()
    with pytest.raises(UnsupportedModuleError, match="Embedding 'emb'.*outside its calls"):
        extract(model, loss_func, X, y, ("kflr",))
    assert _no_hooks(model) and all(p.grad is None for p in model.parameters())
    rec = extract(model, loss_func, X, y, ("kflr", "batch_grad"), unsupported="gradient")
    assert [r.name for r in rec] == ["mix"] and rec.unfactored[0][0] == "emb"
    expected, _ = _autograd_grads(model, loss_func, X, y)
    for p, g in zip(trainable(model), expected):
        assert_allclose_report(p.grad, g, **TOL)
    pe = per_example_grads(model, loss_func, X, y)[:, flat_index(model, rec.params)]
    assert_allclose_report(torch.cat([b.flatten(1) for b in rec[0].batch_grad], 1), pe, **TOL)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.PReLU()

    def forward(self, x):
        return self.act(self.lin(x)) + x


class _WithPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.up = nn.ConvTranspose1d(1, 1, 2)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.up(self.block(x)[:, None])[:, 0])


def test_unsupported_module_named_by_path_and_gradient_fallback():
    torch.manual_seed(0)
    model = _WithPReLU().to(DT)
    X, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    loss_func = nn.CrossEntropyLoss()
    with pytest.raises(UnsupportedModuleError) as err:
        extract(model, loss_func, X, y, ("kflr",))
    msg = str(err.value)
    assert "PReLU 'block.act'" in msg and "unsupported='gradient'" in msg
    assert "Conv2d" in msg and "Embedding" in msg and "LayerNorm" in msg
    assert _no_hooks(model) and all(p.grad is None for p in model.parameters())
    rec = extract(model, loss_func, X, y, ("kflr", "batch_grad"), unsupported="gradient")
    assert _no_hooks(model)
    assert [r.name for r in rec] == ["block.lin", "up", "head"]
    assert [n for n, _, _ in rec.unfactored] == ["block.act"]
    expected, _ = _autograd_grads(model, loss_func, X, y)
    for p, g in zip(trainable(model), expected):
        assert_allclose_report(p.grad, g, **TOL)
    pe = per_example_grads(model, loss_func, X, y)[:, flat_index(model, rec.params)]
    bg = torch.cat([b.flatten(1) for r in rec for b in r.batch_grad], 1)
    assert_allclose_report(bg, pe, **TOL)


class _Transposed(nn.Module):
    def __init__(self, conv, flat):
        super().__init__()
        self.ct = conv
        self.fc = nn.Linear(flat, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.ct(x)).flatten(1))


TRANSPOSED = [
    pytest.param(
        lambda: nn.ConvTranspose1d(
            4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2
        ),
        (4, 5),
        id="1d-groups-stride-dilation-output_padding",
    ),
    pytest.param(
        lambda: nn.ConvTranspose2d(2, 3, (2, 3), stride=(2, 1), padding=(0, 1)), (2, 3, 3), id="2d"
    ),
    pytest.param(lambda: nn.ConvTranspose3d(2, 2, 2, padding=1, bias=False), (2, 3, 2, 3), id="3d"),
]


@pytest.mark.parametrize("make,shape", TRANSPOSED)
def test_transposed_conv_gradients_and_diagonal(make, shape):
    torch.manual_seed(0)
    conv = make().to(DT)
    X = torch.randn(3, *shape, dtype=DT)
    model = _Transposed(conv, conv(X).flatten(1).shape[1]).to(DT)
    y, loss_func = torch.randint(0, 3, (3,)), nn.CrossEntropyLoss()
    rec = extract(model, loss_func, X, y, ("batch_grad", "diag_ggn", "kflr"))
    assert rec[0].block == "kron_transposed"
    expected, _ = _autograd_grads(model, loss_func, X, y)
    for p, g in zip(trainable(model), expected):
        assert_allclose_report(p.grad, g, **TOL)
    idx = flat_index(model, rec.params)
    pe = per_example_grads(model, loss_func, X, y)[:, idx]
    assert_allclose_report(
        torch.cat([b.flatten(1) for r in rec for b in r.batch_grad], 1), pe, **TOL
    )
    diag = torch.cat([d.flatten() for r in rec for d in r.diag_ggn])
    assert_allclose_report(diag, dense_ggn(model, loss_func, X, y).diagonal()[idx], **TOL)


def test_transposed_conv_single_location_exact():
    """One input and one output location, N = 1: G ⊗ A over the flipped, transposed weight."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(2, 3, 3, padding=1).to(DT)
    model = _Transposed(conv, 3).to(DT)
    X, y, loss_func = torch.randn(1, 2, 1, 1, dtype=DT), torch.tensor([1]), nn.CrossEntropyLoss()
    r = extract(model, loss_func, X, y, ("kflr",))[0]
    ggn = dense_ggn(model, loss_func, X, y)
    off = 0  # the transposed conv's weight comes first in the flat order
    idx = []
    for o in range(3):  # W'[o, i, a, b] = W[i, o, 2 - a, 2 - b], then the bias entry o
        idx += [
            off + ((i * 3 + o) * 3 + 2 - a) * 3 + 2 - b
            for i in range(2)
            for a in range(3)
            for b in range(3)
        ]
        idx.append(off + 2 * 3 * 9 + o)
    idx = torch.tensor(idx)
    assert_allclose_report(kron_block(r.G["kflr"], r.A), sub(ggn, idx), **TOL)


def test_records_of_other_blocks_are_accepted_by_kronecker_operators():
    """Every block layout becomes an operator block (tested in tests/operators/test_graph_kfac)."""
    from curvkit.operators.kronecker import BlockDiagonalKFAC

    model, loss_func, X, y = problem("resnet", "ce", n=3)
    rec = extract(model, loss_func, X, y, ("kflr",))
    op = BlockDiagonalKFAC.from_records(rec, "kflr")
    assert [layer.block for layer in op.layers][:2] == ["kron", "dense"]
    assert op.shape[0] == sum(r.numel for r in rec)
    model, loss_func, X, y = problem("cnn", "ce", n=3)
    rec = extract(model, loss_func, X, y, ("kflr",))
    rows = rec.summary()
    assert rows[1]["A"] == (2, 19, 19) and rows[1]["tr A"] > 0
    op = BlockDiagonalKFAC.from_records(rec, "kflr")
    assert op.layers[1].block == "kron_grouped" and op.layers[1].groups == 2
    # plain Kronecker records of a non-chain model are accepted
    model, loss_func, X, y = problem("dict", "ce", n=3)
    model.gn.requires_grad_(False)
    rec = extract(model, loss_func, X, y, ("kflr",))
    op = BlockDiagonalKFAC.from_records(rec, "kflr")
    assert op.shape[0] == sum(r.numel for r in rec)


class _TiedHead(nn.Module):
    """GPT-style weight tying: the output Linear's weight is the Embedding's."""

    def __init__(self, vocab=6, d=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.emb(idx))))


def test_embedding_tied_to_output_layer():
    torch.manual_seed(0)
    model = _TiedHead().to(DT)
    X, y = torch.tensor([0, 4, 2, 2, 5]), torch.tensor([1, 0, 3, 5, 2])
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    rec = extract(model, loss_func, X, y, ("batch_grad", "diag_ggn"))
    assert [r.name for r in rec] == ["emb", "mix"]  # the tied weight belongs to its first module
    expected, _ = _autograd_grads(model, loss_func, X, y)
    for p, g in zip(trainable(model), expected):
        assert_allclose_report(p.grad, g, **TOL)
    idx = flat_index(model, rec.params)
    pe = per_example_grads(model, loss_func, X, y)[:, idx]
    assert_allclose_report(
        torch.cat([b.flatten(1) for r in rec for b in r.batch_grad], 1), pe, **TOL
    )
    diag = torch.cat([d.flatten() for r in rec for d in r.diag_ggn])
    assert_allclose_report(diag, dense_ggn(model, loss_func, X, y).diagonal()[idx], **TOL)
    with pytest.raises(UnsupportedModuleError, match=r"Embedding 'emb'.*shares parameters"):
        extract(model, loss_func, X, y, ("kflr",))
    for p in model.parameters():
        p.grad = None
    rec = extract(model, loss_func, X, y, ("kflr",), unsupported="gradient")
    assert [r.name for r in rec] == ["mix"]
    assert [n for n, _, _ in rec.unfactored] == ["emb", "head"]
    assert rec.unfactored[0][2] == [model.emb.weight] and rec.unfactored[1][2] == []
    for p, g in zip(trainable(model), expected):
        assert_allclose_report(p.grad, g, **TOL)


class _TupleInPlace(nn.Module):
    """Tuple input; optionally modifies a layer's input in place after the layer read it."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, xz):
        x, z = xz
        h = torch.tanh(x)
        out = self.a(h) + self.b(z)
        if self.in_place:
            h.mul_(2.0)
        return out


def test_tuple_input_and_inputs_modified_in_place():
    torch.manual_seed(0)
    X = (torch.randn(5, 4, dtype=DT), torch.randn(5, 2, dtype=DT))
    y, loss_func = torch.randn(5, 3, dtype=DT), nn.MSELoss()
    model = _TupleInPlace(False).to(DT)
    rec = extract(model, loss_func, X, y, ("kflr", "batch_grad"))
    expected, _ = _autograd_grads(model, loss_func, X, y)
    for p, g in zip(trainable(model), expected):
        assert_allclose_report(p.grad, g, **TOL)
    # one Linear on [N, in] per record and N = 5: the per-example gradients sum to .grad
    for r in rec:
        for b, p in zip(r.batch_grad, r.params):
            assert_allclose_report(b.sum(0), p.grad, **TOL)
    model = _TupleInPlace(True).to(DT)
    with pytest.raises(ShapeError, match="input of Linear 'a' was modified in place"):
        extract(model, loss_func, X, y, ("kflr",))
    assert _no_hooks(model) and all(p.grad is None for p in model.parameters())
