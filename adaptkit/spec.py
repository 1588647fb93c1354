"""Adapter specs: one frozen dataclass per method, validated on construction.

Every method's spec subclasses :class:`AdapterSpec`, which holds the fields all methods
share (docs/ARCHITECTURE.md). A spec is JSON round-trippable through ``to_dict`` /
``from_dict``; ``from_dict`` is strict: an unknown method or field is an error, so a file
written by a newer adaptkit never loads with silently lost semantics (PEFT pain #6).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import AdaptkitError

if TYPE_CHECKING:
    from .peft_config import PeftForm

Pattern = str | list[str] | tuple[str, ...] | None
BIAS_MODES = ("none", "all", "adapter_only")

# method name -> spec class; filled by @register_method in adaptkit/methods/*.py
METHODS: dict[str, type[AdapterSpec]] = {}


def register_method(cls: type[AdapterSpec]) -> type[AdapterSpec]:
    """Class decorator adding a spec class to the method registry under ``cls.method``."""
    METHODS[cls.method] = cls
    return cls


def _check_regex(owner: str, fld: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise AdaptkitError(
            f"{owner}: {fld}={pattern!r} is not a valid regular expression ({e}); "
            f"fix the pattern (it is matched with re.fullmatch against module paths)"
        ) from None


def _as_tuple(owner: str, fld: str, value: Pattern) -> tuple[str, ...] | None:
    """Normalise a str / list of regexes to a tuple (hashable, JSON-friendly)."""
    if value is None:
        return None
    if not isinstance(value, (str, list, tuple)):
        raise AdaptkitError(
            f"{owner}: {fld} must be a regex string or a list of them, got {type(value).__name__} {value!r:.80}"
        )
    items = (value,) if isinstance(value, str) else tuple(value)
    for p in items:
        if not isinstance(p, str):
            raise AdaptkitError(
                f"{owner}: {fld} must be a regex string or a list of them, got {type(p).__name__} {p!r}"
            )
        _check_regex(owner, fld, p)
    return items


@dataclass(frozen=True)
class AdapterSpec:
    """Fields shared by every method.

    rank, alpha:      adapter rank r and scale numerator (scale = alpha / r; alpha None means
                      alpha = rank, i.e. scale 1).
    targets:          regex or list of regexes, ``re.fullmatch``-ed against the paths of
                      ``model.named_modules()``; ``"all-linear"`` = every Linear-like module
                      except the output head; None or [] (with ``target_parameters``): none.
    target_parameters: regexes ``re.fullmatch``-ed against parameter paths
                      ``<module path>.<param name>``: 2-D / 3-D Parameters a module uses
                      directly (MoE experts), adapted in place (adaptkit/param_base.py).
    exclude:          regexes of paths never adapted.
    rank_pattern, alpha_pattern: ``{regex: value}``; the first key that fullmatches a path
                      overrides rank / alpha there.
    layers_to_transform, layers_pattern: keep only paths whose layer index (the integer
                      segment after a prefix fullmatching ``layers_pattern``; with no pattern,
                      the first integer segment, so a root ``ModuleList`` works) is listed.
    modules_to_save:  regexes of modules trained in full and saved with the adapter.
    bias:             "none" | "all" (every bias of the model trains) | "adapter_only"
                      (biases of adapted layers train); trained biases are saved.
    """

    method: ClassVar[str] = ""
    # PEFT interop, set on the class in the method's own file; read with vars(cls), not inherited
    peft_form: ClassVar[PeftForm | None] = None
    rank: int = 8
    alpha: float | None = None
    targets: Pattern = "all-linear"
    target_parameters: Pattern = None
    exclude: Pattern = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: int | list[int] | tuple[int, ...] | None = None
    layers_pattern: Pattern = None
    modules_to_save: Pattern = None
    bias: str = "none"

    # ---- validation -------------------------------------------------------------------
    def __post_init__(self) -> None:
        name = type(self).__name__
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        self._check_rank(name, "rank", self.rank)
        if self.alpha is not None:
            self._check_alpha(name, "alpha", self.alpha)
        set_("targets", _as_tuple(name, "targets", self.targets) or ())
        set_("target_parameters", _as_tuple(name, "target_parameters", self.target_parameters) or None)
        if not self.targets and not self.target_parameters:
            raise AdaptkitError(
                f"{name}: targets and target_parameters are both empty; give a regex such as "
                f"targets=r'.*\\.q_proj' (or 'all-linear'), or target_parameters=r'.*\\.experts\\.down_proj'"
            )
        set_("exclude", _as_tuple(name, "exclude", self.exclude))
        set_("layers_pattern", _as_tuple(name, "layers_pattern", self.layers_pattern))
        set_("modules_to_save", _as_tuple(name, "modules_to_save", self.modules_to_save))
        for fld, check in (("rank_pattern", self._check_rank), ("alpha_pattern", self._check_alpha)):
            pat = getattr(self, fld)
            if not isinstance(pat, dict):
                raise AdaptkitError(f"{name}: {fld} must be a dict {{regex: value}}, got {type(pat).__name__}")
            for k, v in pat.items():
                _check_regex(name, f"{fld} key", k)
                check(name, f"{fld}[{k!r}]", v)
            set_(fld, dict(pat))
        ltt = self.layers_to_transform
        if ltt is not None:
            ltt = (ltt,) if isinstance(ltt, int) else tuple(ltt) if isinstance(ltt, (list, tuple)) else None
            if ltt is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ltt):
                raise AdaptkitError(
                    f"{name}: layers_to_transform must be non-negative ints, got "
                    f"{self.layers_to_transform!r:.80}; use e.g. layers_to_transform=[0, 1]"
                )
            set_("layers_to_transform", ltt)
        if self.bias not in BIAS_MODES:
            raise AdaptkitError(f"{name}: bias={self.bias!r} is not one of {BIAS_MODES}")
        self.validate()

    @staticmethod
    def _check_rank(owner: str, fld: str, v: Any) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise AdaptkitError(f"{owner}: {fld}={v!r} must be a positive int; use e.g. {fld}=8")

    @staticmethod
    def _check_alpha(owner: str, fld: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
            raise AdaptkitError(
                f"{owner}: {fld}={v!r} must be a finite number > 0; use alpha=2*rank or leave it None (alpha = rank)"
            )

    @staticmethod
    def _check_prob(owner: str, fld: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise AdaptkitError(f"{owner}: {fld}={v!r} must be in [0, 1); use e.g. {fld}=0.05")

    def validate(self) -> None:
        """Method-specific checks; subclasses override and raise AdaptkitError."""

    # ---- per-layer values ------------------------------------------------------------
    def rank_for(self, path: str) -> int:
        from .targets import first_match

        return first_match(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        from .targets import first_match

        alpha = first_match(self.alpha_pattern, path, None)
        if alpha is None:
            alpha = self.alpha if self.alpha is not None else self.rank_for(path)
        return float(alpha)

    # ---- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AdapterSpec:
        if not isinstance(d, dict) or "method" not in d:
            raise AdaptkitError(f"spec: expected a JSON object with a 'method' key, got {d!r:.200}")
        method = d["method"]
        if method not in METHODS:
            raise AdaptkitError(
                f"spec: unknown method {method!r}; known methods: {sorted(METHODS)}. "
                f"Upgrade adaptkit if the file comes from a newer version"
            )
        cls = METHODS[method]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"method"})
        if unknown:
            raise AdaptkitError(
                f"spec: unknown field(s) {unknown} for method {method!r}; known fields: {sorted(names)}"
            )
        return cls(**{k: v for k, v in d.items() if k != "method"})

    # ---- the method hooks (overridden by each method) ---------------------------------
    def supports(self, kind: str) -> bool:
        """Whether this method can adapt a base of ``kind`` (see layer.base_kind)."""
        return kind in ("linear", "conv1d_t")

    def prepare_base(self, module, path: str):
        """The module to wrap at ``path``, at plan time (must not mutate ``module``).

        Default: ``module`` itself, refused when its weight is quantised (packed integers),
        which only a quantising method adapts. QLoRA returns an NF4 copy of a float Linear."""
        w = getattr(module, "weight", None)
        if w is not None and not w.is_floating_point():
            raise AdaptkitError(
                f"{type(self).__name__} cannot adapt '{path}': its base "
                f"{type(module).__name__} stores a quantised ({w.dtype}) weight; "
                f"use ak.QLoRA (use_dora=True for DoRA) on NF4 bases"
            )
        return module

    def build(self, layer, path: str):
        """Build (without mutating ``layer``) the Adapter module for one wrapped layer."""
        raise NotImplementedError
