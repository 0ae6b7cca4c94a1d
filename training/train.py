"""Train the embedded default VLM on CPU (reproducible, seeded, resumable).

Recipe (see README.md in this folder):

1. ``cache``: render training scenes (seeded) and store the frozen DINOv2 patch features the LLaVA model itself
   computes (``vision_tower(...).hidden_states[-1][:, 1:]``, fp16) with per-patch object labels, in shards.
2. ``train``: the projector and the Llama are trained on packed multi-turn sequences — every question of an image
   plus a "Describe the image." turn, in random order, loss on the answers only — plus an auxiliary per-patch loss
   that makes each projected visual token readable by the tied word embeddings of its object's colour, shape and
   side (``logits = proj(x) @ E[words].T``). Constant LR after warm-up, linear decay over the last steps.
3. ``export``: fold the feature standardisation into the projector, write fp16 safetensors + processor.

    python -m training.train cache --n 12000
    nohup python -m training.train train --steps 3000 > /work/cache/train.log 2>&1 &   # resumes if ckpt exists
    python -m training.train export --out vlm_accel/zoo/default
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import random
import time

import torch
import torch.nn.functional as F

from vlm_accel.zoo.render import COLOR_NAMES, SHAPES, describe, questions, render_scene

log = logging.getLogger("training.train")
CACHE = os.environ.get("VLM_ACCEL_ZOO_CACHE", "/work/cache")
SHARD = 500


# ----------------------------------------------------------------------------------------------------------- cache
def cache_features(n: int, split: str = "train", out: str | None = None, init: str | None = None, start: int = 0):
    """Render scenes ``start..n-1`` of ``split`` and write feature shards ``{out}/{split}_{k:04d}.pt``.

    Each shard: ``feats`` (N, 256, 384) fp16, ``labels`` (N, 256) int8 (object index, -1 background),
    ``objects`` list of lists of (shape, color, cx, cy, size), ``seeds``.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = out or os.path.join(CACHE, "feats")
    init = init or os.path.join(CACHE, "init")
    os.makedirs(out, exist_ok=True)
    model = LlavaForConditionalGeneration.from_pretrained(init).eval()
    proc = AutoProcessor.from_pretrained(init)
    tower = model.model.vision_tower
    for k in range(start // SHARD, math.ceil(n / SHARD)):
        path = os.path.join(out, f"{split}_{k:04d}.pt")
        if os.path.exists(path):
            continue
        t0 = time.time()
        seeds = list(range(k * SHARD, min(n, (k + 1) * SHARD)))
        feats, labels, objects = [], [], []
        for i in range(0, len(seeds), 16):
            scenes = [render_scene(s, split) for s in seeds[i : i + 16]]
            pv = proc.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                hs = tower(pv, output_hidden_states=True).hidden_states[-1][:, 1:]
            feats.append(hs.to(torch.float16))
            labels += [torch.from_numpy(s.patch_labels.reshape(-1).copy()) for s in scenes]
            objects += [[(o.shape, o.color, o.cx, o.cy, o.size) for o in s.objects] for s in scenes]
        torch.save(
            {"feats": torch.cat(feats), "labels": torch.stack(labels), "objects": objects, "seeds": seeds},
            path + ".tmp",
        )
        os.replace(path + ".tmp", path)
        log.info("wrote %s (%d scenes, %.1f s)", path, len(seeds), time.time() - t0)


def load_shards(split: str = "train", root: str | None = None, limit: int | None = None):
    root = root or os.path.join(CACHE, "feats")
    paths = sorted(glob.glob(os.path.join(root, f"{split}_*.pt")))
    if limit:
        paths = paths[:limit]
    if not paths:
        raise FileNotFoundError(f"no feature shards for split {split!r} under {root}; run the 'cache' step")
    parts = [torch.load(p) for p in paths]
    return (
        torch.cat([p["feats"] for p in parts]),
        torch.cat([p["labels"] for p in parts]),
        [o for p in parts for o in p["objects"]],
    )


# ---------------------------------------------------------------------------------------------------- sequences
class _SceneView:
    """Enough of :class:`render.Scene` for :func:`render.questions` / :func:`render.describe`."""

    def __init__(self, objs):
        from vlm_accel.zoo.render import Obj

        self.objects = [Obj(*o) for o in objs]


class Packer:
    """Turn (scene, questions) into token ids + answer-only loss labels of one packed multi-turn sequence."""

    def __init__(self, tokenizer, n_image_tokens: int = 256):
        self.tok = tokenizer
        self.n_img = n_image_tokens
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]

    def pack(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """turns: [(question, answer)], the first one carries the image. Returns (input_ids, labels)."""
        ids = [self.bos]
        labels = [-100]
        for j, (q, a, *_rest) in enumerate(turns):
            user = (
                self.ids("user :")
                + ([self.image_id] * self.n_img if j == 0 else [])
                + self.ids(q)
                + self.ids("assistant :")
            )
            ans = self.ids(a) + [self.eos]
            ids += user + ans
            labels += [-100] * len(user) + ans
        return ids, labels

    def pack_segments(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int], list[int], list[int]]:
        """Independent turns sharing one image prefix: every turn sees ``<s> user : <image>×256`` and itself only.

        Returns (input_ids, labels, segment ids (0 = prefix, k = turn k), position ids). Each turn's positions
        start right after the prefix, exactly as a single question at inference time.
        """
        prefix = [self.bos] + self.ids("user :") + [self.image_id] * self.n_img
        self.img_start = len(prefix) - self.n_img
        ids, labels = list(prefix), [-100] * len(prefix)
        seg, pos = [0] * len(prefix), list(range(len(prefix)))
        self.last_rows = []  # index of the token that predicts each turn's first answer token
        self.q_starts = []  # index of each turn's first question token
        for k, (q, a, *_rest) in enumerate(turns, 1):
            user = self.ids(q) + self.ids("assistant :")
            ans = self.ids(a) + [self.eos]
            self.last_rows.append(len(ids) + len(user) - 1)
            self.q_starts.append(len(ids))
            ids += user + ans
            labels += [-100] * len(user) + ans
            seg += [k] * (len(user) + len(ans))
            pos += list(range(len(prefix), len(prefix) + len(user) + len(ans)))
        return ids, labels, seg, pos


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids (-1 pad, 0 shared prefix, k turn) → (B, 1, L, L) bool mask, True = may attend."""
    L = seg.shape[1]
    i = torch.arange(L)
    causal = i[None, :] <= i[:, None]
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    allowed = causal[None] & same & (seg[:, None, :] >= 0)
    allowed |= torch.eye(L, dtype=torch.bool)[None]  # pads attend to themselves (no empty rows)
    return allowed[:, None]


def make_turns(
    objs, rng: random.Random, max_q: int = 8, describe_p: float = 0.7, n_exists: int = 1, extra: bool = False
) -> list[tuple[str, str]]:
    """Shuffled question/answer turns of one scene (+ maybe a describe turn); the third item is the object index
    the question names (-1 if none) for the attention supervision."""
    scene = _SceneView(objs)
    qs = questions(scene, rng, n_exists=n_exists, extra=extra)
    rng.shuffle(qs)
    turns = [(q["question"], q["answer"], q.get("obj", -1)) for q in qs[:max_q]]
    if rng.random() < describe_p:
        turns.insert(rng.randint(0, len(turns)), ("Describe the image.", describe(scene), -1))
    return turns


def attention_target_loss(
    lm,
    hidden: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
    rows: list,
    targets: list,
    layer: int,
    heads: list[int],
) -> torch.Tensor:
    """-log(attention mass on the named object's patches) for chosen heads of ``layer`` at answer positions.

    hidden: (B, L, H) input of ``layer``; pos: (B, L); mask: (B, 1, L, L) bool; rows: [(b, row)]; targets: list of
    (L,) bool tensors (True on the object's image tokens), one per row.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    mod = lm.layers[layer]
    att = mod.self_attn
    hd = att.head_dim
    x = mod.input_layernorm(hidden)
    B, L, _ = x.shape
    q = att.q_proj(x).view(B, L, -1, hd).transpose(1, 2)  # (B, nh, L, hd)
    k = att.k_proj(x).view(B, L, -1, hd).transpose(1, 2)
    cos, sin = lm.rotary_emb(x, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    bi = torch.tensor([b for b, _ in rows])
    ri = torch.tensor([r for _, r in rows])
    hs = torch.tensor(heads)
    qr = q[bi][:, hs, :, :][torch.arange(len(rows)), :, ri]  # (R, nh', hd)
    kr = k[bi][:, hs]  # (R, nh', L, hd)
    scores = torch.einsum("rhd,rhld->rhl", qr.float(), kr.float()) / math.sqrt(hd)
    allowed = mask[bi, 0, ri]  # (R, L)
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    logp = scores.log_softmax(-1)
    tgt = torch.stack(targets)  # (R, L)
    mass = torch.logsumexp(logp.masked_fill(~tgt[:, None, :], float("-inf")), -1)  # (R, nh')
    return -mass.mean()


def _att_loss(lm, hidden_states, pos, mask, rows, targets, layer: int, heads: list[int], bf16: bool) -> torch.Tensor:
    """:func:`attention_target_loss` at ``layer``, targets padded to the batch length (0 without rows)."""
    if not rows:
        return torch.zeros(())
    L = mask.shape[-1]
    tg = [F.pad(m, (0, L - m.shape[0])) for m in targets]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return attention_target_loss(lm, hidden_states[layer], pos, mask, rows, tg, layer, heads)


# --------------------------------------------------------------------------------------------------------- train
def _aux_targets(labels: torch.Tensor, objects: list, word_ids: dict) -> tuple[torch.Tensor, ...]:
    """Per-patch class targets (B, 256) for colour (0-7, 8=none), shape (0-2, 3=none), side (0/1, -100 bg)."""
    B = labels.shape[0]
    col = torch.full((B, 256), len(COLOR_NAMES), dtype=torch.long)
    shp = torch.full((B, 256), len(SHAPES), dtype=torch.long)
    side = torch.full((B, 256), -100, dtype=torch.long)
    for b in range(B):
        for i, (s, c, cx, _cy, _sz) in enumerate(objects[b]):
            m = labels[b] == i
            col[b][m] = COLOR_NAMES.index(c)
            shp[b][m] = SHAPES.index(s)
            side[b][m] = 0 if cx < 0.5 else 1
    return col, shp, side


def train(args) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ckpt_dir = args.ckpt
    os.makedirs(ckpt_dir, exist_ok=True)
    proc = AutoProcessor.from_pretrained(args.init)
    model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    tok = proc.tokenizer
    packer = Packer(tok)
    feats, labels, objects = load_shards("train", limit=args.shards)
    N = feats.shape[0]
    # per-dim standardisation of the frozen features (folded into linear_1 at export)
    sub = feats[torch.randperm(N, generator=torch.Generator().manual_seed(0))[:1000]].float().reshape(-1, 384)
    mu, sd = sub.mean(0), sub.std(0) + 1e-3
    log.info("train scenes: %d", N)
    vfeats, vlabels, vobjects = load_shards("heldout")
    proj = model.model.multi_modal_projector
    lm = model.model.language_model
    emb = lm.embed_tokens
    col_ids = torch.tensor(tok.convert_tokens_to_ids(list(COLOR_NAMES) + ["none"]))
    shp_ids = torch.tensor(tok.convert_tokens_to_ids(list(SHAPES) + ["none"]))
    side_ids = torch.tensor(tok.convert_tokens_to_ids(["left", "right"]))
    name_ids = set(tok.convert_tokens_to_ids(list(COLOR_NAMES) + list(SHAPES)))
    params_proj = list(proj.parameters())
    params_lm = list(lm.parameters())
    opt = torch.optim.AdamW(
        [{"params": params_proj, "lr": args.lr * args.proj_lr_mult}, {"params": params_lm, "lr": args.lr}],
        weight_decay=0.01,
        betas=(0.9, 0.98),
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    step = 0
    ck = os.path.join(ckpt_dir, "last.pt")
    src = ck if os.path.exists(ck) else args.from_ckpt
    if src:
        state = torch.load(src, weights_only=False)
        proj.load_state_dict(state["proj"])
        lm.load_state_dict(state["lm"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        mu, sd = state["mu"], state["sd"]
        log.info("resumed from %s at step %d", src, step)
    model.train()
    model.model.vision_tower.requires_grad_(False)
    last_save = time.time()
    t_start = time.time()
    while step < args.steps:
        rng = random.Random(f"{args.seed}-{step}")
        g = torch.Generator().manual_seed(args.seed * 100003 + step)
        idx = torch.randint(0, N, (args.batch,), generator=g)
        turns = [
            make_turns(objects[i], rng, args.max_q, args.describe_p, args.n_exists, args.extra) for i in idx.tolist()
        ]
        att_rows, att_tgts, color_rows, copy_rows, copy_tgts, sh_rows, sh_tgts = [], [], [], [], [], [], []
        if args.segments:
            seqs = []
            for b, (t, i) in enumerate(zip(turns, idx.tolist(), strict=True)):
                seqs.append(packer.pack_segments(t))
                for (q, a, obj), row, q0 in zip(t, packer.last_rows, packer.q_starts, strict=True):
                    if args.copy > 0:  # the answer position must read the question's colour / shape words
                        named = [q0 + j for j, tid in enumerate(packer.ids(q)) if tid in name_ids]
                        if named:
                            m = torch.zeros(len(seqs[-1][0]), dtype=torch.bool)
                            m[named] = True
                            copy_rows.append((b, row))
                            copy_tgts.append(m)
                    words = q.lower().replace("?", " ").split()
                    shape = next((w for w in words if w in SHAPES), None)
                    if args.shape_head is not None and shape is not None:  # every object of the named shape
                        hits = [k for k, o in enumerate(objects[i]) if o[0] == shape]
                        if hits:
                            m = torch.zeros(len(seqs[-1][0]), dtype=torch.bool)
                            m[packer.img_start : packer.img_start + 256] = torch.isin(labels[i], torch.tensor(hits))
                            sh_rows.append((b, row))
                            sh_tgts.append(m)
                    is_color = a in COLOR_NAMES
                    shape_only = not any(w in COLOR_NAMES for w in q.lower().replace("?", " ").split())
                    if is_color:
                        color_rows.append((b, row + 1))
                    if obj >= 0 and args.att > 0:
                        m = torch.zeros(len(seqs[-1][0]), dtype=torch.bool)
                        m[packer.img_start : packer.img_start + 256] = labels[i] == obj
                        reps = args.shape_att_rep if shape_only else 1
                        for _ in range(reps):
                            att_rows.append((b, row))
                            att_tgts.append(m)
        else:
            seqs = [(*packer.pack(t), None, None) for t in turns]
        L = max(len(s[0]) for s in seqs)
        input_ids = torch.full((args.batch, L), tok.pad_token_id)
        tgt = torch.full((args.batch, L), -100)
        attn = torch.zeros((args.batch, L), dtype=torch.long)
        seg = torch.full((args.batch, L), -1)
        pos = torch.zeros((args.batch, L), dtype=torch.long)
        for b, (ids, lab, sg, ps) in enumerate(seqs):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            tgt[b, : len(lab)] = torch.tensor(lab)
            attn[b, : len(ids)] = 1
            if sg is not None:
                seg[b, : len(sg)] = torch.tensor(sg)
                pos[b, : len(ps)] = torch.tensor(ps)
        if args.segments:
            lm_kwargs = {"attention_mask": segment_mask(seg), "position_ids": pos}
        else:
            lm_kwargs = {"attention_mask": attn}
        # warm-up, constant, linear decay over the last `decay` steps
        f = min(1.0, (step + 1) / args.warmup)
        if step > args.steps - args.decay:
            f *= max(0.05, (args.steps - step) / args.decay)
        for gr, base in zip(opt.param_groups, base_lrs, strict=True):
            gr["lr"] = base * f
        x = (feats[idx].float() - mu) / sd  # (B, 256, 384)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            v = proj(x)  # (B, 256, H)
            emb_in = emb(input_ids)
            img_mask = input_ids == model.config.image_token_index
            emb_in = emb_in.masked_scatter(img_mask[..., None], v.to(emb_in.dtype))
            out = lm(inputs_embeds=emb_in, output_hidden_states=True, **lm_kwargs)
            logits = model.lm_head(out.last_hidden_state[:, :-1])
        logits = logits.float()
        v = v.float()
        wts = torch.ones(tgt.shape)
        for b, r in color_rows:  # up-weight the colour answers (the hardest retrieval: by shape name only)
            wts[b, r] = args.color_w
        wts = wts[:, 1:] * (tgt[:, 1:] != -100)
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
        )
        loss_qa = (ce * wts.reshape(-1)).sum() / wts.sum()
        loss = loss_qa
        if args.aux > 0:
            col, shp, side = _aux_targets(labels[idx], [objects[i] for i in idx.tolist()], {})
            W = emb.weight
            la = (
                F.cross_entropy((v @ W[col_ids].T).reshape(-1, len(col_ids)), col.reshape(-1))
                + F.cross_entropy((v @ W[shp_ids].T).reshape(-1, len(shp_ids)), shp.reshape(-1))
                + F.cross_entropy((v @ W[side_ids].T).reshape(-1, 2), side.reshape(-1), ignore_index=-100)
            )
            loss = loss + args.aux * la
        hs, amask = out.hidden_states, lm_kwargs["attention_mask"]
        loss_att = _att_loss(lm, hs, pos, amask, att_rows, att_tgts, args.att_layer, args.att_heads, args.bf16)
        loss_copy = _att_loss(lm, hs, pos, amask, copy_rows, copy_tgts, args.copy_layer, args.copy_heads, args.bf16)
        loss_shape = _att_loss(lm, hs, pos, amask, sh_rows, sh_tgts, args.att_layer, [args.shape_head], args.bf16)
        loss = loss + args.att * loss_att + args.copy * loss_copy + args.shape_w * loss_shape
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_proj + params_lm, 1.0)
        opt.step()
        step += 1
        if args.reload_every and step % args.reload_every == 0 and not args.shards:
            n_avail = len(glob.glob(os.path.join(CACHE, "feats", "train_*.pt")))
            if n_avail * SHARD > N:
                feats, labels, objects = load_shards("train")
                N = feats.shape[0]
                log.info("reloaded shards: %d train scenes", N)
        if step % 10 == 0:
            el = time.time() - t_start
            log.info(
                "step %d loss %.4f qa %.4f att %.4f copy %.4f shape %.4f lr %.2e  %.2f s/step",
                step,
                loss.item(),
                loss_qa.item(),
                loss_att.item(),
                loss_copy.item(),
                loss_shape.item(),
                opt.param_groups[1]["lr"],
                el / 10,
            )
            t_start = time.time()
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate_cached(model, packer, vfeats, vobjects, mu, sd, n=args.eval_n)
            log.info("eval step %d: %s", step, " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
            model.train()
        if time.time() - last_save > args.save_every or step == args.steps:
            state = {
                "proj": proj.state_dict(),
                "lm": lm.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "mu": mu,
                "sd": sd,
                "args": vars(args),
            }
            torch.save(state, ck + ".tmp")
            os.replace(ck + ".tmp", ck)
            last_save = time.time()
            log.info("saved %s at step %d", ck, step)


@torch.no_grad()
def evaluate_cached(model, packer: Packer, feats, objects, mu, sd, n: int = 400) -> dict[str, float]:
    """Teacher-forced single-question accuracy (first answer token argmax) on cached held-out scenes."""
    model.eval()
    rng = random.Random("eval")
    lm = model.model.language_model
    items = []
    for i in range(feats.shape[0]):
        qs = questions(_SceneView(objects[i]), rng)
        q = rng.choice(qs)
        items.append((i, q))
        if len(items) >= n:
            break
    hits: dict[str, list[int]] = {}
    for s in range(0, len(items), 50):
        chunk = items[s : s + 50]
        seqs = [packer.pack([(q["question"], "")]) for _, q in chunk]
        seqs = [ids[:-1] for ids, _ in seqs]  # drop the eos: prompt ends with "assistant :"
        L = max(len(x) for x in seqs)
        ids = torch.full((len(chunk), L), packer.tok.pad_token_id)
        attn = torch.zeros((len(chunk), L), dtype=torch.long)
        for b, x in enumerate(seqs):  # left pad
            ids[b, L - len(x) :] = torch.tensor(x)
            attn[b, L - len(x) :] = 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = model.model.multi_modal_projector((feats[[i for i, _ in chunk]].float() - mu) / sd)
            e = lm.embed_tokens(ids)
            e = e.masked_scatter((ids == packer.image_id)[..., None], v.to(e.dtype))
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            h = lm(inputs_embeds=e, attention_mask=attn, position_ids=pos).last_hidden_state[:, -1]
            pred = model.lm_head(h).float().argmax(-1)
        for (_, q), p in zip(chunk, pred.tolist(), strict=True):
            ok = packer.tok.convert_ids_to_tokens(p) == q["answer"]
            hits.setdefault(q["type"], []).append(int(ok))
    acc = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    acc["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return acc


# -------------------------------------------------------------------------------------------------------- export
def export(args) -> None:
    """Fold (x - mu) / sd into linear_1, save fp16 safetensors + processor to ``args.out``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(args.init)
    state = torch.load(os.path.join(args.ckpt, "last.pt"), weights_only=False)
    proj = model.model.multi_modal_projector
    proj.load_state_dict(state["proj"])
    model.model.language_model.load_state_dict(state["lm"])
    mu, sd = state["mu"], state["sd"]
    with torch.no_grad():
        w = proj.linear_1.weight  # (H, 384): W((x-mu)/sd) + b = (W/sd) x + (b - W (mu/sd))
        proj.linear_1.bias.sub_(w @ (mu / sd))
        w.div_(sd[None, :])
    model = model.to(torch.float16)
    model.config.dtype = "float16"
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    log.info("exported step %d to %s", state["step"], args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    c = sp.add_parser("cache")
    c.add_argument("--n", type=int, default=12000)
    c.add_argument("--split", default="train")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--start", type=int, default=0)
    t = sp.add_parser("train")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--proj-lr-mult", type=float, default=2.0)
    t.add_argument("--aux", type=float, default=0.3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--max-q", type=int, default=8, help="questions per packed sequence")
    t.add_argument("--n-exists", type=int, default=1, help="yes (and no) questions per image")
    t.add_argument("--describe-p", type=float, default=0.7)
    t.add_argument("--att", type=float, default=0.0, help="weight of the attention-to-named-object loss")
    t.add_argument("--att-layer", type=int, default=2)
    t.add_argument(
        "--shape-att-rep",
        type=int,
        default=2,
        help="attention-loss weight (repeats) of lookups by shape name alone (colour, left/right-by-shape)",
    )
    t.add_argument("--extra", action="store_true", help="training-only 'Is the <shape> on the left or the right?'")
    t.add_argument("--color-w", type=float, default=1.0, help="loss weight of colour answers")
    t.add_argument("--att-heads", type=int, nargs="+", default=[0, 1])
    t.add_argument(
        "--copy",
        type=float,
        default=0.0,
        help="weight of the loss that makes the answer position attend to the question's colour/shape words",
    )
    t.add_argument("--copy-layer", type=int, default=1)
    t.add_argument(
        "--shape-head",
        type=int,
        default=None,
        help="head of --att-layer trained to attend to every object of the shape the question names",
    )
    t.add_argument("--shape-w", type=float, default=0.3, help="weight of the --shape-head loss")
    t.add_argument("--copy-heads", type=int, nargs="+", default=[2, 3])
    t.add_argument("--from-ckpt", default=None, help="start from this checkpoint when --ckpt has no last.pt")
    t.add_argument(
        "--segments",
        action="store_true",
        help="independent turns (block mask, positions restart after the image) instead of a dialogue",
    )
    t.add_argument("--decay", type=int, default=400)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bf16 autocast")
    t.add_argument("--reload-every", type=int, default=100, help="rescan feature shards every N steps")
    t.add_argument("--shards", type=int, default=None)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--eval-n", type=int, default=500)
    t.add_argument("--save-every", type=float, default=180)
    t.add_argument("--ckpt", default=os.path.join(CACHE, "ckpt"))
    t.add_argument("--init", default=os.path.join(CACHE, "init"))
    e = sp.add_parser("export")
    e.add_argument("--ckpt", default=os.path.join(CACHE, "ckpt"))
    e.add_argument("--init", default=os.path.join(CACHE, "init"))
    e.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "default"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "cache":
        torch.set_num_threads(args.threads)
        cache_features(args.n, args.split, start=args.start)
    elif args.cmd == "train":
        train(args)
    else:
        export(args)


if __name__ == "__main__":
    main()
