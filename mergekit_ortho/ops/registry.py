"""Operator registry: method name -> Operator (what it reads, its parameters, its function).

Every operator family lives in its own module under ``mergekit_ortho.ops`` and registers itself
with :func:`register`. The registry imports those modules lazily (on the first lookup) so that
``merge --help`` does not pay for torch.

The contract, checked before any tensor is touched (sd-mecha's habit):

* ``input_kind`` - ``"dense"`` operators receive one tensor per model (LoRA inputs are
  materialised to ``scale·B·A`` first); ``"lora"`` operators receive canonical low-rank factors.
* ``reads`` - ``"deltas"``: the executor hands task vectors tau_i = theta_i - theta_0 and adds the
  base back to the returned merged delta; ``"weights"``: raw weights in, merged weight out.
* ``params`` / ``model_params`` - the method-level and per-model parameter schemas; recipes are
  validated against them (unknown names, wrong types, choices) before anything is loaded.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Literal

from ..errors import shown

if TYPE_CHECKING:  # torch is imported only where tensors are actually touched
    import torch

REQUIRED = object()

# Operator families, one module each. Order is the order of `merge methods`.
_MODULES = ("linear", "gta", "magmax", "widen", "tsv", "core_space", "lora_lego", "rmm", "opcm", "slerp", "spherical",
            "sce", "model_stock", "arcee_fusion", "passthrough", "ram")


@dataclass(frozen=True)
class Param:
    """One recipe parameter of an operator."""

    name: str
    type: type  # float, int, bool or str
    default: Any = REQUIRED
    help: str = ""
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    regex: bool = False  # a regular expression (on tensor names), compiled when the recipe is checked

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any) -> Any:
        """Validate and convert one value; raises ValueError with a user-facing message."""
        t = self.type
        if value is None and self.default is None:
            return None  # an optional parameter whose default is decided by the operator
        # pydantic's lax rules, as mergekit reads recipes: "1e-3" is a number, 1 / "true" a bool
        if t is bool:
            out = _lax_bool(value)
            if out is None:
                raise ValueError(f"parameter '{self.name}' must be true or false, got {shown(value)}")
        elif t is float:
            out = _lax_number(value)
            if out is None:
                raise ValueError(f"parameter '{self.name}' must be a number, got {shown(value)}")
            if out != out:  # NaN passes every comparison below and poisons every tensor
                raise ValueError(f"parameter '{self.name}' must be a number, got NaN")
        elif t is int:
            out = _lax_number(value)
            if out is None or isinstance(value, bool) or not float(out).is_integer():
                raise ValueError(f"parameter '{self.name}' must be an integer, got {shown(value)}")
            out = int(out)
        elif t is str:
            if not isinstance(value, str):
                raise ValueError(f"parameter '{self.name}' must be a string, got {shown(value)}")
            out = value
        else:  # pragma: no cover - schema error, not user error
            raise TypeError(f"unsupported parameter type {t}")
        if self.choices and out not in self.choices:
            raise ValueError(
                f"parameter '{self.name}' must be one of {', '.join(map(str, self.choices))}, got {shown(value)}"
            )
        if self.regex:
            try:
                compiled_pattern(out)
            except re.error as exc:
                raise ValueError(f"parameter '{self.name}' is not a valid regular expression ({exc}): {shown(value)}") from None
        if self.minimum is not None and out < self.minimum:
            raise ValueError(f"parameter '{self.name}' must be >= {self.minimum}, got {shown(value)}")
        if self.maximum is not None and out > self.maximum:
            raise ValueError(f"parameter '{self.name}' must be <= {self.maximum}, got {shown(value)}")
        return out


_TRUE, _FALSE = {"true", "yes", "on", "t", "y", "1"}, {"false", "no", "off", "f", "n", "0"}


def _lax_bool(value: Any) -> bool | None:
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return bool(value)
    v = value.strip().lower() if isinstance(value, str) else None
    return True if v in _TRUE else False if v in _FALSE else None


def _lax_number(value: Any) -> float | None:
    if isinstance(value, (bool, int, float)):
        return float(value) if isinstance(value, (bool, float)) else value
    try:
        return float(value.strip()) if isinstance(value, str) else None
    except ValueError:
        return None


class Params(dict):
    """An operator's resolved parameters: every name of its schema present (defaults filled in),
    coerced to the declared type, read-only. Read them as attributes (``p.density``; a Python
    keyword by item, ``p["lambda"]``). The default lives once, in the :class:`Param`, so an
    operator never writes ``params.get(name, default)``. A dict underneath, so reports, JSON
    state files and pickles (processes of a scheduler) take it as it is."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no parameter '{name}' (known: {', '.join(self) or 'none'})") from None

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("operator parameters are read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only  # type: ignore[assignment]
    update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        return (Params, (dict(self),))

    def __copy__(self) -> "Params":
        return self

    def __deepcopy__(self, memo: dict) -> "Params":
        return self


@dataclass
class TensorTask:
    """Everything a dense operator sees for one tensor. Tensors are float32 (or the compute dtype)."""

    name: str
    base: "torch.Tensor | None"
    inputs: "list[torch.Tensor]"  # task vectors if reads == "deltas", else weights
    params: Params
    model_params: list[Params]
    model_names: list[str] = field(default_factory=list)
    # the compute dtype; inputs arrive in it, except raw weights (below)
    dtype: "torch.dtype | None" = None
    raw_inputs: bool = False  # True: a Fold with ``raw_weights`` is handed the weights as stored
    # what a Fold's ``gather`` pre-pass collected over every model (see Fold)
    stats: Any = None
    # what a Fold's ``reduce`` combined over every tensor of the models so far (see Fold)
    scalars: Any = None
    out_dtype: "torch.dtype | None" = None  # the output's, when written as is: a fold may return that


@dataclass
class LoraTask:
    """Everything a LoRA operator sees for one adapted module.

    ``factors[i] = (A_i, B_i)`` with A_i (r_i x in) and B_i (out x r_i), float32, the LoRA scale
    already folded in exactly once (so delta_i = B_i @ A_i). Only the models that adapt this module
    appear; ``model_index[i]`` says which recipe model each pair came from.
    """

    name: str  # the base weight key the module adapts, e.g. "model.layers.0.self_attn.q_proj.weight"
    factors: "list[tuple[torch.Tensor, torch.Tensor]]"
    params: Params
    model_params: list[Params]
    model_index: list[int] = field(default_factory=list)
    model_names: list[str] = field(default_factory=list)
    base: "torch.Tensor | None" = None  # the base weight, when a base model is given
    # set when the factors are full fine-tunes' task vectors truncated by SVD to this rank (PT-SVD,
    # the operator's ``dense_rank_param``); None: the factors are LoRA adapters'
    svd_rank: int | None = None


@dataclass
class BundleEntry:
    """One module of a bundle (a ``result == "bundle"`` method such as rmm): its tensors, keyed by
    their local names (``left.basis``, ...), for the bundle file."""

    tensors: "dict[str, torch.Tensor]"


@dataclass
class LoraResult:
    """A LoRA operator's answer for one module: low-rank factors (preferred) or a dense delta, or,
    for a method that writes a bundle, the module's bundle tensors."""

    A: "torch.Tensor | None" = None  # (r x in)
    B: "torch.Tensor | None" = None  # (out x r); delta = B @ A
    delta: "torch.Tensor | None" = None  # (out x in) when the result is not low rank
    report: dict[str, Any] = field(default_factory=dict)  # per-module JSON-safe facts for the report
    bundle: BundleEntry | None = None  # a bundle method's tensors for this module


@dataclass(frozen=True)
class StateParts:
    """A fold state of several tensors, stored: ``layout(shape, params)`` -> {part: (shape, dtype
    name)} for a merged tensor of that shape; ``pack(state)`` -> {part: tensor} as laid out;
    ``unpack(tensors, task)`` -> the state, owning the (fresh) tensors. An exact round trip."""

    layout: Callable[..., "dict[str, tuple[tuple[int, ...], str]]"]
    pack: Callable[..., "dict[str, torch.Tensor]"]
    unpack: Callable[..., Any]


@dataclass(frozen=True)
class Fold:
    """The fold form of a dense operator: the models folded into a state one at a time, per tensor
    (one model tensor in memory at a time; continual merging persists the state between models).

    ``start(task)`` -> state, where ``task.inputs`` is empty; ``step(state, x, i, task)`` folds
    model i's (0-based) tensor x (a delta or a weight, per ``reads``) and returns the new state;
    ``finish(state, task)`` -> the merged delta / weight. Must equal ``Operator.fn`` exactly where
    ``fn`` can merge one tensor on its own. Inputs (``task.inputs``, each ``x``) belong to the
    operator: fresh buffers it may modify in place.

    ``raw_weights``: ``step`` can take model i's *weight as stored* (bf16, ...; ``task.raw_inputs``
    True, ``task.base`` as stored) and prepare its input chunk by chunk (``kernels.convert``'s
    ``fold_input_chunks`` / ``fold_input``): in ``task.dtype``, minus ``task.base`` when given; the
    prepared input's values exactly, with no full-size converted weight, base or task vector.

    ``gather``: a pre-pass, ``stats = gather(stats, x, i, task)`` over every model (None before
    model 0), then ``task.stats = stats`` and start/step/finish over the models again (WIDEN's
    ranks across models): two reads per model, memory one input plus the state; not one at a time.

    ``reduce``: scalars global over all tensors of each model (OPCM's lambda_t). ``step`` then
    returns ``(state, stats)``, a dict of floats for that tensor; the executor sums the stats of
    model t over every tensor and calls ``scalars = reduce(stats_sum, scalars_prev, t, params)``
    (t 1-based, JSON-safe); ``finish`` reads ``task.scalars``. Such a fold cannot merge one tensor
    alone: `merge run` folds every model of every tensor, then finishes each (``sequential``).

    ``parts``: how a state of several tensors is stored (:class:`StateParts`); None: one float32.
    """

    start: Callable[..., Any]
    step: Callable[..., Any]
    finish: Callable[..., Any]
    raw_weights: bool = False
    gather: Callable[..., Any] | None = None
    reduce: Callable[..., Any] | None = None
    parts: StateParts | None = None

    @property
    def one_model_at_a_time(self) -> bool:  # each step needs the models before it only
        return self.gather is None


@dataclass(frozen=True)
class Operator:
    name: str
    summary: str
    spec: str  # the spec section it implements
    fn: Callable[..., Any]
    input_kind: Literal["dense", "lora"] = "dense"
    # what the method writes: merged tensors / adapters ("tensor"), or a bundle of its own ("bundle")
    result: Literal["tensor", "bundle"] = "tensor"
    # a LoRA method that also takes full fine-tunes names the parameter giving the rank at which
    # each task vector is extracted by truncated SVD (PT-SVD); None: LoRA inputs only
    dense_rank_param: str | None = None
    reads: Literal["deltas", "weights"] = "deltas"
    needs_base: bool = True
    # how many models besides the base the method merges (slerp: 1); None: any number
    model_count: int | None = None
    # the fewest models besides the base it merges (model_stock: 2)
    min_models: int = 1
    # the base, when the recipe gives one, is one more ordinary input (mergekit's linear, karcher,
    # passthrough): appended after the listed models unless it is listed; it is not subtracted
    base_input: bool = False
    # a weights method that uses the base when one is given and works without (nuslerp, multislerp
    # slerp the task vectors about it): ``task.base`` is the base tensor or None
    optional_base: bool = False
    params: tuple[Param, ...] = ()
    model_params: tuple[Param, ...] = ()
    aliases: tuple[str, ...] = ()
    fold: Fold | None = None  # the fold form: the executor folds the models one at a time
    elementwise: bool | Callable[[Params], bool] = False  # entry j from entry j of each input: blockwise.py
    details: str = ""  # longer help shown by `merge methods NAME` (tensor rules, defaults, paper)
    # exact low-rank form of a dense operator on LoRA inputs (linear, task_arithmetic): called with a
    # LoraTask listing EVERY recipe model (rank-0 factors for models that do not adapt the module)
    lora_fn: Callable[..., Any] | None = None
    # LoRA operators: how the scale s is folded into the factors they receive ("B": B carries s;
    # "sqrt": each factor carries sqrt|s|). Deltas are the same; factor geometry (clustering) is not.
    factor_fold: Literal["B", "sqrt"] = "B"

    @property
    def reads_base(self) -> bool:
        """Whether the base tensor is read: task vectors are relative to it, or it is one of the
        method's own inputs (slerp's t = 0 end). linear on full checkpoints never reads it."""
        return self.reads == "deltas" or self.needs_base or self.optional_base

    @property
    def folds_one_model_at_a_time(self) -> bool:  # continual merging: no pre-pass, any model count
        return self.fold is not None and self.fold.one_model_at_a_time and self.model_count is None

    @property
    def merges_one_tensor_alone(self) -> bool:
        """False for a fold with ``reduce`` (its scale is global over every tensor of a model)."""
        return self.fold is None or self.fold.reduce is None

    def resolve_params(self, given: dict[str, Any] | None) -> Params:
        return _resolve(self.params, given or {}, f"method '{self.name}'")

    def resolve_model_params(self, given: dict[str, Any] | None, model: str = "") -> Params:
        return _resolve(self.model_params, given or {}, f"model '{model}' of method '{self.name}'")


def _resolve(schema: tuple[Param, ...], given: dict[str, Any], where: str) -> Params:
    by_name = {p.name: p for p in schema}
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key not in by_name:
            hint = difflib.get_close_matches(key, list(by_name), n=1)
            known = ", ".join(by_name) or "none"
            msg = f"unknown parameter {shown(key, 60)} for {where}"
            msg += f" (did you mean '{hint[0]}'?)" if hint else f" (known: {known})"
            raise ValueError(msg)
        out[key] = by_name[key].coerce(value)
    for p in schema:
        if p.name not in out:
            if p.required:
                raise ValueError(f"missing required parameter '{p.name}' for {where}")
            out[p.name] = p.default
    return Params(out)


_OPERATORS: dict[str, Operator] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register(op: Operator) -> Operator:
    _OPERATORS[op.name] = op
    for alias in op.aliases:
        _ALIASES[alias] = op.name
    return op


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _MODULES:
            importlib.import_module(f"mergekit_ortho.ops.{mod}")


def all_operators() -> list[Operator]:
    _load()
    return list(_OPERATORS.values())


def get(name: str) -> Operator:
    """Look an operator up by name or alias; unknown names get the nearest suggestion."""
    _load()
    key = _ALIASES.get(name, name)
    if key in _OPERATORS:
        return _OPERATORS[key]
    names = sorted(set(_OPERATORS) | set(_ALIASES))
    hint = difflib.get_close_matches(name, names, n=1)
    msg = f"unknown merge_method '{name}'"
    msg += f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ValueError(msg + "; run `merge methods` for the list")


@lru_cache(maxsize=128)
def compiled_pattern(pattern: str) -> "re.Pattern[str]":
    return re.compile(pattern)


def name_matches(pattern: str | None, name: str) -> bool:
    """``re.search`` of a (validated) name pattern parameter; an empty or None pattern matches nothing."""
    return bool(pattern) and compiled_pattern(pattern).search(name) is not None


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from (seed, tensor name): randomness independent of processing order."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, name: str, device: "torch.device | str" = "cpu") -> "torch.Generator":
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(tensor_seed(seed, name))
    return g
