"""The reducer interface: a method is a pure function of tensors.

A method receives the visual tokens of one *segment* (an image, a crop or a frame) and a token quota ``k``, and
returns a :class:`Reduction`: the indices of the tokens that stay (each keeps its original position) and, for
merging methods, the weights that combine the segment's tokens into the kept ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Context:
    """Evidence a method may use for one segment.

    Attributes:
        grid: ``(h, w)`` spatial layout of one frame's tokens in raster order, or ``None`` when unknown.
        frames: number of frames the segment spans (tokens are frame-major: ``[frames * h * w]``).
        importance: ``[N]`` importance per token from the vision tower (e.g. CLS attention), or ``None``.
        query: ``[T, D]`` text-token embeddings of the prompt row the segment belongs to, or ``None``.
        generator: random generator for stochastic methods (seeded by the session, so runs are reproducible).
    """

    grid: tuple[int, int] | None = None
    frames: int = 1
    importance: torch.Tensor | None = None
    query: torch.Tensor | None = None
    generator: torch.Generator | None = None


@dataclass
class Reduction:
    """Result of a method on one segment of ``N`` tokens.

    Attributes:
        keep: ``[K]`` ascending indices of the kept tokens (each keeps its original position).
        weights: ``[K, N]`` rows that mix the segment's tokens into each kept token (rows sum to 1), or ``None``
            for pure selection. ``new_features = weights @ features``.
    """

    keep: torch.Tensor
    weights: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, D]`` -> ``[K, D]`` (kept or merged features)."""
        if self.weights is None:
            return x[self.keep]
        return (self.weights.float() @ x.float()).to(x.dtype)


MethodFn = Callable[[torch.Tensor, int, Context], Reduction]


@dataclass(frozen=True)
class Option:
    """One documented option of a method: its default, a check, and a line for listings."""

    default: object
    doc: str
    check: Callable[[object], bool] = lambda v: True


@dataclass
class Method:
    """A registered method of one pipeline stage.

    ``stage`` says where it acts: ``"tower"`` inside the vision tower (``fn`` is never called: the tower merge runs
    it, :mod:`vlm_accel.tower.merge`), ``"pre"`` between the vision tower and the LLM (``fn(x [N, D], k, ctx) ->
    Reduction``), ``"llm"`` inside the LLM (the same reducer, with ``ctx.importance`` the attention the tokens receive
    in the LLM; run by :mod:`vlm_accel.llm.stages`), ``"kv"`` a KV-cache press (``fn`` is the press class, run by
    :mod:`vlm_accel.kv.compress`; chosen with ``accelerate(kv_press=name)``). ``needs`` names the evidence the
    adapter must collect (``"importance"``; ``"query"``; ``"clip"`` = a whole video clip as one segment, not frame by
    frame; ``"full_grid"`` = every token of a segment's grid, so it cannot follow a merge inside the tower);
    ``exact=False`` lets a method keep fewer tokens than its quota (``tome_vit``, whose layers decide the count);
    ``description`` is one line for listings; ``options`` are what ``method_options=`` may set.
    """

    name: str
    fn: MethodFn
    needs: frozenset[str] = field(default_factory=frozenset)
    description: str = ""
    exact: bool = True
    stage: str = "pre"
    options: dict[str, Option] = field(default_factory=dict)

    def resolve(self, given: dict | None) -> dict:
        """Defaults updated by ``given``; unknown names or bad values -> ``ValueError`` naming the valid ones."""
        if given is not None and not isinstance(given, dict):
            raise TypeError(
                f"method_options must be a dict of option names to values, e.g. {{'layer': 2}}; got "
                f"{type(given).__name__} {given!r} (options of {self.name!r}: {sorted(self.options) or 'none'})"
            )
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = ", ".join(f"{k} ({o.doc})" for k, o in self.options.items()) or "none"
            raise ValueError(f"method {self.name!r} has no option(s) {unknown}; valid options: {valid}")
        out = {k: o.default for k, o in self.options.items()}
        for k, v in given.items():
            if not self.options[k].check(v):
                raise ValueError(f"method {self.name!r}: bad value {v!r} for option {k!r} ({self.options[k].doc})")
            out[k] = v
        return out

    def __call__(self, x: torch.Tensor, k: int, ctx: Context) -> Reduction:
        n = x.shape[0]
        if k >= n:
            return Reduction(torch.arange(n, device=x.device))
        red = self.fn(x, k, ctx)
        got = red.keep.numel()
        if got > k or (self.exact and got != k) or got == 0:
            raise RuntimeError(f"method {self.name!r} returned {got} tokens for a quota of {k}")
        return red


_REGISTRY: dict[str, Method] = {}

#: The pipeline's stages, in order, with what a listing calls them.
STAGES = {
    "tower": "inside the vision tower",
    "pre": "between the vision tower and the LLM",
    "llm": "inside the LLM",
    "kv": "KV-cache press (accelerate(..., kv_press=NAME) with Budget(kv=..., kv_max=...))",
}
#: The stages whose methods ``accelerate(method=...)`` takes (KV presses go to ``kv_press=``).
METHOD_STAGES = ("tower", "pre", "llm")


def register(
    name: str,
    *,
    needs: tuple[str, ...] = (),
    description: str = "",
    exact: bool = True,
    stage: str = "pre",
    options: dict[str, Option] | None = None,
):
    """Decorator: register ``fn`` under ``name`` for ``stage`` (a reducer ``fn(x [N, D], k, ctx) -> Reduction``;
    for ``stage="kv"`` a press class)."""

    def deco(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Method(name, fn, frozenset(needs), doc, exact, stage, dict(options or {}))
        return fn

    return deco


def get(name: str, stages: tuple[str, ...] = METHOD_STAGES) -> Method:
    """The method registered as ``name`` in one of ``stages``; ``TypeError`` / ``ValueError`` naming the valid ones."""
    valid = names(*stages)
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, one of {valid}; got {type(name).__name__}")
    if name not in valid:
        what = "KV press" if stages == ("kv",) else "method"
        raise ValueError(f"unknown {what} {name!r}; registered: {valid}" + (" (or 'auto')" if what == "method" else ""))
    return _REGISTRY[name]


def names(*stages: str) -> list[str]:
    """Registered names, in registration order, of ``stages`` (default: every stage ``accelerate(method=...)``
    takes: tower, pre-LLM, in-LLM)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
    stages = stages or METHOD_STAGES
    return [n for n, m in _REGISTRY.items() if m.stage in stages]


def stage_of(name: str) -> str:
    """The stage of a registered name (any stage)."""
    return get(name, tuple(STAGES)).stage


def cosine_sim(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, D]`` -> ``[N, N]`` cosine similarity in fp32."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    return xn @ xn.T


def one_hot_rows(keep: torch.Tensor, n: int) -> torch.Tensor:
    """``keep`` ``[K]`` -> ``[K, n]`` selection weights."""
    w = torch.zeros(keep.numel(), n, device=keep.device)
    w[torch.arange(keep.numel(), device=keep.device), keep] = 1.0
    return w
