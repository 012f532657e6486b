"""``extract`` on the peers' own test settings, against independent references.

Every setting of ``tests/extraction/peer_cases.py`` (ported from BackPACK's and
curvlinops' test tables; each group names its source) runs with ``backend="auto"``
and, where ``auto`` takes the sweep, with ``backend="graph"``. Each quantity is
compared with dense float64 autograd, BackPACK's extensions on a deep copy and
curvlinops' ``KFACLinearOperator`` (``tests/extraction/peer_compare.py``).

Where curvkit and its peers agree on something that is not what one might expect,
the difference is listed in ``peer_compare.KNOWN_DIFFERENCES`` and asserted as such.
What curvkit refuses is listed below with the reason (:data:`EXPECTED_REFUSALS`,
:data:`KFRA_REFUSED`), and so are the Kronecker layers no peer gives a reference for
(:data:`UNCHECKED`): a silent change in either direction fails. A reference that
fails itself (BackPACK or curvlinops raising under the pinned versions, e.g.
BackPACK's float32 buffers in float64 pooling, curvlinops' binary-only BCE targets)
is the peer's failure: it is recorded by ``analysis/peer_coverage.py``, not held
against curvkit.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from curvkit.errors import UnsupportedModuleError
from tests.extraction import peer_compare
from tests.extraction.peer_cases import SETTINGS, PeerSetting
from tests.extraction.peer_compare import References, backends, run_setting

BY_ID = {s.id: s for s in SETTINGS}

ALL = (
    "batch_grad",
    "diag_ggn",
    "diag_ggn_mc",
    "kfac",
    "kflr+empirical/expand",
    "kflr+empirical/reduce",
    "cross",
)


def _module(kind: str, name: str) -> tuple:
    return (
        UnsupportedModuleError,
        f"cannot factor the parameters of {kind} '{name}'",
        "recurrent layers have no Kronecker factors or diagonals in curvkit",
    )


#: Settings curvkit refuses: ``id -> (error class, message fragment, reason, quantities)``.
EXPECTED_REFUSALS: dict[str, tuple] = {
    "bp1-rnn-ce": (*_module("RNN", "0"), ALL),
    "bp-rnn-mse": (*_module("RNN", "0"), ALL),
    "bp2-rnn-linear-ce": (*_module("RNN", "0"), ALL),
    "bp1-lstm-ce": (*_module("LSTM", "0"), ALL),
    "bp2-lstm-ce": (*_module("LSTM", "0"), ALL),
    "conv-TolstoiCharRNN": (*_module("LSTM", "lstm"), ALL),
    "conv-TolstoiRNNVersion": (*_module("RNN", "lstm"), ALL),
    "cl-batchnorm-train": (
        UnsupportedModuleError,
        "BatchNorm1d '1' normalises with the batch's statistics",
        "BatchNorm in train mode: examples interact, per-example quantities are undefined "
        "(kfac, kflr and cross factors stay defined)",
        ("batch_grad", "diag_ggn", "diag_ggn_mc", "kflr+empirical/expand", "kflr+empirical/reduce"),
    ),
}

#: Sweep settings whose chain has a conv/pooling layer: KFRA (sweep only) is defined for
#: chains of Linear layers and element-wise activations (Botev et al. 2017).
KFRA_REFUSED = {
    "act-ELU-bias0",
    "act-ELU-bias1",
    "act-LeakyReLU-bias0",
    "act-LeakyReLU-bias1",
    "act-LogSigmoid-bias0",
    "act-LogSigmoid-bias1",
    "act-ReLU-bias0",
    "act-ReLU-bias1",
    "act-SELU-bias0",
    "act-SELU-bias1",
    "act-Sigmoid-bias0",
    "act-Sigmoid-bias1",
    "act-Tanh-bias0",
    "act-Tanh-bias1",
    "cl-cnn",
    "cnn-Conv1d-2-3-2-2-0-2",
    "cnn-Conv1d-3-2-2",
    "cnn-Conv1d-3-2-2-2-1",
    "cnn-Conv1d-3-2-2-4-2-1-1-False",
    "cnn-Conv1d-3-6-2-4-2-3",
    "cnn-Conv2d-2-3-2-2-0-2",
    "cnn-Conv2d-3-2-2",
    "cnn-Conv2d-3-2-2-2-1",
    "cnn-Conv2d-3-2-2-4-2-1-1-False",
    "cnn-Conv2d-3-6-2-4-2-3",
    "hbp-n1-conv1d-single-output",
    "hbp-n1-conv2d-single-output",
    "pool-AvgPool1d-2-1",
    "pool-AvgPool1d-2-1-0-False",
    "pool-AvgPool1d-2-1-0-True",
    "pool-AvgPool2d-2-1",
    "pool-AvgPool2d-2-1-0-False",
    "pool-AvgPool2d-2-1-0-True",
    "pool-MaxPool1d-2-1",
    "pool-MaxPool1d-2-1-0-2",
    "pool-MaxPool1d-2-1-0-2-False-True",
    "pool-MaxPool2d-2-1",
    "pool-MaxPool2d-2-1-0-2",
    "pool-MaxPool2d-2-1-0-2-False-True",
}
_KFRA = (
    UnsupportedModuleError,
    "KFRA supports chains of Linear layers and element-wise activations",
    "KFRA: Linear/activation chains only",
    ("kfra",),
)

#: Kronecker layers without a full peer reference: ``id -> unchecked row detail``.
#: 3-D (transposed) convolutions: curvlinops' K-FAC has no 3-D convolution and none
#: of them reduces to ``Conv2d``; BackPACK's ``KFLR`` checks the product
#: ``G_reduce ⊗ A_expand`` where it runs (not on grouped ones, not behind 3-D pooling,
#: which it has no rule for). (``Conv1d``, grouped and transposed 1-D/2-D convolutions
#: are compared with curvlinops on ``Conv2d`` equivalents, ``Embedding`` on the
#: one-hot ``Linear``.)
_PART = "0 (BackPACK: G_reduce ⊗ A_expand only)"
UNCHECKED = {
    "cnn-Conv3d-2-3-2-2-0-2": _PART,
    "cnn-Conv3d-3-2-2": _PART,
    "cnn-Conv3d-3-2-2-3-2": _PART,
    "cnn-Conv3d-3-2-2-4-2-1-1-False": _PART,
    "cnn-Conv3d-3-6-2-4-2-3": _PART,
    "cnn-Conv3d-4-2-2-1-0-2-2": "0",
    "cnn-ConvTranspose3d-2-3-2-2-2-0-1-True-2": _PART,
    "cnn-ConvTranspose3d-3-2-2": _PART,
    "cnn-ConvTranspose3d-3-2-2-4-2-0-1-False": _PART,
    "cnn-ConvTranspose3d-4-2-(2, 2, 1)-2-2-0-2-True-2": "0",
    "hbp-n1-conv3d-single-output": _PART + ", 2 (BackPACK: G_reduce ⊗ A_expand only)",
    "hbp-n1-convt3d-single-output": _PART + ", 2 (BackPACK: G_reduce ⊗ A_expand only)",
    "pool-AvgPool3d-2-1": "0",
    "pool-AvgPool3d-2-1-0-False": "0",
    "pool-AvgPool3d-2-1-0-True": "0",
    "pool-MaxPool3d-2-1": "0",
    "pool-MaxPool3d-2-1-0-2": "0",
    "pool-MaxPool3d-2-1-0-2-False-True": "0",
}


def _expected(setting: PeerSetting, backend: str) -> dict[str, tuple]:
    """Quantity -> (error class, fragment) that ``setting`` must refuse on ``backend``."""
    out = {}
    if setting.id in EXPECTED_REFUSALS:
        err, fragment, _, quantities = EXPECTED_REFUSALS[setting.id]
        out |= {q: (err, fragment) for q in quantities}
    if setting.id in KFRA_REFUSED and backend == "auto":
        out["kfra"] = _KFRA[:2]
    return out


def _params():
    for s in SETTINGS:
        for b in backends(s):
            yield pytest.param(
                s.id, b, id=f"{s.id}-{b}", marks=[pytest.mark.slow] if s.slow else []
            )


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def test_tables_name_existing_settings():
    ids = set(BY_ID)
    assert set(EXPECTED_REFUSALS) <= ids
    assert KFRA_REFUSED <= ids
    assert set(UNCHECKED) <= ids


@pytest.mark.parametrize("sid,backend", list(_params()))
def test_peer_setting(sid, backend):
    setting = BY_ID[sid]
    rows = run_setting(setting, backend)
    refused = {r.quantity: r.detail for r in rows if r.status == "refused"}
    expected = _expected(setting, backend)
    assert set(refused) == set(expected), (
        f"refused {sorted(refused)}, expected {sorted(expected)}: {refused}"
    )
    for q, detail in refused.items():
        err, fragment = expected[q]
        assert detail.startswith(f"{err.__name__}:") and fragment in detail, (q, detail)
    bad = [r for r in rows if r.status in ("mismatch", "crash")]
    assert not bad, "\n".join(f"{r.quantity} vs {r.reference}: {r.status} {r.detail}" for r in bad)
    differs = {(sid, r.quantity) for r in rows if r.status == "differs"}
    assert differs == {k for k in peer_compare.KNOWN_DIFFERENCES if k[0] == sid}
    unchecked = {r.detail for r in rows if r.status == "unchecked"}
    assert unchecked == ({UNCHECKED[sid]} if sid in UNCHECKED else set()), unchecked
    # every quantity curvkit computed was compared with something that ran
    for q in ("batch_grad", "diag_ggn"):
        if q not in refused:
            assert any(
                r.quantity == q and r.status == "ok" and r.reference == "autograd" for r in rows
            )
    if "cross" not in refused:
        assert any(r.quantity == "cross" and r.status == "ok" for r in rows)


def test_comparison_detects_a_wrong_factor(monkeypatch):
    """The runner is not vacuous: a 1e-6 relative error in one factor is reported."""
    real = peer_compare.extract

    def off(*args, **kwargs):
        rec = real(*args, **kwargs)
        for layer in rec:
            layer.G = {k: v * (1 + 1e-6) for k, v in layer.G.items()}
            if layer.cross_A is not None:
                layer.cross_A = layer.cross_A * (1 + 1e-6)
            if layer.batch_grad is not None:
                layer.batch_grad = [g * (1 + 1e-6) for g in layer.batch_grad]
            if layer.diag_ggn is not None:
                layer.diag_ggn = [g * (1 + 1e-6) for g in layer.diag_ggn]
        return rec

    monkeypatch.setattr(peer_compare, "extract", off)
    setting = BY_ID["hbp-n1-sigmoid-ce"]
    rows = run_setting(setting, "auto", References(setting))
    wrong = {(r.quantity, r.reference) for r in rows if r.status == "mismatch"}
    for expected in [
        ("batch_grad", "autograd"),
        ("batch_grad", "backpack"),
        ("diag_ggn", "autograd"),
        ("diag_ggn", "backpack"),
        ("kflr/expand", "curvlinops"),
        ("kflr/expand", "autograd GGN"),
        ("kflr/backpack-kfc", "backpack"),
        ("kfra", "backpack"),
        ("cross", "loops"),
        ("cross", "autograd GGN"),
    ]:
        assert expected in wrong, (expected, sorted(wrong))


def test_models_are_left_untouched():
    """BackPACK and curvlinops run on deep copies: no hooks or BackPACK attributes remain."""
    setting = BY_ID["bp-sigmoid-mse-mean"]
    refs = References(setting)
    run_setting(setting, "auto", refs)
    for m in refs.model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
    for p in refs.model.parameters():
        assert not any(hasattr(p, a) for a in ("grad_batch", "diag_ggn_exact", "kflr", "kfra"))
    assert torch.is_tensor(refs.X)


@pytest.mark.slow
def test_batchnorm_train_kfac_agrees_with_curvlinops_mc_not_kflr():
    """The known difference is the peers' too: curvlinops' MC K-FAC matches our kfac there."""
    from curvlinops import KFACLinearOperator

    from curvkit.extraction import extract
    from tests.reference import kron_block

    refs = References(BY_ID["cl-batchnorm-train"])
    model, loss_func, X, y = refs.model, refs.loss_func, refs.X, refs.y
    first = model[0]
    M = 5000
    gen = torch.Generator().manual_seed(0)
    ours = extract(
        model, loss_func, X, y, ("kfac", "kflr"), mc_samples=M, generator=gen, separate_bias=True
    )[0]
    copy_ = copy.deepcopy(model)
    K = KFACLinearOperator(
        copy_, loss_func, [copy_[0].weight], [(X, y)], fisher_type="mc", mc_samples=M,
        separate_weight_and_bias=True, check_deterministic=False,
    )  # fmt: skip
    mc = K @ torch.eye(K.shape[0], dtype=torch.float64)
    kfac = kron_block(ours.G["kfac"], ours.A)
    kflr = kron_block(ours.G["kflr"], ours.A)
    assert first.weight.shape == (5, 10)
    assert float((kfac - mc).norm() / mc.norm()) < 0.1
    assert float((kflr - mc).norm() / mc.norm()) > 0.9  # kflr is far smaller there


@pytest.mark.parametrize("sid", ["cl-ce-mean", "cl-ce-sum", "cl-mse-mean", "bp-bce-soft-mean"])
def test_shared_root_ggn_is_the_ggn_on_outputs_without_positions(sid):
    """With one position per example the shared square root loses nothing: the exact GGN."""
    refs = References(BY_ID[sid])
    m, X = refs._tensor_model()
    shared = peer_compare._shared_root_ggn(m, refs.loss_func, X, refs.y)
    ggn, failure = refs.ggn()
    assert failure is None
    assert peer_compare._close(shared, ggn) is None


@pytest.mark.parametrize("sid", ["bp1-bn1d", "bp-multi-d-ce", "cl-weightshare-ce-mean"])
def test_whole_output_ggn_and_shared_root_differ_with_positions(sid):
    """Both references of outputs with positions are symmetric; they differ by cross terms.

    The whole-output GGN is the sum over positions of the per-position GGNs; the shared
    root adds the cross terms between positions (docs/conventions.md).
    """
    refs = References(BY_ID[sid])
    assert refs.extra_axes
    m, X = refs._tensor_model()
    whole = peer_compare._dense_ggn_whole_output(m, refs.loss_func, X, refs.y)
    shared = peer_compare._shared_root_ggn(m, refs.loss_func, X, refs.y)
    for M in (whole, shared):
        assert peer_compare._close(M, M.T) is None
        assert float(torch.linalg.eigvalsh(M).min()) > -1e-10 * float(M.abs().max())
    assert float((whole - shared).norm() / whole.norm()) > 1e-3


@pytest.mark.parametrize(
    "sid,scale",
    [
        ("cl-weightshare-ce-mean", 5.0),  # CE [N, C, T] = [3, 3, 5], "mean": T
        ("cl-weightshare-ce-sum", 1.0),
        ("cl-mse-seq-mean", 15.0),  # MSE [N, T, C] = [2, 5, 3], "mean": T·C
        ("cl-bce-seq-mean", 10.0),  # BCE [N, T, C] = [3, 5, 2], "mean": T·C
        ("cl-mse-seq-sum", 1.0),
        ("cl-ws-conv2d-expand-mean", 162.0),  # MSE [2, 9, 9, 2]: T·C = 81·2
        ("cl-mse-mean", None),  # [N, C]: C
        ("cl-ce-mean", 1.0),
    ],
)
def test_curvlinops_empirical_scale(sid, scale):
    """curvlinops' empirical K-FAC over ours (docs/conventions.md), asserted where compared."""
    refs = References(BY_ID[sid])
    expected = float(refs.out_shape[1]) if scale is None else scale
    assert refs.empirical_scale() == expected
    rows = run_setting(BY_ID[sid], "auto", refs)
    assert any(
        r.quantity == "empirical/expand" and r.reference == "curvlinops" and r.status == "ok"
        for r in rows
    )
