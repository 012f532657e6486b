"""Exceptions raised by curvkit.

Every error says what was wrong (which module, argument or loss), where it was
(position in the model), and what is supported instead.
"""


class CurvkitError(Exception):
    """Base class of all curvkit errors."""


class UnsupportedModuleError(CurvkitError, NotImplementedError):
    """A model contains a module the requested computation does not support."""


class UnsupportedLossError(CurvkitError, NotImplementedError):
    """The loss function is not one the requested computation supports."""


class ShapeError(CurvkitError, ValueError):
    """A tensor argument has a shape, size or layout the call does not accept."""


class ConfigError(ShapeError):
    """An argument has a value the call does not accept (a range, a name, a type).

    Bad arguments that are not about tensor shapes raise this class. It subclasses
    :class:`ShapeError` (and ``ValueError``) for one release, so code that catches
    ``ShapeError`` for every bad argument keeps working; catch ``ConfigError`` (or
    ``ValueError``) in new code.
    """


class NonFiniteError(CurvkitError, FloatingPointError):
    """A computation met NaN or infinite values (e.g. a model output) it cannot use."""
