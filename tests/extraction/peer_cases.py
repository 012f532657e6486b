"""The peers' own test settings (BackPACK, curvlinops), ported to plain float64 constructors.

BackPACK and curvlinops test their extensions/operators on tables of small settings
(model constructor, input shape, loss, reduction, targets). The settings below are
copied from those tables so that curvkit's extraction is exercised the way the peers
exercise themselves; every group names the repository and file it comes from. They
are ported, not imported: nothing here reads the peers' test suites at run time.

Differences to the originals (all deliberate and small):

- everything is float64 and seeded per setting (``seed``, default 0);
- curvlinops settings with several batches keep the first batch;
- a few settings the peers build with ``torchvision`` (``resnet18``,
  ``wide_resnet50_2``, BackPACK's ``ResNet2``, which uses ``torchvision``'s
  ``BasicBlock``) and curvlinops' functional (non-``nn.Module``) model are not ported,
  see :data:`NOT_PORTED`;
- BackPACK's parameter-free custom modules (``Parallel``, ``Pad``, ``Slicing``,
  ``Permute``, ``ReduceTuple``, ``ScaleModule``) are used from the installed
  ``backpack`` package, as the peer's settings do.

Each setting is a :class:`PeerSetting`; :func:`build` returns ``(model, loss_func, X, y)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from backpack.custom_module.branching import Parallel
from backpack.custom_module.pad import Pad
from backpack.custom_module.permute import Permute
from backpack.custom_module.reduce_tuple import ReduceTuple
from backpack.custom_module.scale_module import ScaleModule
from backpack.custom_module.slicing import Slicing
from torch import Tensor, nn, rand, randint

DT = torch.float64

BP_FIRST = "f-dangel/backpack test/extensions/firstorder/firstorder_settings.py"
BP_SECOND = "f-dangel/backpack test/extensions/secondorder/secondorder_settings.py"
BP_DIAG_GGN = "f-dangel/backpack test/extensions/secondorder/diag_ggn/diag_ggn_settings.py"
BP_HBP = "f-dangel/backpack test/extensions/secondorder/hbp/kfac_settings.py"
BP_AUTO = "f-dangel/backpack test/extensions/automated_settings.py"
BP_CONVERTER = "f-dangel/backpack test/converter/converter_cases.py"
BP_RESNET = "f-dangel/backpack test/converter/resnet_cases.py"
CL_CASES = "f-dangel/curvlinops test/cases.py"
CL_KFAC = "f-dangel/curvlinops test/kfac_cases.py"


@dataclass(frozen=True)
class PeerSetting:
    """One ported setting.

    Attributes:
        id: Unique name (used as the pytest id).
        source: ``"owner/repo path"`` of the peer's file the setting comes from.
        make: Builds ``(model, loss_func, X, y)`` (called after seeding; any dtype).
        seed: ``torch.manual_seed`` before ``make`` (the peers' ``"seed"`` entry).
        kflr_exact: ``G ⊗ A`` of ``kflr`` (and ``empirical``) must equal the exact
            GGN (empirical Fisher) block of every ``Linear`` layer: the peers'
            exactness settings (one example, or a deep linear network with MSE).
        slow: Too large for the quick test run (marked ``slow``).
    """

    id: str
    source: str
    make: Callable[[], tuple]
    seed: int = 0
    kflr_exact: bool = False
    slow: bool = False


def build(setting: PeerSetting) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """``(model, loss_func, X, y)`` of ``setting`` in float64 (inputs/targets as the peer draws).

    The global random state is left as it was (``torch.random.fork_rng``).
    """
    with torch.random.fork_rng():
        torch.manual_seed(setting.seed)
        model, loss_func, X, y = setting.make()
    model = model.to(DT)
    X = _to_dt(X)
    y = y.to(DT) if y.is_floating_point() else y
    return model, loss_func, X, y


def _to_dt(X):
    if isinstance(X, Tensor):
        return X.to(DT) if X.is_floating_point() else X
    return {k: _to_dt(v) for k, v in X.items()}


def classification_targets(size, num_classes):
    """As in both peers' ``test/.../utils.py``: uniform class indices."""
    return randint(0, num_classes, size)


def regression_targets(size):
    """As in both peers' ``test/.../utils.py``: ``rand(*size)``."""
    return rand(*size)


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _eval_init(module: nn.Module) -> nn.Module:
    """BackPACK's ``initialize_training_false_recursive``: random BN statistics, eval mode."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean = rand(m.running_mean.shape)
            m.running_var = rand(m.running_var.shape)
            m.weight.data = rand(m.weight.shape)
            m.bias.data = rand(m.bias.shape)
    return module.train(False)


def _out_dim(make_module: Callable[[], nn.Module], input_size) -> int:
    """Features per example after ``make_module()`` (built without touching the global RNG)."""
    with torch.random.fork_rng(), torch.no_grad():
        out = make_module()(torch.zeros(input_size))
    return out.numel() // out.shape[0]


# -- BackPACK's automated CNN settings (test/extensions/automated_settings.py) ----------


def simple_cnn(input_size, conv_cls, conv_params, slow=False) -> PeerSetting:
    """``make_simple_cnn_setting``: conv, ReLU, Flatten, a frozen Linear(·, 5); CE sum."""
    dim = _out_dim(lambda: conv_cls(*conv_params), input_size)

    def make():
        model = nn.Sequential(
            conv_cls(*conv_params), nn.ReLU(), nn.Flatten(), _frozen(nn.Linear(dim, 5))
        )
        X = rand(input_size)
        return model, nn.CrossEntropyLoss(reduction="sum"), X, classification_targets((3,), 5)

    tag = "-".join(str(p) for p in conv_params)
    return PeerSetting(f"cnn-{conv_cls.__name__}-{tag}", BP_AUTO, make, slow=slow)


def simple_act(act_cls, bias: bool) -> PeerSetting:
    """``make_simple_act_setting``: Conv2d(3, 2, 2), activation, frozen Linear(72, 5); CE mean."""

    def make():
        model = nn.Sequential(
            nn.Conv2d(3, 2, 2, bias=bias), act_cls(), nn.Flatten(), _frozen(nn.Linear(72, 5))
        )
        return model, nn.CrossEntropyLoss(), rand(3, 3, 7, 7), classification_targets((3,), 5)

    return PeerSetting(f"act-{act_cls.__name__}-bias{int(bias)}", BP_AUTO, make)


def simple_pool(input_size, conv_cls, pool_cls, pool_params, slow=False) -> PeerSetting:
    """``make_simple_pooling_setting``: conv(3, 2, 2), ReLU, pooling, frozen Linear; CE sum."""
    dim = _out_dim(lambda: nn.Sequential(conv_cls(3, 2, 2), pool_cls(*pool_params)), input_size)

    def make():
        model = nn.Sequential(
            conv_cls(3, 2, 2),
            nn.ReLU(),
            pool_cls(*pool_params),
            nn.Flatten(),
            _frozen(nn.Linear(dim, 5)),
        )
        X = rand(input_size)
        return model, nn.CrossEntropyLoss(reduction="sum"), X, classification_targets((3,), 5)

    tag = "-".join(str(p) for p in pool_params)
    return PeerSetting(f"pool-{pool_cls.__name__}-{tag}", BP_AUTO, make, slow=slow)


def _s(id, source, model_fn, loss_fn, X_fn, y_fn, **kw) -> PeerSetting:
    return PeerSetting(id, source, lambda: (model_fn(), loss_fn(), X_fn(), y_fn()), **kw)


Seq, Lin, CE, MSE, BCE = (
    nn.Sequential,
    nn.Linear,
    nn.CrossEntropyLoss,
    nn.MSELoss,
    nn.BCEWithLogitsLoss,
)
ct, rt = classification_targets, regression_targets

SETTINGS: list[PeerSetting] = []

# -- BackPACK: Linear settings shared by first- and second-order extensions -------------
# f-dangel/backpack test/extensions/firstorder/firstorder_settings.py and
# test/extensions/secondorder/secondorder_settings.py (identical entries).
SETTINGS += [
    _s("bp-example", BP_FIRST, lambda: Seq(Lin(10, 5)), lambda: CE(reduction="sum"),
       lambda: rand(3, 10), lambda: ct((3,), 5)),
    _s("bp-linear-linear-ce-mean", BP_FIRST, lambda: Seq(Lin(10, 7), Lin(7, 5)),
       lambda: CE(reduction="mean"), lambda: rand(3, 10), lambda: ct((3,), 5)),
    _s("bp-relu-ce-sum", BP_FIRST, lambda: Seq(Lin(10, 7), nn.ReLU(), Lin(7, 5)),
       lambda: CE(reduction="sum"), lambda: rand(3, 10), lambda: ct((3,), 5)),
    _s("bp-sigmoid-mse-mean", BP_FIRST, lambda: Seq(Lin(10, 7), nn.Sigmoid(), Lin(7, 5)),
       lambda: MSE(reduction="mean"), lambda: rand(3, 10), lambda: rt((3, 5))),
]  # fmt: skip

# -- BackPACK: Linear with additional dimensions ----------------------------------------
# f-dangel/backpack test/extensions/firstorder/firstorder_settings.py (regression outputs
# keep the extra dimensions) and secondorder_settings.py LINEAR_ADDITIONAL_DIMENSIONS_SETTINGS
# (outputs flattened).
SETTINGS += [
    _s("bp1-one-additional-mse", BP_FIRST, lambda: Seq(Lin(5, 3), Lin(3, 2)),
       lambda: MSE(reduction="mean"), lambda: rand(3, 4, 5), lambda: rt((3, 4, 2))),
    _s("bp1-two-additional-mse", BP_FIRST, lambda: Seq(Lin(5, 3), nn.Sigmoid(), Lin(3, 2)),
       lambda: MSE(reduction="mean"), lambda: rand(3, 4, 2, 5), lambda: rt((3, 4, 2, 2))),
    _s("bp1-three-additional-mse-sum", BP_FIRST, lambda: Seq(Lin(5, 3), Lin(3, 2)),
       lambda: MSE(reduction="sum"), lambda: rand(3, 4, 2, 3, 5), lambda: rt((3, 4, 2, 3, 2))),
    _s("bp-one-additional-ce", BP_FIRST, lambda: Seq(Lin(5, 3), Lin(3, 2), nn.Flatten()),
       lambda: CE(reduction="mean"), lambda: rand(3, 4, 5), lambda: ct((3,), 8)),
    _s("bp-two-additional-ce", BP_FIRST,
       lambda: Seq(Lin(5, 3), nn.Sigmoid(), Lin(3, 2), nn.Flatten()),
       lambda: CE(reduction="mean"), lambda: rand(3, 4, 2, 5), lambda: ct((3,), 16)),
    _s("bp-three-additional-ce-sum", BP_FIRST,
       lambda: Seq(Lin(5, 3), nn.ReLU(), Lin(3, 2), nn.Flatten()),
       lambda: CE(reduction="sum"), lambda: rand(3, 4, 2, 3, 5), lambda: ct((3,), 48)),
    _s("bp2-one-additional-mse", BP_SECOND, lambda: Seq(Lin(5, 3), Lin(3, 2), nn.Flatten()),
       lambda: MSE(reduction="mean"), lambda: rand(3, 4, 5), lambda: rt((3, 8))),
    _s("bp2-two-additional-mse", BP_SECOND,
       lambda: Seq(Lin(5, 3), nn.Sigmoid(), Lin(3, 2), nn.Flatten()),
       lambda: MSE(reduction="mean"), lambda: rand(3, 4, 2, 5), lambda: rt((3, 16))),
    _s("bp2-three-additional-mse-sum", BP_SECOND,
       lambda: Seq(Lin(5, 3), Lin(3, 2), nn.Flatten()),
       lambda: MSE(reduction="sum"), lambda: rand(3, 4, 2, 3, 5), lambda: rt((3, 48))),
    # secondorder_settings.py: "multi-d-CrossEntropyLoss"
    _s("bp-multi-d-ce", BP_SECOND, lambda: Seq(Lin(5, 3), nn.ReLU(), Lin(3, 2)),
       lambda: CE(reduction="sum"), lambda: rand(3, 4, 2, 3, 5), lambda: ct((3, 2, 3, 2), 4)),
]  # fmt: skip

# -- BackPACK: convolutions (firstorder_settings.py and secondorder_settings.py) --------
C1, C2, C3 = nn.Conv1d, nn.Conv2d, nn.Conv3d
T1, T2, T3 = nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d
SETTINGS += [
    simple_cnn((3, 3, 7), C1, (3, 2, 2)),
    simple_cnn((3, 2, 7), C1, (2, 3, 2, 2, 0, 2)),
    simple_cnn((3, 3, 7), C1, (3, 2, 2, 2, 1)),
    simple_cnn((3, 3, 8), C1, (3, 6, 2, 4, 2, 3)),
    simple_cnn((3, 3, 7), C1, (3, 2, 2, 4, 2, 1, 1, False)),
    simple_cnn((3, 3, 7, 7), C2, (3, 2, 2)),
    simple_cnn((3, 2, 7, 7), C2, (2, 3, 2, 2, 0, 2)),
    simple_cnn((3, 3, 7, 7), C2, (3, 2, 2, 2, 1)),
    simple_cnn((3, 3, 8, 8), C2, (3, 6, 2, 4, 2, 3)),
    simple_cnn((3, 3, 7, 7), C2, (3, 2, 2, 4, 2, 1, 1, False)),
    simple_cnn((3, 3, 2, 7, 7), C3, (3, 2, 2), slow=True),
    simple_cnn((3, 2, 3, 7, 7), C3, (2, 3, 2, 2, 0, 2), slow=True),
    simple_cnn((3, 3, 2, 7, 7), C3, (3, 2, 2, 3, 2), slow=True),
    simple_cnn((3, 3, 4, 8, 8), C3, (3, 6, 2, 4, 2, 3), slow=True),
    simple_cnn((3, 3, 2, 7, 7), C3, (3, 2, 2, 4, 2, 1, 1, False)),
    simple_cnn((3, 3, 7), T1, (3, 2, 2)),
    simple_cnn((3, 2, 7), T1, (2, 3, 2, 2, 0, 0, 1, True, 2)),
    simple_cnn((3, 3, 7), T1, (3, 2, 2, 2, 1)),
    simple_cnn((3, 3, 8), T1, (3, 6, 2, 4, 2, 0, 1, True, 3)),
    simple_cnn((3, 3, 7), T1, (3, 2, 2, 4, 2, 0, 1, False)),
    simple_cnn((3, 3, 7, 7), T2, (3, 2, 2), slow=True),
    simple_cnn((3, 2, 9, 9), T2, (2, 4, 2, 1, 0, 0, 1, True, 2), slow=True),
    simple_cnn((3, 3, 7, 7), T2, (3, 2, 2, 2, 1)),
    simple_cnn((3, 3, 7, 7), T2, (3, 2, 2, 4, 2, 0, 1, False)),
    simple_cnn((3, 3, 2, 7, 7), T3, (3, 2, 2), slow=True),
    simple_cnn((3, 2, 3, 5, 5), T3, (2, 3, 2, 2, 2, 0, 1, True, 2), slow=True),
    simple_cnn((3, 3, 2, 7, 7), T3, (3, 2, 2, 4, 2, 0, 1, False), slow=True),
]
# secondorder_settings.py: GROUP_CONV_SETTINGS (KFAC/KFLR/KFRA list them as not supported)
SETTINGS += [
    simple_cnn((3, 6, 7), C1, (6, 4, 2, 1, 0, 1, 2)),
    simple_cnn((3, 6, 7, 5), C2, (6, 3, 2, 1, 0, 1, 3)),
    simple_cnn((3, 4, 7, 5, 6), C3, (4, 2, 2, 1, 0, 2, 2), slow=True),
    simple_cnn((3, 6, 8), T1, (6, 3, 2, 4, 2, 0, 3, True, 3)),
    simple_cnn((3, 4, 9, 9), T2, (4, 2, 2, 1, 0, 0, 2, True, 2), slow=True),
    simple_cnn((3, 4, 3, 5, 5), T3, (4, 2, (2, 2, 1), 2, 2, 0, 2, True, 2), slow=True),
]

# -- BackPACK: activations and pooling (secondorder_settings.py) ------------------------
SETTINGS += [
    simple_act(act, bias)
    for act in (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.LogSigmoid, nn.ELU, nn.SELU)
    for bias in (True, False)
]
SETTINGS += [
    simple_pool((3, 3, 7), C1, nn.MaxPool1d, (2, 1)),
    simple_pool((3, 3, 7), C1, nn.MaxPool1d, (2, 1, 0, 2)),
    simple_pool((3, 3, 7), C1, nn.MaxPool1d, (2, 1, 0, 2, False, True)),
    simple_pool((3, 3, 11, 11), C2, nn.MaxPool2d, (2, 1)),
    simple_pool((3, 3, 7, 7), C2, nn.MaxPool2d, (2, 1, 0, 2)),
    simple_pool((3, 3, 7, 7), C2, nn.MaxPool2d, (2, 1, 0, 2, False, True)),
    simple_pool((3, 3, 7, 7, 7), C3, nn.MaxPool3d, (2, 1), slow=True),
    simple_pool((3, 3, 7, 7, 7), C3, nn.MaxPool3d, (2, 1, 0, 2), slow=True),
    simple_pool((3, 3, 7, 7, 7), C3, nn.MaxPool3d, (2, 1, 0, 2, False, True), slow=True),
    simple_pool((3, 3, 7), C1, nn.AvgPool1d, (2, 1)),
    simple_pool((3, 3, 7), C1, nn.AvgPool1d, (2, 1, 0, True)),
    simple_pool((3, 3, 7), C1, nn.AvgPool1d, (2, 1, 0, False)),
    simple_pool((3, 3, 11, 11), C2, nn.AvgPool2d, (2, 1)),
    simple_pool((3, 3, 7, 7), C2, nn.AvgPool2d, (2, 1, 0, True)),
    simple_pool((3, 3, 7, 7), C2, nn.AvgPool2d, (2, 1, 0, False)),
    simple_pool((3, 3, 7, 7, 7), C3, nn.AvgPool3d, (2, 1), slow=True),
    simple_pool((3, 3, 7, 7, 7), C3, nn.AvgPool3d, (2, 1, 0, True), slow=True),
    simple_pool((3, 3, 7, 7, 7), C3, nn.AvgPool3d, (2, 1, 0, False), slow=True),
]

# -- BackPACK: custom Pad / Slicing modules and BCEWithLogitsLoss (secondorder_settings.py)
SETTINGS += [
    _s("bp-pad-constant0", BP_SECOND,
       lambda: Seq(C2(3, 2, 2), Pad((1, 1, 0, 2), mode="constant", value=0.0),
                   C2(2, 2, 3, stride=2), nn.Flatten(), Lin(8, 2)),
       lambda: MSE(reduction="mean"), lambda: rand(5, 3, 4, 4), lambda: rt((5, 2))),
    _s("bp-pad-constant1", BP_SECOND,
       lambda: Seq(C2(3, 2, 3, padding=1), nn.ReLU(),
                   Pad((1, 1, 2, 0, 1, 2), mode="constant", value=1.0),
                   C2(5, 2, 3, stride=2), nn.ReLU(), nn.Flatten(), Lin(8, 3)),
       lambda: CE(reduction="mean"), lambda: rand(5, 3, 4, 4), lambda: ct((5,), 3)),
    _s("bp-slicing-1", BP_SECOND,
       lambda: Seq(C2(3, 2, 2, padding=1),
                   Slicing((slice(None), 0, slice(None, None, 2), slice(0, 2))),
                   nn.ReLU(), nn.Flatten(), Lin(6, 4)),
       lambda: CE(reduction="mean"), lambda: rand(3, 3, 4, 5), lambda: ct((3,), 4)),
    _s("bp-slicing-2", BP_SECOND,
       lambda: Seq(C2(3, 2, 2, padding=1), Slicing((slice(None), slice(None), 2)), nn.ReLU(),
                   Slicing((slice(None), 1)), Lin(6, 4)),
       lambda: MSE(reduction="mean"), lambda: rand(3, 3, 4, 5), lambda: rt((3, 4))),
    _s("bp-bce-soft-mean", BP_SECOND, lambda: Seq(Lin(6, 4), nn.ReLU(), Lin(4, 1)),
       lambda: BCE(reduction="mean"), lambda: rand(3, 6), lambda: rand(3, 1)),
    _s("bp-bce-binary-sum", BP_SECOND, lambda: Seq(Lin(6, 4), nn.ReLU(), Lin(4, 1)),
       lambda: BCE(reduction="sum"), lambda: rand(3, 6), lambda: ct((3, 1), 2).double()),
]  # fmt: skip

# -- BackPACK: BatchNorm (eval), RNN/LSTM, Embedding (firstorder_settings.py) -----------
SETTINGS += [
    _s("bp1-bn1d", BP_FIRST, lambda: _eval_init(nn.BatchNorm1d(3)), lambda: CE(),
       lambda: rand(2, 3, 4), lambda: ct((2, 4), 3)),
    _s("bp1-bn2d", BP_FIRST, lambda: _eval_init(nn.BatchNorm2d(2)), lambda: CE(),
       lambda: rand(3, 2, 4, 3), lambda: ct((3, 4, 3), 2)),
    _s("bp1-bn3d", BP_FIRST, lambda: _eval_init(nn.BatchNorm3d(3)), lambda: CE(),
       lambda: rand(3, 3, 4, 1, 2), lambda: ct((3, 4, 1, 2), 3)),
    _s("bp1-bn3d-linear", BP_FIRST,
       lambda: _eval_init(Seq(nn.BatchNorm3d(3), Lin(2, 3), nn.BatchNorm3d(3), nn.ReLU(),
                              nn.BatchNorm3d(3))),
       lambda: CE(), lambda: rand(3, 3, 4, 1, 2), lambda: ct((3, 4, 1, 3), 3)),
    _s("bp1-rnn-ce", BP_FIRST,
       lambda: Seq(nn.RNN(6, 3, batch_first=True), ReduceTuple(index=0), Permute(0, 2, 1)),
       lambda: CE(), lambda: rand(8, 5, 6), lambda: ct((8, 5), 3)),
    _s("bp-rnn-mse", BP_FIRST,
       lambda: Seq(nn.RNN(6, 3, batch_first=True), ReduceTuple(index=0), Permute(0, 2, 1),
                   nn.Flatten()),
       lambda: MSE(), lambda: rand(8, 5, 6), lambda: rt((8, 15))),
    _s("bp1-lstm-ce", BP_FIRST,
       lambda: Seq(nn.LSTM(3, 4, batch_first=True), ReduceTuple(index=0), nn.Flatten()),
       lambda: CE(), lambda: rand(4, 5, 3), lambda: ct((4,), 20)),
    _s("bp-embedding-linear", BP_FIRST, lambda: Seq(nn.Embedding(5, 3), Lin(3, 4)),
       lambda: CE(), lambda: randint(0, 5, (6,)), lambda: ct((6,), 4)),
    _s("bp1-embedding-flatten", BP_FIRST, lambda: Seq(nn.Embedding(3, 5), nn.Flatten()),
       lambda: CE(), lambda: randint(0, 3, (4, 2, 2)), lambda: ct((4,), 10)),
]  # fmt: skip

# -- BackPACK: DiagGGN local settings (diag_ggn_settings.py) ----------------------------
SETTINGS += [
    _s("bp2-lstm-ce", BP_DIAG_GGN,
       lambda: Seq(nn.LSTM(5, 4, batch_first=True), ReduceTuple(index=0), nn.Flatten()),
       lambda: CE(), lambda: rand(4, 3, 5), lambda: ct((4,), 12)),
    _s("bp2-rnn-linear-ce", BP_DIAG_GGN,
       lambda: Seq(nn.RNN(6, 3, batch_first=True), ReduceTuple(index=0), Lin(3, 3),
                   Permute(0, 2, 1)),
       lambda: CE(), lambda: rand(8, 5, 6), lambda: ct((8, 5), 3)),
    _s("bp-adaptive-avg-pool1d", BP_DIAG_GGN,
       lambda: Seq(Lin(9, 9), nn.AdaptiveAvgPool1d((3,)), nn.Flatten()),
       lambda: MSE(), lambda: rand(2, 2, 9), lambda: rt((2, 6))),
    _s("bp-adaptive-avg-pool2d", BP_DIAG_GGN,
       lambda: Seq(Lin(8, 8), nn.AdaptiveAvgPool2d((3, 4)), nn.Flatten()),
       lambda: MSE(), lambda: rand(2, 2, 6, 8), lambda: rt((2, 24))),
    _s("bp-adaptive-avg-pool3d", BP_DIAG_GGN,
       lambda: Seq(Lin(4, 4), nn.AdaptiveAvgPool3d((3, 5, 2)), nn.Flatten()),
       lambda: MSE(), lambda: rand(2, 2, 9, 5, 4), lambda: rt((2, 60))),
    _s("bp2-bn1d", BP_DIAG_GGN, lambda: _eval_init(Seq(nn.BatchNorm1d(3), nn.Flatten())),
       lambda: MSE(), lambda: rand(2, 3, 4), lambda: rt((2, 12))),
    _s("bp2-bn2d", BP_DIAG_GGN, lambda: _eval_init(Seq(nn.BatchNorm2d(2), nn.Flatten())),
       lambda: MSE(), lambda: rand(3, 2, 4, 3), lambda: rt((3, 24))),
    _s("bp2-bn3d", BP_DIAG_GGN, lambda: _eval_init(Seq(nn.BatchNorm3d(3), nn.Flatten())),
       lambda: MSE(), lambda: rand(3, 3, 4, 1, 2), lambda: rt((3, 24))),
    _s("bp2-bn3d-linear", BP_DIAG_GGN,
       lambda: _eval_init(Seq(nn.BatchNorm3d(3), Lin(2, 3), nn.BatchNorm3d(3), nn.ReLU(),
                              nn.BatchNorm3d(3), nn.Flatten())),
       lambda: MSE(), lambda: rand(3, 3, 4, 1, 2), lambda: rt((3, 36))),
    _s("bp2-embedding-flatten", BP_DIAG_GGN, lambda: Seq(nn.Embedding(3, 2), nn.Flatten()),
       lambda: CE(), lambda: randint(0, 3, (3, 2, 2)), lambda: ct((3,), 4), seed=2),
    _s("bp-branching-linear", BP_DIAG_GGN,
       lambda: Seq(Lin(10, 5), nn.ReLU(), Parallel(nn.Identity(), Lin(5, 5)), nn.Sigmoid(),
                   Lin(5, 4)),
       lambda: CE(), lambda: rand(3, 10), lambda: ct((3,), 4)),
    _s("bp-branching-conv", BP_DIAG_GGN,
       lambda: Seq(C2(3, 2, 3, padding=1), nn.ReLU(),
                   Parallel(nn.Identity(), Seq(C2(2, 4, 3, padding=1), nn.ReLU(),
                                               C2(4, 2, 3, padding=1))),
                   nn.MaxPool2d(3, stride=2), nn.Flatten(), Lin(8, 5)),
       lambda: CE(), lambda: rand(4, 3, 6, 6), lambda: ct((4,), 5)),
]  # fmt: skip


class ResNet1(nn.Module):
    """BackPACK's ``ResNet1`` (test/converter/resnet_cases.py): an Euler step ``x + f(x) / 10``."""

    def __init__(self, in_dim: int = 2, out_dim: int = 10):
        super().__init__()
        self.net = Seq(Lin(in_dim, out_dim), nn.Tanh(), Lin(out_dim, out_dim), nn.Tanh(),
                       Lin(out_dim, in_dim))  # fmt: skip

    def forward(self, x):
        return x + self.net(x) * 0.1


SETTINGS += [
    _s("bp-resnet1", BP_RESNET, ResNet1, MSE, lambda: torch.tensor([[1.0, 2.0]]),
       lambda: torch.tensor([[1.0, 1.0]]), kflr_exact=True),
]  # fmt: skip

# -- BackPACK: KFAC/KFLR/KFRA batch-size-1 settings (hbp/kfac_settings.py) --------------
# The peer checks K-FAC-type factors there against the exact GGN blocks.
SETTINGS += [
    _s("hbp-n1-relu-mse", BP_HBP, lambda: Seq(Lin(7, 3), nn.ReLU(), Lin(3, 1)),
       lambda: MSE(reduction="mean"), lambda: rand(1, 7), lambda: rt((1, 1)), kflr_exact=True),
    _s("hbp-n1-sigmoid-ce", BP_HBP, lambda: Seq(Lin(5, 4), nn.Sigmoid(), Lin(4, 3)),
       lambda: CE(reduction="mean"), lambda: rand(1, 5), lambda: ct((1,), 3), kflr_exact=True),
    _s("hbp-n1-bce-soft", BP_HBP, lambda: Seq(Lin(6, 4), nn.ReLU(), Lin(4, 1)),
       lambda: BCE(reduction="mean"), lambda: rand(1, 6), lambda: rand(1, 1), kflr_exact=True),
    _s("hbp-n1-bce-binary", BP_HBP, lambda: Seq(Lin(6, 4), nn.ReLU(), Lin(4, 1)),
       lambda: BCE(reduction="sum"), lambda: rand(1, 6), lambda: ct((1, 1), 2).double(),
       kflr_exact=True),
    _s("hbp-n1-conv1d-single-output", BP_HBP,
       lambda: Seq(C1(2, 4, 4), nn.ReLU(), C1(4, 1, 1), nn.Flatten()),
       lambda: MSE(reduction="mean"), lambda: rand(1, 2, 4), lambda: rt((1, 1))),
    _s("hbp-n1-conv2d-single-output", BP_HBP,
       lambda: Seq(C2(2, 4, 3), nn.ReLU(), C2(4, 1, 1), nn.Flatten()),
       lambda: MSE(reduction="mean"), lambda: rand(1, 2, 3, 3), lambda: rt((1, 1))),
    _s("hbp-n1-conv3d-single-output", BP_HBP,
       lambda: Seq(C3(2, 3, 3), nn.ReLU(), C3(3, 1, 1), nn.Flatten()),
       lambda: MSE(reduction="mean"), lambda: rand(1, 2, 3, 3, 3), lambda: rt((1, 1))),
    _s("hbp-n1-convt1d-single-output", BP_HBP,
       lambda: Seq(T1(2, 4, 3, padding=5), nn.Sigmoid(), T1(4, 1, 1), nn.Flatten()),
       lambda: MSE(reduction="mean"), lambda: rand(1, 2, 9), lambda: rt((1, 1))),
    _s("hbp-n1-convt2d-single-output", BP_HBP,
       lambda: Seq(T2(2, 3, 2, padding=2), nn.Sigmoid(), T2(3, 1, 1), nn.Flatten()),
       lambda: MSE(reduction="mean"), lambda: rand(1, 2, 4, 4), lambda: rt((1, 1))),
    _s("hbp-n1-convt3d-single-output", BP_HBP,
       lambda: Seq(T3(2, 4, 2, padding=3), nn.Sigmoid(), T3(4, 1, 1), nn.Flatten()),
       lambda: MSE(reduction="mean"), lambda: rand(1, 2, 6, 6, 6), lambda: rt((1, 1))),
    _s("hbp-n1-branching-linear", BP_HBP,
       lambda: Seq(Lin(10, 5), nn.ReLU(), Parallel(nn.Identity(), Lin(5, 5)), nn.Sigmoid(),
                   Lin(5, 4)),
       lambda: CE(), lambda: rand(1, 10), lambda: ct((1,), 4), kflr_exact=True),
    _s("hbp-n1-branching-scalar", BP_HBP,
       lambda: Seq(Lin(10, 5), nn.ReLU(), Parallel(ScaleModule(weight=3.0), Lin(5, 5)),
                   nn.Sigmoid(), Lin(5, 4)),
       lambda: CE(), lambda: rand(1, 10), lambda: ct((1,), 4), kflr_exact=True),
]  # fmt: skip


# -- BackPACK: converter cases (test/converter/converter_cases.py) -----------------------
class InplaceActivation(nn.Module):
    """``_InplaceActivation``."""

    def __init__(self):
        super().__init__()
        self.linear, self.relu, self.linear2 = Lin(3, 2), nn.ReLU(inplace=True), Lin(2, 2)

    def forward(self, x):
        return self.linear2(self.relu(self.linear(x)))


class MultipleUsages(nn.Module):
    """``_MultipleUsages``: one ReLU module called three times."""

    def __init__(self):
        super().__init__()
        self.linear, self.relu, self.linear2 = Lin(3, 2), nn.ReLU(), Lin(2, 2)

    def forward(self, x):
        return self.relu(self.linear2(self.relu(self.linear(self.relu(x)))))


class FlattenNetwork(nn.Module):
    """``_FlattenNetwork``: a Linear on ``[N, 2, 2, 4]``, torch.flatten, a Linear, flatten."""

    def __init__(self):
        super().__init__()
        self.linear, self.linear2 = Lin(4, 3), Lin(2 * 3, 3)

    def forward(self, x):
        x = torch.flatten(self.linear(x), 2)
        return self.linear2(x).flatten(1)


class Multiply(nn.Module):
    """``_Multiply``: scalar products around a Linear."""

    def __init__(self):
        super().__init__()
        self.linear = Lin(4, 3)

    def forward(self, x):
        return (0.5 * self.linear(x * 2.5)).multiply(3.1415)


class Add(nn.Module):
    """``_Add``: two Linear branches added."""

    def __init__(self):
        super().__init__()
        self.linear, self.linear1, self.linear2 = Lin(3, 3), Lin(3, 2), Lin(3, 2)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.linear(x)
        x1, x2 = self.linear1(x), self.linear2(x)
        return self.relu(x1 + x2).add(x2)


class PermuteNet(nn.Module):
    """``_Permute``: Linear on the last axis, permute, Linear on the other axis (CE)."""

    def __init__(self):
        super().__init__()
        self.linear, self.linear2 = Lin(3, 2), Lin(5, 2)

    def forward(self, x):
        x = self.linear(x).permute(0, 2, 1)
        return torch.permute(self.linear2(x), (0, 2, 1))


class TransposeNet(nn.Module):
    """``_Transpose``: as ``_Permute`` with ``transpose``."""

    def __init__(self):
        super().__init__()
        self.linear, self.linear2 = Lin(3, 2), Lin(5, 3)

    def forward(self, x):
        x = self.linear(x).transpose(1, 2)
        return torch.transpose(self.linear2(x), 1, 2)


class TolstoiCharRNN(nn.Module):
    """``_TolstoiCharRNN`` with the peer's sizes reduced (vocabulary 7, hidden 4, length 3)."""

    def __init__(self, rnn=nn.LSTM):
        super().__init__()
        self.embedding = nn.Embedding(7, 4)
        self.dropout = nn.Dropout(p=0.2)
        self.lstm = rnn(4, 4, num_layers=2, dropout=0.36, batch_first=True)
        self.dense = Lin(4, 7)

    def forward(self, x):
        x, _ = self.lstm(self.dropout(self.embedding(x)))
        return self.dense(self.dropout(x)).permute(0, 2, 1)


def _conv(model_cls, X_fn, y_fn, loss=MSE, **kw) -> PeerSetting:
    name = model_cls.__name__ if isinstance(model_cls, type) else model_cls.__class__.__name__
    return PeerSetting(f"conv-{name}", BP_CONVERTER, lambda: (model_cls(), loss(), X_fn(), y_fn()),
                       **kw)  # fmt: skip


SETTINGS += [
    _conv(InplaceActivation, lambda: rand(3, 3), lambda: rt((3, 2))),
    _conv(MultipleUsages, lambda: rand(3, 3), lambda: rt((3, 2))),
    _conv(FlattenNetwork, lambda: rand(3, 2, 2, 4), lambda: rt((3, 6))),
    _conv(Multiply, lambda: rand(2, 4), lambda: rt((2, 3))),
    _conv(Add, lambda: rand(3, 3), lambda: rt((3, 2))),
    _conv(PermuteNet, lambda: rand(3, 5, 3), lambda: ct((3, 2), 2), loss=CE),
    _conv(TransposeNet, lambda: rand(3, 5, 3), lambda: ct((3, 2), 3), loss=CE),
    PeerSetting("conv-TolstoiCharRNN", BP_CONVERTER,
                lambda: (TolstoiCharRNN().eval(), CE(), randint(0, 7, (2, 3)), ct((2, 3), 7))),
    PeerSetting("conv-TolstoiRNNVersion", BP_CONVERTER,
                lambda: (TolstoiCharRNN(nn.RNN).eval(), CE(), randint(0, 7, (2, 3)),
                         ct((2, 3), 7))),
]  # fmt: skip


# -- curvlinops: test/cases.py ----------------------------------------------------------
class ModelWithDictInput(nn.Module):
    """curvlinops' ``ModelWithDictInput``: the tensor under key ``"x"`` of a dict."""

    def __init__(self, num_classes=2, nonlin=nn.ReLU):
        super().__init__()
        self.net = Seq(Lin(10, 5), nonlin(), Lin(5, num_classes))

    def forward(self, data):
        return self.net(data["x"])


class WeightShareModel(nn.Sequential):
    """curvlinops' ``test/utils.py`` ``WeightShareModel`` (batched inputs only).

    ``setting``: ``"expand"`` returns ``[N, ..., C]`` (for ``loss="CE"`` the class axis
    moved to position 1), ``"expand-flatten"`` ``[N, (... C)]``, ``"reduce"`` the mean
    over the weight-sharing axes ``[N, C]``.
    """

    def __init__(self, *modules, setting="expand", loss="MSE"):
        super().__init__(*modules)
        self.setting, self.loss = setting, loss

    def forward(self, x):
        out = super().forward(x)
        if self.setting == "reduce":
            return out.flatten(1, -2).mean(1)
        if self.setting == "expand-flatten":
            return out.flatten(1)
        return out.movedim(-1, 1) if (self.loss == "CE" and out.dim() > 2) else out


class Conv2dModel(nn.Module):
    """curvlinops' ``test/utils.py`` ``Conv2dModel``: Conv2d(3, 2, 4, padding=2) per setting."""

    def __init__(self, setting="expand"):
        super().__init__()
        self.setting = setting
        self.conv = C2(3, 2, 4, padding=2)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = self.conv(x)
        if self.setting == "reduce":
            return self.pool(h).flatten(1)
        h = h.permute(0, 2, 3, 1)  # "batch c h w -> batch h w c"
        return h.flatten(1) if self.setting == "expand-flatten" else h


def _mlp(d_in, d_out, nonlin=nn.ReLU):
    return lambda: Seq(Lin(d_in, 5), nonlin(), Lin(5, d_out))


SETTINGS += [
    _s("cl-ce-mean", CL_CASES, _mlp(10, 3), lambda: CE(reduction="mean"),
       lambda: rand(3, 10), lambda: ct((3,), 3)),
    _s("cl-ce-sum", CL_CASES, _mlp(10, 3), lambda: CE(reduction="sum"),
       lambda: rand(3, 10), lambda: ct((3,), 3)),
    _s("cl-bce1-mean", CL_CASES, _mlp(10, 1), lambda: BCE(reduction="mean"),
       lambda: rand(3, 10), lambda: rand(3, 1)),
    _s("cl-bce2-mean", CL_CASES, _mlp(10, 2), lambda: BCE(reduction="mean"),
       lambda: rand(3, 10), lambda: rand(3, 2)),
    _s("cl-bce2-sum", CL_CASES, _mlp(10, 2), lambda: BCE(reduction="sum"),
       lambda: rand(3, 10), lambda: rand(3, 2)),
    _s("cl-mse-mean", CL_CASES, _mlp(8, 3), lambda: MSE(reduction="mean"),
       lambda: rand(2, 8), lambda: rt((2, 3))),
    _s("cl-mse-sum", CL_CASES, _mlp(8, 3), lambda: MSE(reduction="sum"),
       lambda: rand(2, 8), lambda: rt((2, 3))),
    _s("cl-dict-ce", CL_CASES, lambda: ModelWithDictInput(3), lambda: CE(reduction="mean"),
       lambda: {"x": rand(3, 10)}, lambda: ct((3,), 3)),
    _s("cl-dict-bce", CL_CASES, lambda: ModelWithDictInput(1), lambda: BCE(reduction="mean"),
       lambda: {"x": rand(3, 10)}, lambda: rand(3, 1)),
    _s("cl-dict-mse", CL_CASES, lambda: ModelWithDictInput(2), lambda: MSE(reduction="mean"),
       lambda: {"x": rand(3, 10)}, lambda: rt((3, 2))),
    _s("cl-weightshare-ce-mean", CL_CASES,
       lambda: WeightShareModel(Lin(10, 5), nn.ReLU(), Lin(5, 3), loss="CE"),
       lambda: CE(reduction="mean"), lambda: rand(3, 5, 10), lambda: ct((3, 5), 3)),
    _s("cl-weightshare-ce-sum", CL_CASES,
       lambda: WeightShareModel(Lin(10, 5), nn.ReLU(), Lin(5, 3), loss="CE"),
       lambda: CE(reduction="sum"), lambda: rand(3, 5, 10), lambda: ct((3, 5), 3)),
    _s("cl-bce-seq-mean", CL_CASES, _mlp(10, 2), lambda: BCE(reduction="mean"),
       lambda: rand(3, 5, 10), lambda: rand(3, 5, 2)),
    _s("cl-bce-seq-sum", CL_CASES, _mlp(10, 2), lambda: BCE(reduction="sum"),
       lambda: rand(3, 5, 10), lambda: rand(3, 5, 2)),
    _s("cl-mse-seq-mean", CL_CASES, _mlp(8, 3), lambda: MSE(reduction="mean"),
       lambda: rand(2, 5, 8), lambda: rt((2, 5, 3))),
    _s("cl-mse-seq-sum", CL_CASES, _mlp(8, 3), lambda: MSE(reduction="sum"),
       lambda: rand(2, 5, 8), lambda: rt((2, 5, 3))),
    _s("cl-cnn", CL_CASES,
       lambda: Seq(C2(1, 3, 5), nn.ReLU(), nn.MaxPool2d(2), C2(3, 6, 5), nn.ReLU(),
                   nn.MaxPool2d(2), nn.Flatten(), Lin(24, 10)),
       CE, lambda: rand(5, 1, 20, 20), lambda: ct((5,), 10), slow=True),
    # NON_DETERMINISTIC_CASES: the peer tests its determinism check with these; they run
    # here deterministically (Dropout in eval mode, BatchNorm1d in train mode on one batch).
    _s("cl-dropout-eval", CL_CASES,
       lambda: Seq(Lin(10, 5), nn.Dropout(), nn.ReLU(), Lin(5, 2)).eval(),
       lambda: CE(reduction="mean"), lambda: rand(3, 10), lambda: ct((3,), 2)),
    _s("cl-batchnorm-train", CL_CASES,
       lambda: Seq(Lin(10, 5), nn.BatchNorm1d(5), nn.ReLU(), Lin(5, 2)),
       lambda: CE(reduction="mean"), lambda: rand(3, 10), lambda: ct((3,), 2)),
]  # fmt: skip

# -- curvlinops: test/kfac_cases.py -----------------------------------------------------
# KFAC_EXACT_CASES (deep linear networks, MSE mean/sum: K-FAC is exact for any N),
# KFAC_EXACT_ONE_DATUM_CASES (N = 1), SINGLE_LAYER_CASES and the weight-sharing cases
# (expand: outputs keep the sharing axes; expand-flatten / reduce: [N, C] outputs).
for red in ("mean", "sum"):
    SETTINGS += [
        _s(f"cl-exact-deeplinear-scalar-{red}", CL_KFAC, lambda: Seq(Lin(6, 3), Lin(3, 1)),
           lambda red=red: MSE(reduction=red), lambda: rand(5, 6), lambda: rt((5, 1)),
           kflr_exact=True),
        _s(f"cl-exact-deeplinear-vector-{red}", CL_KFAC, lambda: Seq(Lin(5, 4), Lin(4, 3)),
           lambda red=red: MSE(reduction=red), lambda: rand(7, 5), lambda: rt((7, 3)),
           kflr_exact=True),
        _s(f"cl-exact-deeplinear-dict-{red}", CL_KFAC,
           lambda: ModelWithDictInput(3, nonlin=nn.Identity),
           lambda red=red: MSE(reduction=red), lambda: {"x": rand(7, 10)}, lambda: rt((7, 3)),
           kflr_exact=True),
        _s(f"cl-one-datum-ce-{red}", CL_KFAC, lambda: Seq(Lin(5, 4), Lin(4, 3)),
           lambda red=red: CE(reduction=red), lambda: rand(1, 5), lambda: ct((1,), 3),
           kflr_exact=True),
        _s(f"cl-one-datum-bce-{red}", CL_KFAC, lambda: Seq(Lin(4, 3), Lin(3, 2)),
           lambda red=red: BCE(reduction=red), lambda: rand(1, 4), lambda: rand(1, 2),
           kflr_exact=True),
        _s(f"cl-single-layer-scalar-{red}", CL_KFAC, lambda: Lin(6, 1),
           lambda red=red: MSE(reduction=red), lambda: rand(5, 6), lambda: rt((5, 1)),
           kflr_exact=True),
        _s(f"cl-single-layer-vector-{red}", CL_KFAC, lambda: Lin(5, 3),
           lambda red=red: MSE(reduction=red), lambda: rand(7, 5), lambda: rt((7, 3)),
           kflr_exact=True),
        _s(f"cl-ws-deeplinear-expand-{red}", CL_KFAC,
           lambda: WeightShareModel(Lin(5, 4), Lin(4, 3)), lambda red=red: MSE(reduction=red),
           lambda: rand(2, 4, 8, 5), lambda: rt((2, 4, 8, 3))),
        _s(f"cl-ws-deeplinear-expand-flatten-{red}", CL_KFAC,
           lambda: WeightShareModel(Lin(5, 4), Lin(4, 3), setting="expand-flatten"),
           lambda red=red: MSE(reduction=red), lambda: rand(2, 4, 8, 5), lambda: rt((2, 96))),
        _s(f"cl-ws-deeplinear-reduce-{red}", CL_KFAC,
           lambda: WeightShareModel(Lin(5, 4), Lin(4, 3), setting="reduce"),
           lambda red=red: MSE(reduction=red), lambda: rand(1, 4, 8, 5), lambda: rt((1, 3))),
        _s(f"cl-ws-conv2d-expand-{red}", CL_KFAC, lambda: Conv2dModel("expand"),
           lambda red=red: MSE(reduction=red), lambda: rand(2, 3, 8, 8),
           lambda: rt((2, 9, 9, 2))),
        _s(f"cl-ws-conv2d-expand-flatten-{red}", CL_KFAC,
           lambda: Conv2dModel("expand-flatten"), lambda red=red: MSE(reduction=red),
           lambda: rand(2, 3, 8, 8), lambda: rt((2, 162))),
        _s(f"cl-ws-conv2d-reduce-{red}", CL_KFAC, lambda: Conv2dModel("reduce"),
           lambda red=red: MSE(reduction=red), lambda: rand(1, 3, 8, 8), lambda: rt((1, 2))),
    ]  # fmt: skip

#: Settings of the peers' tables that are not ported, with the reason.
NOT_PORTED = {
    "backpack resnet18 / wide_resnet50_2 (firstorder_settings.py, converter_cases.py)": (
        "built with torchvision, which the project does not import"
    ),
    "backpack ResNet2 (resnet_cases.py)": "uses torchvision's BasicBlock",
    "curvlinops CALLABLE_CASES (cases.py)": (
        "a functional model f(params, X); curvkit's extract takes an nn.Module"
    ),
}

IDS = [s.id for s in SETTINGS]
assert len(set(IDS)) == len(IDS), "duplicate setting ids"
