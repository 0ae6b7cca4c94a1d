"""VisionZip-style selection: keep the tokens the vision tower attends to most, merge the rest into a few
contextual tokens."""

from __future__ import annotations

import torch

from .. import kernels
from .base import Context, Reduction, one_hot_rows, register

DOMINANT_SHARE = 54 / 64  # VisionZip's split of the quota (54 dominant + 10 contextual of 64)


def feature_attention(x: torch.Tensor) -> torch.Tensor:
    """Attention each token receives from all tokens in feature space, a CLS-free importance proxy.

    ``x`` ``[N, D]`` (or ``[B, N, D]``) -> ``[N]`` (``[B, N]``): column mean of ``softmax(xn xn^T * sqrt(D) / 4)`` on
    unit rows ``xn``, without the ``N x N`` matrix on CUDA (:func:`vlm_accel.kernels.attention_scores`).
    """
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    xb = xn if xn.dim() == 3 else xn[None]
    att = kernels.attention_scores(xb[:, None], xb[:, None], xn.shape[-1] ** 0.5 / 4.0)  # [B, N]
    return att if xn.dim() == 3 else att[0]


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
    return visionzip_batch(x[None], k, [ctx])[0]


def visionzip_batch(x: torch.Tensor, k: int, ctxs: list[Context]) -> list[Reduction]:
    """:func:`visionzip` on ``B`` segments of equal size at once: ``x`` ``[B, N, D]`` -> ``B`` reductions of ``k``.

    Only the ``k_ctx`` target columns of the remaining tokens' similarity are computed (``[R, k_ctx]``, fused with
    the arg-max on CUDA), not the ``R x R`` matrix."""
    bsz, n, d = x.shape
    dev = x.device
    if all(c.importance is not None for c in ctxs):
        imp = torch.stack([c.importance.to(dev).float() for c in ctxs])
    else:
        imp = feature_attention(x)
    k_dom = max(1, round(k * DOMINANT_SHARE)) if k > 1 else 1
    k_ctx = k - k_dom
    dom = imp.float().topk(k_dom, dim=1).indices  # [B, k_dom]
    if k_ctx == 0:
        return [Reduction(t.sort().values) for t in dom]
    rest_mask = torch.ones(bsz, n, dtype=torch.bool, device=dev)
    rest_mask.scatter_(1, dom, False)
    rest = rest_mask.nonzero()[:, 1].view(bsz, n - k_dom)  # [B, R] ascending
    step = rest.shape[1] / k_ctx
    tgt_local = (torch.arange(k_ctx, device=dev) * step).long()
    targets = rest[:, tgt_local]  # [B, k_ctx]
    x_rest = x.gather(1, rest[..., None].expand(-1, -1, d))
    _, assign = kernels.sim_argmax(x_rest, x_rest[:, tgt_local])  # [B, R]: most similar target
    assign[:, tgt_local] = torch.arange(k_ctx, device=dev)  # a target belongs to itself
    w_ctx = torch.zeros(bsz, k_ctx, n, device=dev)
    w_ctx[torch.arange(bsz, device=dev)[:, None], assign, rest] = 1.0
    w_ctx = w_ctx / w_ctx.sum(2, keepdim=True)
    out = []
    for s in range(bsz):
        keep = torch.cat([dom[s], targets[s]])
        weights = torch.cat([one_hot_rows(dom[s], n), w_ctx[s]])
        keep, order = keep.sort()
        out.append(Reduction(keep, weights[order]))
    return out
