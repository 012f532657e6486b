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
    """An argument has a shape or form the call does not accept."""


class NonFiniteError(CurvkitError, FloatingPointError):
    """A computation met NaN or Inf values (e.g. from NaN/Inf in the data) it cannot use."""
