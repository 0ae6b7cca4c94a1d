"""VisionZip-style selection: keep the tokens the vision tower attends to most, merge the rest into a few
contextual tokens."""

from __future__ import annotations

import torch

from .base import Context, Reduction, cosine_sim, one_hot_rows, register

DOMINANT_SHARE = 54 / 64  # VisionZip's split of the quota (54 dominant + 10 contextual of 64)


def feature_attention(x: torch.Tensor) -> torch.Tensor:
    """Attention each token receives from all tokens in feature space, a CLS-free importance proxy.

    ``x`` ``[N, D]`` -> ``[N]``: column mean of ``softmax(x x^T / sqrt(D))`` on normalised features.
    """
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    att = torch.softmax(xn @ xn.T * (xn.shape[-1] ** 0.5) / 4.0, dim=-1)
    return att.mean(0)


@register("visionzip", needs=("importance",), description="top vision-attention tokens + merged context (VisionZip)")
def visionzip(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """``x`` ``[N, D]`` -> ``k`` tokens: ``~84%`` dominant by importance, the rest contextual merges.

    Importance is the vision tower's CLS attention when the adapter provides it, else :func:`feature_attention`.
    Contextual tokens: evenly spaced targets among the remaining tokens; every other remaining token is averaged
    into its most similar target.

    Deviations from the authors' code (a side-by-side run on the same 576 / 2,880 tokens selects the same dominant
    set): (1) a contextual token is the *mean* of its group (target included, weights sum to 1); VisionZip adds the
    target to its members' mean (weights sum to 2). (2) We merge the features *after* the projector, with cosine
    similarity on those features; VisionZip merges CLIP hidden states before the projector, matching on attention
    keys. Why: a reducer here is a pure function of what ``get_image_features`` returns, the same for every family
    (Qwen's patch merger, anyres crops, DINOv2 towers have no common pre-projector hook or keys), and after the
    projector a weight sum of 2 would give the merged token twice the norm of a real one, off the distribution the
    LLM was trained on; the mean keeps it on the scale of the tokens it replaces. (3) Targets are spaced ``R / k_ctx``
    apart over all ``R`` remaining tokens; VisionZip's ``R // k_ctx`` leaves the tail without targets.
    """
    n = x.shape[0]
    imp = ctx.importance if ctx.importance is not None else feature_attention(x)
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
    sim = cosine_sim(x[rest])[:, tgt_local]  # [R, k_ctx]
    assign = sim.argmax(1)
    assign[tgt_local] = torch.arange(k_ctx, device=x.device)  # a target belongs to itself
    w_ctx = torch.zeros(k_ctx, n, device=x.device)
    w_ctx[assign, rest] = 1.0
    w_ctx = w_ctx / w_ctx.sum(1, keepdim=True)
    keep = torch.cat([dom, targets])
    weights = torch.cat([one_hot_rows(dom, n), w_ctx])
    keep, order = keep.sort()
    return Reduction(keep, weights[order])
