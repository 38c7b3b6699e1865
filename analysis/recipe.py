"""Recipe: the one description of a quantization (formats, branch method, rank rule,
smoothing, optimizer, seed).

A recipe is a frozen, versioned dataclass, validated on construction. It round-trips
through JSON (``to_json`` / ``from_json``), and the configuration names of the command
line parse into it with one parser (``Recipe.parse``) and render back from it
(``recipe.name``)::

    <config>[-<method>][-nosmooth]

    <config>   hwsim.cost's grammar: W<b>A<b>[+W<b>A<b>|+FP16][r<rank>]
    <method>   a branch method other than the default: lqer, loftq, naive
               (the default is none without a branch, svdquant for +FP16, loraq otherwise)
    -nosmooth  no smoothing (a quantized branch: the data-free LoRaQ)

The bit widths of the name pick formats from the ``main`` and ``branch`` families
(``mxint`` by default: W4 -> mxint4, W8 -> mxint8; ``sint``, ``mxfp``, ``nvfp``, or
one exact format such as ``sint4``); the recipe holds the formats themselves, so two
recipes with one name and other families differ (and so do their cache keys).

The rank rule: ``rank`` given (``r<rank>``) is that rank; otherwise an FP16 branch takes
rank ``ref_rank`` and a quantized branch the rank whose storage equals an FP16 branch of
rank ``ref_rank`` (``hwsim.cost.equal_memory_rank``), each capped at a layer's
min(out, in) - 1.

Smoothing (``Smoothing``): SVDQuant's per-input-channel vector
lambda_j = max|X_j|^alpha / max|W_j|^beta from calibration activations; one
(alpha, beta) point is a fixed smoothing, several form a search grid scored by the
output error. ``None`` is no smoothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

import numfmt
from hwsim.cost import CONFIG_GRAMMAR, Config, parse_config

from analysis.loraq.result import METHODS as LAYER_METHODS

__all__ = ["Recipe", "Smoothing", "RECIPE_VERSION", "METHODS", "GRAMMAR", "DEFAULT_SMOOTHING",
           "parse_recipes"]

RECIPE_VERSION = 1
# "none": no branch (analysis.loraq's "rtn"); the others, analysis.loraq's, build a branch.
METHODS = ("none",) + tuple(m for m in LAYER_METHODS if m != "rtn")
BRANCH_METHODS = METHODS[1:]
NOSMOOTH = "-nosmooth"
GRAMMAR = CONFIG_GRAMMAR + f"[-lqer|-loftq|-naive][{NOSMOOTH}]"
_SUFFIX_METHODS = ("lqer", "loftq", "naive", "svdquant", "loraq")


def _num(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v == v or v < 0 \
            or v == float("inf"):
        raise ValueError(f"{what}={v!r} must be a finite number >= 0")
    return float(v)


CRITERIA = ("weight", "output")
# LoRaQ's Adam step: "ours" (analysis.loraq.optimizer.default_lr: by branch width, on the
# optimizer's unit-RMS weight) or "paper" (1e-3 for FP branch formats, 1e-4 for INT, on the
# unnormalized weight: analysis.fit.paper_lr)
LR_RULES = ("ours", "paper")


@dataclass(frozen=True)
class Smoothing:
    """SVDQuant's smoothing: the (alpha, beta) grid searched per layer (one point: fixed).

    ``criterion`` scores a grid point: ``weight`` (``analysis.loraq.baselines.
    smoothing_search``: the output error of the fitted weight with unquantized activations;
    a one-point grid is not scored) or ``output`` (``analysis.smoothing``: the output MSE
    of the quantized layer with its activation quantizer and the smoothing rank's SVD
    branch in the loop, as the paper chooses alpha and beta per layer).
    """

    alphas: tuple = (0.5,)
    betas: tuple = (0.5,)
    criterion: str = "weight"

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"smoothing criterion={self.criterion!r} is not allowed; allowed: "
                             f"{CRITERIA}")
        for what in ("alphas", "betas"):
            v = getattr(self, what)
            if isinstance(v, (int, float)):
                v = (v,)
            v = tuple(_num(x, what) for x in v)
            if not v:
                raise ValueError(f"smoothing {what} must hold at least one value")
            object.__setattr__(self, what, v)

    @property
    def fixed(self) -> bool:
        return len(self.alphas) * len(self.betas) == 1

    def to_dict(self) -> dict:
        return {"alphas": list(self.alphas), "betas": list(self.betas),
                "criterion": self.criterion}


# SmoothQuant's migration strength 0.5 (beta = 1 - alpha): one point instead of the
# baseline's 5 x 5 grid (25 SVDs a layer), to keep the main job in its time budget.
DEFAULT_SMOOTHING = Smoothing((0.5,), (0.5,))


def _fmt(f, what: str, allow_none: bool = False) -> str | None:
    if f is None:
        if allow_none:
            return None
        raise ValueError(f"{what} must be a numfmt format name, got None")
    if not isinstance(f, str):
        f = numfmt.get(f).name
    return numfmt.get(f).name  # raises with the list of known formats


def _bits(name: str) -> int:
    f = numfmt.get(name)
    return getattr(f, "element", f).bits


@dataclass(frozen=True)
class Recipe:
    """How to quantize every layer of a model (see the module docstring).

    ``method``: ``none`` (main only), ``svdquant`` (FP16 branch), ``loraq``, ``lqer``,
    ``loftq`` or ``naive`` (quantized branch). ``rank``: explicit branch rank or None
    for the rank rule with ``ref_rank``. ``lr_rule``: ``ours`` or ``paper`` (``LR_RULES``). ``steps`` / ``lr``: the LoRaQ optimizer's
    step budget (None: its own default, run to convergence; an int: a cosine schedule
    over that many steps) and Adam step (None: its default by branch width).
    """

    main_weight: str = "mxint4"
    main_act: str = "mxint4"
    method: str = "none"
    branch_weight: str | None = None
    branch_act: str | None = None
    rank: int | None = None
    ref_rank: int = 32
    smoothing: Smoothing | None = None
    steps: int | None = None
    lr: float | None = None
    lr_rule: str = "ours"
    seed: int = 0
    version: int = RECIPE_VERSION

    def __post_init__(self):
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version!r} is not supported (this toolkit "
                             f"reads version {RECIPE_VERSION})")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("main_weight", _fmt(self.main_weight, "main_weight"))
        set_("main_act", _fmt(self.main_act, "main_act"))
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not allowed; allowed: {METHODS}")
        set_("branch_weight", _fmt(self.branch_weight, "branch_weight", allow_none=True))
        set_("branch_act", _fmt(self.branch_act, "branch_act", allow_none=True))
        has = self.branch_weight is not None
        if has != (self.branch_act is not None):
            raise ValueError("give both branch_weight and branch_act for a branch, or neither")
        if (self.method == "none") == has:
            raise ValueError(f"method={self.method!r} " + (
                "takes no branch formats" if has else
                "needs branch_weight and branch_act (its branch formats)"))
        if self.method == "svdquant" and self.branch_weight != "fp16":
            raise ValueError(f"method 'svdquant' keeps its branch in fp16, got branch_weight="
                             f"{self.branch_weight!r}")
        if self.method not in ("svdquant", "none") and self.branch_weight == "fp16":
            raise ValueError(f"an fp16 branch is SVDQuant's (method 'svdquant'), not "
                             f"{self.method!r}")
        for k, lo in (("rank", 1), ("ref_rank", 1), ("steps", 0), ("seed", 0)):
            v = getattr(self, k)
            if v is None and k in ("rank", "steps"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{k}={v!r} must be an int >= {lo}")
        if self.rank is not None and not has:
            raise ValueError(f"rank={self.rank} needs a branch (method {self.method!r} has none)")
        if self.lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule={self.lr_rule!r} is not allowed; allowed: {LR_RULES}")
        if self.lr is not None and self.lr_rule != "ours":
            raise ValueError("give lr= or lr_rule='paper', not both")
        if self.lr is not None:
            if _num(self.lr, "lr") == 0:
                raise ValueError(f"lr={self.lr!r} must be > 0")
            set_("lr", float(self.lr))
        sm = self.smoothing
        if isinstance(sm, dict):
            sm = Smoothing(tuple(sm["alphas"]), tuple(sm["betas"]),
                           sm.get("criterion", "weight"))
        if sm is not None and not isinstance(sm, Smoothing):
            raise TypeError(f"smoothing must be a Smoothing, a dict or None, got {sm!r}")
        if sm is not None and not has:
            raise ValueError("smoothing applies to a recipe with a branch (method 'none' has none)")
        set_("smoothing", sm)

    # ------------------------------------------------------------------ names
    @classmethod
    def parse(cls, name: str, *, main="mxint4", branch="mxint", ref_rank: int = 32,
              smoothing: Smoothing | None = DEFAULT_SMOOTHING, steps: int | None = None,
              lr: float | None = None, seed: int = 0) -> "Recipe":
        """The recipe a configuration name means (grammar in the module docstring).

        ``smoothing`` applies to every recipe with a branch whose name does not end in
        ``-nosmooth``. Raises ``ValueError`` naming the bad string and the grammar.
        """
        if isinstance(name, Recipe):
            return name
        if not isinstance(name, str):
            raise TypeError(f"a configuration must be a string like 'W4A4+W8A8', got {name!r}")
        text = name.strip()
        nosmooth = text.lower().endswith(NOSMOOTH)
        if nosmooth:
            text = text[:-len(NOSMOOTH)]
        method = None
        m = re.match(r"^(.*)-([A-Za-z]+)$", text)
        if m and m.group(2).lower() in _SUFFIX_METHODS:
            text, method = m.group(1), m.group(2).lower()
        try:
            cfg = parse_config(text, main=main, branch=branch)
        except ValueError as exc:
            if "bad configuration" in str(exc):
                raise ValueError(f"bad configuration {name!r}; grammar: {GRAMMAR}") from None
            raise
        default = "none" if not cfg.has_branch else ("svdquant" if cfg.fp16_branch else "loraq")
        if method is None:
            method = default
        elif not cfg.has_branch:
            raise ValueError(f"configuration {name!r}: -{method} needs a branch; grammar: "
                             f"{GRAMMAR}")
        elif (method == "svdquant") != cfg.fp16_branch:
            raise ValueError(f"configuration {name!r}: method {method!r} does not fit its "
                             "branch (svdquant is the +FP16 branch; lqer, loftq, naive and loraq "
                             "quantize theirs)")
        if nosmooth and not cfg.has_branch:
            raise ValueError(f"configuration {name!r}: {NOSMOOTH} applies to a recipe with a "
                             "branch, e.g. W4A4+W8A8-nosmooth")
        if nosmooth and cfg.fp16_branch:
            raise ValueError(f"configuration {name!r}: {NOSMOOTH} applies to a quantized "
                             "(LoRaQ) branch only, e.g. W4A4+W8A8-nosmooth")
        # only LoRaQ and SVDQuant smooth (the paper's pipeline); the other baselines are
        # data-free
        smooth = smoothing if method in ("loraq", "svdquant") and not nosmooth else None
        g = lambda f: None if f is None else numfmt.get(f).name  # noqa: E731
        return cls(main_weight=g(cfg.main_weight), main_act=g(cfg.main_act), method=method,
                   branch_weight=g(cfg.branch_weight), branch_act=g(cfg.branch_act),
                   rank=cfg.rank, ref_rank=ref_rank, smoothing=smooth, steps=steps, lr=lr,
                   seed=seed)

    @property
    def has_branch(self) -> bool:
        return self.method != "none"

    @property
    def fp16_branch(self) -> bool:
        return self.branch_weight == "fp16"

    @property
    def name(self) -> str:
        """The configuration name (``W4A4+W8A8``, ``W4A4+FP16r32``, ``W4A4+W8A8-nosmooth``).

        The formats' families are not part of it (see ``to_json`` for everything)."""
        s = f"W{_bits(self.main_weight)}A{_bits(self.main_act)}"
        if self.fp16_branch:
            s += "+FP16"
        elif self.has_branch:
            s += f"+W{_bits(self.branch_weight)}A{_bits(self.branch_act)}"
        if self.rank is not None:
            s += f"r{self.rank}"
        if self.method in ("lqer", "loftq", "naive"):
            s += f"-{self.method}"
        if self.has_branch and not self.fp16_branch and self.smoothing is None \
                and self.method == "loraq":
            s += NOSMOOTH
        return s

    @property
    def layer_method(self) -> str:
        """The per-layer method name of ``analysis.loraq`` (``rtn`` for none)."""
        return "rtn" if self.method == "none" else self.method

    @property
    def config(self) -> Config:
        """The ``hwsim.cost.Config`` (formats and rank) that the cost model takes."""
        g = lambda f: None if f is None else numfmt.get(f)  # noqa: E731
        return Config(self.name, g(self.main_weight), g(self.main_act), g(self.branch_weight),
                      g(self.branch_act), self.rank)

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["smoothing"] = None if self.smoothing is None else self.smoothing.to_dict()
        d["name"] = self.name
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise ValueError(f"a recipe must be a JSON object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"name"})
        if unknown:
            raise ValueError(f"recipe has unknown fields {unknown}; allowed: {sorted(fields)}")
        kw = {k: v for k, v in d.items() if k in fields}
        if kw.get("smoothing") is not None:
            s = kw["smoothing"]
            kw["smoothing"] = Smoothing(tuple(s["alphas"]), tuple(s["betas"]),
                                        s.get("criterion", "weight"))
        r = cls(**kw)
        if "name" in d and d["name"] != r.name:
            raise ValueError(f"recipe name {d['name']!r} does not match its fields ({r.name!r})")
        return r

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"recipe JSON is malformed: {exc}") from None
        return cls.from_dict(d)

    def key(self) -> str:
        """SHA-256 of the JSON: the cache key of every layer stored for this recipe."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def parse_recipes(configs, **kw) -> list[Recipe]:
    """Recipes from a comma-separated string, names, or ``Recipe`` objects (``Recipe.parse``
    keywords apply to the names). Raises ``ValueError`` for an empty list or duplicates."""
    if isinstance(configs, (str, Recipe)):
        items = [configs] if isinstance(configs, Recipe) else \
            [c.strip() for c in configs.split(",") if c.strip()]
    else:
        items = list(configs)
    if not items:
        raise ValueError(f"no configurations given; grammar: {GRAMMAR}")
    out = [c if isinstance(c, Recipe) else Recipe.parse(str(c).strip(), **kw) for c in items]
    names = [r.name for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"configurations {dup} are given more than once")
    return out
