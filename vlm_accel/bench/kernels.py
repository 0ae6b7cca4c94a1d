"""Selection time per method: the current reducers (batched over segments, kernels on CUDA) against the previous
implementation (one Python call per segment, full similarity matrices), and against one 7B-width decoder layer's
fp32 prefill over the same number of tokens.

Inputs, at budget 0.11 (LLaVA-1.5's 64 of 576), feature width ``D`` in ``--dims``:

- 576 tokens: one image (24 x 24);
- 2,880 tokens: anyres, a base view of 24 x 24 and the 2 x 2 crops as one 48 x 48 segment (as the LLaVA-NeXT
  adapter splits them);
- 23,040 tokens: a 32-frame video of 24 x 30 per frame, one segment per frame (``temporal``: the whole clip, with
  60 % of the positions static across frames).

Every time is a median over ``--repeats`` runs in one process with one thread. Run::

    python -m vlm_accel.bench.kernels --out eval/results --name kernels_cpu

or ``vlm-accel bench kernels`` (same options). Writes ``NAME.json`` / ``NAME.csv`` (rows + the machine: CPU model,
matrix extensions, cores, load) and ``NAME.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ..methods import Context, get
from ..methods.base import one_hot_rows
from ..methods.batch import reduce_segments
from .common import environment, format_table, run_main, write_results

logger = logging.getLogger(__name__)

BUDGET = 0.11
CASES = {  # total tokens -> (label, grid (h, w) of every segment), as the LLaVA adapters split them
    576: ("image", [(24, 24)]),
    2880: ("anyres", [(24, 24), (48, 48)]),  # base view + the 2 x 2 crops as one segment
    23040: ("video", [(24, 30)] * 32),  # one segment per frame
}
METHODS = ("divprune", "visionzip", "visionzip-feat", "tome", "relevance", "temporal", "pool", "random")
MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


# --- the previous implementations (commit 5196abe), kept verbatim for the comparison and the equality tests -------
def legacy_cosine_sim(x: torch.Tensor) -> torch.Tensor:
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    return xn @ xn.T


def legacy_max_min_diverse(x: torch.Tensor, k: int, init: torch.Tensor | None = None) -> torch.Tensor:
    dist = 1.0 - legacy_cosine_sim(x)  # [N, N]
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    if init is not None and init.numel():
        min_d = dist[init].min(0).values
        min_d[init] = -torch.inf
        start = 0
    else:
        chosen[0] = dist.mean(1).argmax()
        min_d = dist[chosen[0]].clone()
        min_d[chosen[0]] = -torch.inf
        start = 1
    for i in range(start, k):
        chosen[i] = min_d.argmax()
        min_d = torch.minimum(min_d, dist[chosen[i]])
        min_d[chosen[i]] = -torch.inf
    return chosen


def legacy_divprune(x: torch.Tensor, k: int, ctx: Context):
    from ..methods import Reduction

    return Reduction(legacy_max_min_diverse(x, k).sort().values)


def legacy_feature_attention(x: torch.Tensor) -> torch.Tensor:
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    att = torch.softmax(xn @ xn.T * (xn.shape[-1] ** 0.5) / 4.0, dim=-1)
    return att.mean(0)


def legacy_visionzip(x: torch.Tensor, k: int, ctx: Context):
    from ..methods import Reduction
    from ..methods.importance import DOMINANT_SHARE

    n = x.shape[0]
    imp = ctx.importance if ctx.importance is not None else legacy_feature_attention(x)
    k_dom = max(1, round(k * DOMINANT_SHARE)) if k > 1 else 1
    k_ctx = k - k_dom
    dom = imp.to(x.device).float().topk(k_dom).indices
    if k_ctx == 0:
        return Reduction(dom.sort().values)
    rest_mask = torch.ones(n, dtype=torch.bool, device=x.device)
    rest_mask[dom] = False
    rest = rest_mask.nonzero().squeeze(1)
    step = rest.numel() / k_ctx
    tgt_local = (torch.arange(k_ctx, device=x.device) * step).long()
    targets = rest[tgt_local]
    sim = legacy_cosine_sim(x[rest])[:, tgt_local]  # [R, k_ctx]
    assign = sim.argmax(1)
    assign[tgt_local] = torch.arange(k_ctx, device=x.device)
    w_ctx = torch.zeros(k_ctx, n, device=x.device)
    w_ctx[assign, rest] = 1.0
    w_ctx = w_ctx / w_ctx.sum(1, keepdim=True)
    keep = torch.cat([dom, targets])
    weights = torch.cat([one_hot_rows(dom, n), w_ctx])
    keep, order = keep.sort()
    return Reduction(keep, weights[order])


def legacy_tome(x: torch.Tensor, k: int, ctx: Context):
    from ..methods import Reduction

    n = x.shape[0]
    members = torch.eye(n, device=x.device)
    rep = torch.arange(n, device=x.device)
    xf = x.float()
    while rep.numel() > k:
        m = rep.numel()
        size = members.sum(1, keepdim=True)
        feats = torch.nn.functional.normalize(members @ xf / size, dim=-1)
        a, b = torch.arange(0, m, 2, device=x.device), torch.arange(1, m, 2, device=x.device)
        r = min(m - k, max(1, a.numel() // 2))
        score, match = (feats[a] @ feats[b].T).max(1)
        order = score.argsort(descending=True)
        src, dst = a[order[:r]], b[match[order[:r]]]
        members = members.index_add(0, dst, members[src])
        alive = torch.ones(m, dtype=torch.bool, device=x.device)
        alive[src] = False
        members, rep = members[alive], rep[alive]
    order = rep.argsort()
    members = members[order]
    return Reduction(rep[order], members / members.sum(1, keepdim=True))


def legacy_temporal_runs(x: torch.Tensor, frames: int, tau: float = 0.9, runs: int = 0) -> torch.Tensor:
    p = x.shape[0] // frames
    xs = torch.nn.functional.normalize(x.float().view(frames, p, -1), dim=-1)
    starts = torch.ones(frames, p, dtype=torch.bool, device=x.device)
    sim = (xs[1:] * xs[:-1]).sum(-1)
    starts[1:] = sim <= tau
    spare = runs - p - int(starts[1:].sum())
    if spare > 0:  # the least similar links still standing, ties in frame order
        order = torch.sort(sim.masked_fill(starts[1:], float("inf")).flatten(), stable=True).indices[:spare]
        starts[1:].view(-1)[order] = True
    run_first = torch.arange(frames * p, device=x.device).view(frames, p)
    for t in range(1, frames):
        run_first[t] = torch.where(starts[t], run_first[t], run_first[t - 1])
    _, run_id = torch.unique(run_first.view(-1), sorted=True, return_inverse=True)
    return run_id


def legacy_temporal(x: torch.Tensor, k: int, ctx: Context):
    from ..methods import Reduction

    n = x.shape[0]
    if ctx.frames < 2 or n % ctx.frames:
        return legacy_tome(x, k, ctx)
    run_id = legacy_temporal_runs(x, ctx.frames, runs=k)
    runs = int(run_id.max()) + 1
    members = torch.zeros(runs, n, device=x.device)
    members[run_id, torch.arange(n, device=x.device)] = 1.0
    first = members.argmax(1)
    run_w = members / members.sum(1, keepdim=True)
    if runs <= k:
        return Reduction(first, run_w)
    sub = legacy_tome(run_w @ x.float(), k, Context())
    weights = sub.weights @ members
    return Reduction(first[sub.keep], weights / weights.sum(1, keepdim=True))


def legacy_relevance(x: torch.Tensor, k: int, ctx: Context):
    from ..methods import Reduction

    if ctx.query is None or ctx.query.numel() == 0:
        return legacy_divprune(x, k, ctx)
    k_rel = min(k, math.ceil(k * 0.5))
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    qn = torch.nn.functional.normalize(ctx.query.float().to(x.device), dim=-1)
    rel = (xn @ qn.T).max(1).values.topk(k_rel).indices
    if k_rel == k:
        return Reduction(rel.sort().values)
    rest = legacy_max_min_diverse(x, k - k_rel, init=rel)
    return Reduction(torch.cat([rel, rest]).sort().values)


LEGACY = {
    "divprune": legacy_divprune,
    "visionzip": legacy_visionzip,
    "tome": legacy_tome,
    "temporal": legacy_temporal,
    "relevance": legacy_relevance,
}


# --- machine ------------------------------------------------------------------------------------------------------
def cpu_info() -> dict:
    """CPU model, its matrix / vector extensions, cores usable here, and the load average (other work on the box)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": model,
        "cpu_extensions": [f for f in MATRIX_FLAGS if f in flags],
        "cores": cores,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# --- inputs -------------------------------------------------------------------------------------------------------
def make_segments(total: int, d: int, seed: int = 0) -> tuple[list[torch.Tensor], list[tuple[int, int]], int]:
    """Segments of one case: ``(xs [S x [h*w, D]], grids, frames)``. Video frames share 60 % static positions."""
    label, grids = CASES[total]
    g = torch.Generator().manual_seed(seed)
    if label != "video":
        return [torch.randn(h * w, d, generator=g) for h, w in grids], grids, 1
    h, w = grids[0]
    p = h * w
    base = torch.randn(p, d, generator=g)
    static = torch.rand(p, generator=g) < 0.6
    frames = []
    for _ in grids:
        moving = torch.randn(p, d, generator=g)
        frames.append(torch.where(static[:, None], base + 0.05 * torch.randn(p, d, generator=g), moving))
    return frames, grids, len(grids)


def contexts(xs: list[torch.Tensor], grids, name: str, query: torch.Tensor) -> list[Context]:
    g = torch.Generator().manual_seed(0)
    return [
        Context(
            grid=grid,
            importance=None if name == "visionzip-feat" else torch.rand(x.shape[0], generator=g),
            query=query,
            generator=torch.Generator().manual_seed(i),
        )
        for i, (x, grid) in enumerate(zip(xs, grids, strict=True))
    ]


# --- timing -------------------------------------------------------------------------------------------------------
def median_time(fn, repeats: int, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def selection_runs(name: str, total: int, d: int, device: str = "cpu"):
    """``(new, old)`` zero-argument callables for one method on one case (``old`` is ``None`` when unchanged)."""
    xs, grids, frames = make_segments(total, d)
    xs = [x.to(device) for x in xs]
    query = torch.randn(20, d, generator=torch.Generator().manual_seed(1)).to(device)
    method = get("visionzip" if name == "visionzip-feat" else name)
    legacy = LEGACY.get(method.name)
    if name == "temporal":
        if frames < 2:
            return None, None
        clip = torch.cat(xs)
        k = max(1, round(BUDGET * clip.shape[0]))
        ctx = Context(grid=grids[0], frames=frames)
        return (lambda: method(clip, k, ctx)), (lambda: legacy(clip, k, ctx))
    ks = [max(1, round(BUDGET * x.shape[0])) for x in xs]
    ctxs = contexts(xs, grids, name, query)
    for c in ctxs:
        c.importance = None if c.importance is None else c.importance.to(device)

    def new():
        return reduce_segments(method, xs, ks, ctxs)

    def old():
        return [legacy(x, k, c) for x, k, c in zip(xs, ks, ctxs, strict=True)]

    return new, (old if legacy is not None else None)


def decoder_layer_time(total: int, repeats: int = 1, device: str = "cpu") -> float:
    """One LLaMA-7B-width decoder layer (hidden 4096, MLP 11008, 32 heads, SDPA) fp32 prefill over ``total`` tokens."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=1
    )
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).eval().to(device)
    rope = LlamaRotaryEmbedding(cfg).to(device)
    h = torch.randn(1, total, 4096, device=device) * 0.02
    pos = torch.arange(total, device=device)[None]
    with torch.no_grad():
        pe = rope(h, pos)

        def run():
            return layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)

        run()  # warm up
        return median_time(run, repeats, device)


def run(
    out_dir: str | Path = "eval/results",
    name: str = "kernels_cpu",
    totals: tuple[int, ...] = (576, 2880, 23040),
    dims: tuple[int, ...] = (1024, 4096),
    methods: tuple[str, ...] = METHODS,
    repeats: int = 3,
    old_repeats: int = 1,
    skip_old: tuple[str, ...] = (),
    layer: bool = True,
    device: str = "cpu",
    layer_from: str | None = None,
) -> list[dict]:
    """Measure and write ``NAME.json`` / ``.csv`` / ``.png`` under ``out_dir``; returns the rows.

    ``skip_old``: ``"method@tokens@dim"`` entries whose previous implementation is not run (too slow / too large).
    ``layer_from``: a JSON file with ``{"layer_s": {tokens: seconds}}`` (an earlier measurement on the same machine)
    instead of measuring the decoder layer again (23,040 tokens take minutes)."""
    torch.set_num_threads(1)
    machine_start = cpu_info()
    from .. import kernels

    layer_s = {}
    if layer_from:
        layer_s = {int(t): float(v) for t, v in json.loads(Path(layer_from).read_text())["layer_s"].items()}
    elif layer:
        for total in totals:
            layer_s[total] = decoder_layer_time(total, device=device)
            logger.info("decoder layer, %d tokens: %.3f s", total, layer_s[total])
    rows = []
    for d in dims:
        for total in totals:
            for method in methods:
                new, old = selection_runs(method, total, d, device)
                if new is None:
                    continue
                new()  # warm up (first-call allocations)
                t_new = median_time(new, repeats, device)
                t_old = None
                if old is not None and f"{method}@{total}@{d}" not in skip_old:
                    t_old = median_time(old, old_repeats, device)
                row = {
                    "method": method,
                    "tokens": total,
                    "case": CASES[total][0],
                    "dim": d,
                    "new_s": t_new,
                    "old_s": t_old,
                    "speedup": None if t_old is None else t_old / t_new,
                    "layer_s": layer_s.get(total),
                    "new_per_layer": None if total not in layer_s else t_new / layer_s[total],
                }
                rows.append(row)
                logger.info("%s", row)
    meta = {
        "command": " ".join([Path(sys.executable).name, "-m", "vlm_accel.bench.kernels", *sys.argv[1:]]),
        "what": "selection time per method (new: batched reducers, kernels on CUDA else torch references; old: "
        "previous per-segment reducers) vs one 7B-width decoder layer fp32 prefill (SDPA) on the same tokens; "
        f"budget {BUDGET}; median of {repeats} (new) / {old_repeats} (old) runs, 1 thread",
        "backend": "triton" if device.startswith("cuda") and kernels.triton_available() else "torch reference",
        "environment": environment(device),
        "machine": {**machine_start, "loadavg_1m_end": os.getloadavg()[0]},
        "layer_from": layer_from,
    }
    path = write_results(out_dir, name, meta, rows)
    plot(rows, Path(out_dir) / f"{name}.png", meta)
    logger.info("wrote %s", path)
    return rows


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    """Per feature width: selection time (new, old) per method and case, log scale, with the decoder layer's time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["dim"] for r in rows})
    totals = sorted({r["tokens"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(dims), figsize=(7 * len(dims), 4.5), squeeze=False, sharey=True)
    width = 0.8 / (2 * len(names))
    colours = plt.get_cmap("tab10")
    for ax, d in zip(axes[0], dims, strict=True):
        labelled = set()
        for j, name in enumerate(names):
            for i, total in enumerate(totals):
                r = next((r for r in rows if r["dim"] == d and r["tokens"] == total and r["method"] == name), None)
                if r is None:
                    continue
                x = i + (2 * j - len(names)) * width
                ax.bar(x, r["new_s"], width, color=colours(j), label=None if name in labelled else name)
                labelled.add(name)
                if r["old_s"] is not None:
                    ax.bar(x + width, r["old_s"], width, color=colours(j), alpha=0.35, hatch="//")
        for i, total in enumerate(totals):
            lt = next((r["layer_s"] for r in rows if r["tokens"] == total and r["layer_s"]), None)
            if lt:
                ax.hlines(lt, i - 0.45, i + 0.45, colors="black", linestyles="--")
        ax.set_xticks(range(len(totals)), [f"{t:,} ({CASES[t][0]})" for t in totals])
        ax.set_yscale("log")
        ax.set_title(f"D = {d}: new (solid) vs old (hatched); dashed: one 7B layer prefill")
        ax.set_ylabel("seconds (1 thread)")
    axes[0][0].legend(fontsize=8, ncol=2)
    m = meta["machine"]
    fig.suptitle(f"{m['cpu_model']} ({', '.join(m['cpu_extensions'])}), {m['cores']} cores, {meta['backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="eval/results", help="output directory")
    p.add_argument("--name", default="kernels_cpu", help="base name of the result files")
    p.add_argument("--tokens", type=int, nargs="+", default=[576, 2880, 23040], choices=sorted(CASES))
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=3, help="runs per new measurement (median)")
    p.add_argument("--old-repeats", type=int, default=1, help="runs per old measurement (median)")
    p.add_argument("--skip-old", nargs="*", default=[], help="METHOD@TOKENS@DIM whose old implementation is not run")
    p.add_argument("--no-layer", action="store_true", help="skip the decoder-layer reference")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU times are synchronised)")
    p.add_argument("--layer-from", default=None, help='JSON {"layer_s": {tokens: s}}: reuse decoder-layer times')


def cli(a: argparse.Namespace) -> int:
    """Entry point for ``vlm-accel bench kernels``."""
    rows = run(
        a.out, a.name, tuple(a.tokens), tuple(a.dims), tuple(a.methods), a.repeats, a.old_repeats,
        tuple(a.skip_old), not a.no_layer, a.device, a.layer_from,
    )  # fmt: skip
    cols = ["method", "case", "dim", "new_s", "old_s", "speedup", "new_per_layer"]
    print(format_table(rows, cols))  # noqa: T201  (the command's output)
    return 0


def main(argv=None) -> int:
    return run_main(__doc__, add_arguments, cli, argv)


if __name__ == "__main__":
    sys.exit(main())
