"""What a recipe or its inputs can do wrong inside an operator: ``UserError`` subclasses, so the
CLI reports one line and exits 2 (internal invariants stay asserts / plain exceptions)."""
from __future__ import annotations

from ..errors import UserError


class OperatorInputError(UserError):
    """An operator cannot merge what it was given."""


class NoInputs(OperatorInputError):
    """No model provides the tensor."""


class MissingBase(OperatorInputError):
    """The method needs the base model (theta_0) and the recipe gives none for this tensor."""


class ShapeMismatch(OperatorInputError):
    """Tensors (or factors) that must agree in shape do not."""


class NonFiniteInput(OperatorInputError):
    """A task vector or an intermediate result holds NaN or Inf."""


class BadParameters(OperatorInputError):
    """A parameter value, or a combination of them, the method cannot work with."""
