"""What ``accelerate()`` resolves, once, before it touches the model: the method of each stage, its options and
budgets, and which stage a total target (``tokens`` / ``latency_ms`` / ``memory_gb``) steers."""

from __future__ import annotations

from dataclasses import dataclass

from .. import methods as _methods
from ..adapters import Adapter
from ..methods import Method
from .budget import Budget


def _keep_all(x, k, ctx):  # never called: the pre-LLM budget of an in-LLM-only session keeps everything
    raise RuntimeError("no pre-LLM method")


KEEP_ALL = Method("none", _keep_all)


@dataclass(frozen=True)
class Resolved:
    """A session's configuration.

    Attributes:
        name: the method string, ``"auto"`` resolved (``"visionzip+fastv"``, ``"tome_vit"`` ...).
        pre: the pre-LLM method; a tower method alone stands in for it (it selects nothing after the tower); ``None``
            when there is neither.
        llm: the in-LLM method or ``None``.
        tower: the method acting inside the vision tower or ``None``.
        options: options of the in-LLM method, else of the pre-LLM (or tower) one.
        tower_options: options of the tower method (its defaults in a composite).
        pre_budget / llm_budget: per-segment budgets of the pre-LLM method and of the in-LLM stages.
        tower_share: what leaves the tower per image / crop (``None`` without a tower method).
        steered: ``(stage name, its budget)`` of the stage a total target steers: ``"pre-LLM"``, ``"in-LLM"`` or
            ``"tower"``.
    """

    name: str
    pre: Method | None
    llm: Method | None
    tower: Method | None
    options: dict
    tower_options: dict | None
    pre_budget: Budget
    llm_budget: Budget
    tower_share: Budget | None
    steered: tuple[str, Budget]

    @property
    def selector(self) -> Method:
        """The method the pre-LLM stage runs (a keep-all stand-in when there is none)."""
        return self.pre or KEEP_ALL


def auto_method(adapter: Adapter) -> str:
    """Default per family: CLS-attention importance (VisionZip) where the vision tower has a CLS token (CLIP and
    DINOv2 LLaVA models), diversity (DivPrune) elsewhere. On the embedded default model (DINOv2) visionzip keeps
    99.6 / 99.3 / 96.8 % of full accuracy at 0.33 / 0.22 / 0.11, divprune 98.2 / 97.8 / 97.1 %
    (``eval/results/vqa_default``)."""
    try:
        has_cls = adapter.importance_layer({}) is not None
    except (KeyError, TypeError, AttributeError):
        has_cls = False
    return "visionzip" if has_cls else "divprune"


def split_method(name: str) -> tuple[Method | None, Method | None, Method | None]:
    """``"visionzip"`` / ``"fastv"`` / ``"visionzip+fastv"`` / ``"tome_vit+visionzip"`` -> (tower method, pre-LLM
    method, in-LLM method), each ``None`` when absent; ``TypeError`` / ``ValueError`` naming the registered ones."""
    if not isinstance(name, str):
        _methods.get(name)  # raises TypeError naming the methods
    found = [_methods.get(p.strip()) for p in name.split("+")]
    by = {s: [m for m in found if m.stage == s] for s in ("tower", "pre", "llm")}
    if any(len(v) > 1 for v in by.values()):
        raise ValueError(
            f"method {name!r}: combine at most one vision-tower method, one pre-LLM method and one in-LLM method, "
            f"e.g. 'visionzip+fastv' or 'tome_vit+visionzip' (tower: {_methods.names('tower')}; "
            f"pre-LLM: {_methods.names('pre')}; in-LLM: {_methods.names('llm')})"
        )
    tower, pre, llm = (by[s][0] if by[s] else None for s in ("tower", "pre", "llm"))
    if tower is not None and pre is not None and "full_grid" in pre.needs:
        raise ValueError(
            f"method {name!r}: {pre.name} needs every token of the image's grid, but {tower.name} has merged "
            "tokens inside the vision tower; combine it with a method that selects among tokens (visionzip, "
            "divprune, tome, random, relevance)"
        )
    return tower, pre, llm


def split_budget(budget: Budget, pre: Method | None, llm: Method | None) -> tuple[Budget, Budget]:
    """(budget of the pre-LLM method, budget of the in-LLM stages), each read through ``visual_quota``. A
    vision-tower method standing in for the pre-LLM one keeps everything after the tower (its own share:
    :func:`tower_share`)."""
    full = Budget(video=budget.video)
    tower_only = pre is not None and pre.stage == "tower"
    if tower_only:
        pre = None
    if llm is None:
        if budget.llm != 1.0:
            raise ValueError("Budget.llm is the in-LLM share of a composite method such as 'visionzip+fastv'")
        return (full if tower_only else budget), full
    if pre is None:
        if budget.llm != 1.0 and budget.visual != 1.0:
            raise ValueError(
                f"{llm.name} alone takes one budget: pass Budget(visual=...) (the share kept after its last stage)"
            )
        share = budget.llm if budget.llm != 1.0 else budget.visual
        return full, Budget(visual=share, video=budget.video)
    return Budget(visual=budget.visual, video=budget.video), Budget(visual=budget.llm, video=budget.video)


def tower_share(budget: Budget, tower: Method | None, alone: bool) -> Budget | None:
    """What leaves the tower per image / crop: ``Budget.visual`` for the tower method alone, ``Budget.encoder`` in a
    composite (``"tome_vit+visionzip"``, ``"tome_vit+fastv"``)."""
    if tower is None:
        if budget.encoder != 1.0:
            raise ValueError(
                "Budget.encoder is the vision tower's share in a composite method such as 'tome_vit+visionzip'"
            )
        return None
    if alone:
        if budget.encoder != 1.0:
            raise ValueError(f"{tower.name} alone takes one budget: pass Budget(visual=...) (what leaves the tower)")
        return Budget(visual=budget.visual)
    return Budget(visual=budget.encoder)


def is_full(b: Budget) -> bool:
    return b.visual == 1.0 and not isinstance(b.visual, int)


def resolve(adapter: Adapter, budget: Budget, method, method_options: dict | None) -> Resolved:
    """Validate and resolve ``accelerate``'s method arguments for ``adapter``'s model; raises ``TypeError`` /
    ``ValueError`` naming what is accepted, before anything is patched."""
    name = auto_method(adapter) if method == "auto" else method
    if isinstance(name, str) and "+" in name:
        name = "+".join(auto_method(adapter) if p.strip() == "auto" else p.strip() for p in name.split("+"))
    tower, pre, llm = split_method(name)
    pre = pre or tower  # a tower method alone stands in for the pre-LLM one
    if budget.latency_ms is not None and pre is None:
        raise ValueError(
            f"Budget(latency_ms=...) steers a pre-LLM method; {name!r} has none: use e.g. 'divprune' or "
            f"'visionzip+{name}' (the in-LLM part then spends Budget.llm)"
        )
    options = (llm or pre).resolve(method_options)
    pre_budget, llm_budget = split_budget(budget, pre, llm)
    alone = name.strip() == getattr(tower, "name", None)
    share = tower_share(budget, tower, alone)
    if tower is not None:
        depth = len(adapter.tower_spec().layers)  # ValueError for towers it cannot merge inside
        start = (options if alone else tower.resolve(None)).get("start", 0)
        if start >= depth:
            raise ValueError(f"tome_vit: start={start} but the vision tower has {depth} layers (valid: 0..{depth - 1})")
        if (budget.tokens is not None or budget.memory_gb is not None) and pre.stage == "tower":
            raise ValueError(
                f"Budget tokens / memory_gb targets steer a pre-LLM method; {name!r} has none: use e.g. "
                "'tome_vit+visionzip' (the tower then spends Budget.encoder), or latency_ms, which steers the tower"
            )
    if llm is not None:
        from ..methods.inllm import stage_layers

        stage_layers(llm.name, options, len(adapter.language_model.layers), adapter.scoring_layers)
    if pre is None and llm is not None:  # an in-LLM method alone: a total target steers its stages
        steered = ("in-LLM", llm_budget)
    elif pre is not None and pre.stage == "tower":  # a tower merge alone: latency_ms steers the tower only
        steered = ("tower", pre_budget)
    else:
        steered = ("pre-LLM", pre_budget)
    evicts = budget.kv != 1.0 or isinstance(budget.kv, int) or budget.kv_max is not None
    if evicts or budget.memory_gb is not None or budget.kv_important:
        adapter.refuse_hybrid("KV eviction (Budget kv / kv_max / memory_gb)", ("linear_attention", "sliding_attention"))
    tower_options = None
    if tower is not None:
        tower_options = options if alone else tower.resolve(None)
    return Resolved(name, pre, llm, tower, options, tower_options, pre_budget, llm_budget, share, steered)
