"""Token merging inside the vision tower (``tome_vit``): identity at budget 1.0, equality with ToMe written plainly
on the same tower, positions / generate / batch 2 for the LLaVA family, composites, and clear errors elsewhere."""

import pytest
import torch
import transformers as tf

import vlm_accel
from vlm_accel import Budget
from vlm_accel.adapters.base import encoder_layers
from vlm_accel.tower.merge import SCHEDULES, merge_schedule

import tiny

LLAVA = ["llava", "llava_next", "llava_onevision"]


def _llava(tower: str, layers: int, feature_layer: int, strategy: str, seed: int = 0):
    """A tiny LLaVA-1.5 with a ``tower`` vision encoder of ``layers`` layers (8x8 patches)."""
    torch.manual_seed(seed)
    vis = dict(tiny._VIT, num_hidden_layers=layers, model_type=tower)
    cfg = tf.LlavaConfig(
        vision_config=vis,
        text_config=dict(model_type="llama", **tiny._LLAMA),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_token_id=tiny.IMAGE_ID,
    )
    cfg._attn_implementation = cfg.text_config._attn_implementation = cfg.vision_config._attn_implementation = "sdpa"
    return tf.LlavaForConditionalGeneration(cfg).eval()


# --- ToMe written plainly: one view at a time, loops and sets --------------------------------------------------------
def _plain_attention(layer, x, size):
    """The attention half of an encoder layer (CLIP / SigLIP / DINOv2) on ``x`` ``[M, C]`` with proportional
    attention (``+ log size`` on the logits). Returns ``x + attention`` and the layer's keys ``[M, C]``."""
    norm1 = getattr(layer, "layer_norm1", None) or layer.norm1
    attn = getattr(layer, "self_attn", None) or layer.attention
    proj = getattr(attn, "out_proj", None) or attn.o_proj
    m, c = x.shape
    heads = c // attn.head_dim
    h = norm1(x)
    q, k, v = (p(h).view(m, heads, -1).transpose(0, 1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    logits = q @ k.transpose(1, 2) * attn.head_dim**-0.5 + size.log()[None, None, :]
    a = proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(m, c))
    if hasattr(layer, "layer_scale1"):
        a = layer.layer_scale1(a)
    return x + a, k.transpose(0, 1).reshape(m, c)


def _plain_mlp(layer, x):
    """The MLP half: ``x + mlp(norm2(x))``."""
    norm2 = getattr(layer, "layer_norm2", None) or layer.norm2
    f = layer.mlp(norm2(x))
    if hasattr(layer, "layer_scale2"):
        f = layer.layer_scale2(f)
    return x + f


def _plain_round(x, metric, size, groups, reps, r, prefix):
    """Fold ``r`` tokens: A = even, B = odd mergeable tokens; each A token's best B (cosine, first on ties); the
    ``r`` best-matched A tokens join their B partner as size-weighted means (features and metric); the partner
    keeps its representative (original index), the tokens stay in their order."""
    cand = list(range(prefix, x.shape[0]))
    a_set, b_set = cand[0::2], cand[1::2]
    unit = torch.nn.functional.normalize(metric, dim=-1)
    best = []
    for i in a_set:
        sims = [float(unit[i] @ unit[j]) for j in b_set]
        j = max(range(len(b_set)), key=lambda t: (sims[t], -t))
        best.append((sims[j], i, b_set[j]))
    order = sorted(range(len(best)), key=lambda t: -best[t][0])  # stable: earlier A tokens first on ties
    moved = {best[t][1]: best[t][2] for t in order[:r]}
    x, metric, size = x.clone(), metric.clone(), size.clone()
    for dst in set(moved.values()):
        srcs = [s for s, d in moved.items() if d == dst]
        members = [dst, *srcs]
        w = size[members]
        x[dst] = (w[:, None] * x[members]).sum(0) / w.sum()
        metric[dst] = (w[:, None] * metric[members]).sum(0) / w.sum()
        size[dst] = w.sum()
        for s in srcs:
            groups[dst] |= groups[s]
    stay = [i for i in range(x.shape[0]) if i not in moved]
    return x[stay], metric[stay], size[stay], [groups[i] for i in stay], [reps[i] for i in stay]


def plain_tome_tower(tower_layers, x0, feature_layer, schedule, prefix, heads):
    """ToMe on one view ``x0`` ``[T, C]`` (the tower's embeddings): in layer ``l``, between its attention and its MLP,
    merge ``schedule[l]`` tokens on the layer's keys (averaged over heads), in rounds of at most half the mergeable
    tokens. Returns the feature layer's tokens, their members (sets of original indices) and representatives."""
    x, size = x0, torch.ones(x0.shape[0])
    groups = [{i} for i in range(x0.shape[0])]
    reps = list(range(x0.shape[0]))
    for li in range(feature_layer + 1):
        x, keys = _plain_attention(tower_layers[li], x, size)
        r = schedule.get(li, 0)
        metric = keys.view(x.shape[0], heads, -1).mean(1)
        while r > 0:
            step = min(r, (x.shape[0] - prefix) // 2)
            x, metric, size, groups, reps = _plain_round(x, metric, size, groups, reps, step, prefix)
            r -= step
        x = _plain_mlp(tower_layers[li], x)
    return x, groups, reps


@pytest.mark.parametrize(
    "tower,layers,feature_layer,strategy,schedule,budget",
    [
        ("clip_vision_model", 5, -2, "default", "decreasing", 0.25),
        ("clip_vision_model", 5, -2, "default", "constant", 10),
        ("siglip_vision_model", 4, -1, "full", "front", 0.3),
        ("dinov2", 4, -1, "default", "decreasing", 0.11),
        ("dinov2", 5, -1, "default", "steep", 0.33),
        ("clip_vision_model", 6, -2, "default", "cubic", 0.2),
    ],
)
def test_tower_output_equals_plain_tome(tower, layers, feature_layer, strategy, schedule, budget):
    model = _llava(tower, layers, feature_layer, strategy)
    pv = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    vt = model.model.vision_tower
    tower_layers = list(encoder_layers(vt))
    grab = {}
    h = tower_layers[0].register_forward_pre_hook(lambda m, a, kw: grab.update(x=a[0]), with_kwargs=True)
    with torch.no_grad():
        model.model.get_image_features(pixel_values=pv)
    h.remove()
    with vlm_accel.accelerate(model, budget=budget, method="tome_vit", method_options={"schedule": schedule}) as s:
        with torch.no_grad():
            got = model.model.get_image_features(pixel_values=pv).pooler_output
        infos = s.capture.pending.infos["image"]
    prefix = 0 if tower == "siglip_vision_model" else 1
    dropped = 1 if strategy == "default" else 0
    t = grab["x"].shape[1]
    f = feature_layer % (layers + 1) - 1
    target = Budget.of(budget).visual_quota(t - dropped) - max(0, prefix - dropped)
    plan = dict(enumerate(merge_schedule(t - prefix, target, f, schedule)))
    heads = tiny._VIT["num_attention_heads"]
    for v in range(pv.shape[0]):
        with torch.no_grad():
            ref, groups, reps = plain_tome_tower(tower_layers, grab["x"][v], f, plan, prefix, heads)
            ref_feats = model.model.multi_modal_projector(ref)
        alive = torch.zeros(t, dtype=torch.bool)
        alive[reps] = True
        assert torch.equal(infos[v].alive, alive[dropped:])
        assert int(infos[v].alive.sum()) == Budget.of(budget).visual_quota(t - dropped)
        for g, rep, want in zip(groups, reps, ref_feats, strict=True):
            if rep < dropped:
                continue
            torch.testing.assert_close(got[v][rep - dropped], want, rtol=1e-4, atol=1e-5)
            for member in g:  # every position of a group holds its value (the features stay full length)
                assert torch.equal(got[v][member - dropped], got[v][rep - dropped])


@pytest.mark.parametrize("family", LLAVA)
def test_identity_at_full_budget(models, family):
    model = models(family)
    inputs = tiny.make_inputs(model, family, batch=2, seed=2)
    with torch.no_grad():
        ref = model(**inputs).logits
    with vlm_accel.accelerate(model, budget=1.0, method="tome_vit") as s, torch.no_grad():
        assert s.tower is None  # nothing is installed in the tower
        assert torch.equal(model(**inputs).logits, ref)


def _alive_tokens(info):
    """``[n_tokens]`` the alive tokens of an image's budgeted segments (structural newlines left out)."""
    seg = torch.zeros(info.n_tokens, dtype=torch.bool)
    seg[torch.cat([sg.idx for sg in info.segments])] = True
    return info.alive & seg


@pytest.mark.parametrize("budget", [0.25, 8])
@pytest.mark.parametrize("family", LLAVA)
def test_positions_generate_batch2(models, family, budget):
    """Alive tokens reach the LLM at their own positions; generate works on batch 2; each row's merge equals the
    row's merge alone; restore is exact."""
    model = models(family)
    inputs = tiny.make_inputs(model, family, batch=2, seed=4)
    with torch.no_grad():
        ref = model(**inputs).logits
    with vlm_accel.accelerate(model, budget=budget, method="tome_vit") as s, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        s.capture.clear()
        model(**inputs)
        tr = s.trace
        kept = s.stats.visual_tokens_kept
        s.capture.clear()
        feats = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
        model.model.get_image_features(**feats)
        both = [_alive_tokens(info) for info in s.capture.pending.infos["image"]]
        alone = []
        for row in range(2):
            s.capture.clear()
            model.model.get_image_features(**{k: v[row : row + 1] for k, v in feats.items()})
            alone.append(_alive_tokens(s.capture.pending.infos["image"][0]))
        s.capture.clear()
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 3)
    for a, b in zip(both, alone, strict=True):
        assert torch.equal(a, b)
    # the LLM saw exactly the alive visual tokens, each at its own placeholder position
    vis_pos = [(inputs["input_ids"][r] == tiny.IMAGE_ID).nonzero().view(-1) for r in range(2)]
    for r in range(2):
        got = tr.index[r][tr.valid[r]]
        assert torch.equal(got[inputs["input_ids"][r][got] == tiny.IMAGE_ID], vis_pos[r][both[r]])
        pos = tr.position_ids[r][tr.valid[r]]
        # positions: the caller's (left padding: attention-mask positions), never renumbered
        assert bool((pos.diff() > 0).all())
    assert kept == sum(int(a.sum()) for a in both)
    if family == "llava":
        assert kept == 2 * Budget.of(budget).visual_quota(64)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("family", LLAVA)
def test_composites(models, family):
    model = models(family)
    inputs = tiny.make_inputs(model, family, batch=2, seed=5)
    with vlm_accel.accelerate(model, budget=Budget(visual=0.5, encoder=0.5), method="tome_vit+visionzip") as s:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        zipped = s.stats.visual_tokens_kept
    with vlm_accel.accelerate(model, budget=0.5, method="tome_vit") as s, torch.no_grad():
        model(**inputs)
        merged = s.stats.visual_tokens_kept
    assert 0 < zipped < merged
    with vlm_accel.accelerate(model, budget=Budget(visual=0.5, encoder=0.5), method="tome_vit+fastv") as s:
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        stats = s.stats
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 2
    assert stats.visual_tokens_per_layer[0] == merged > stats.visual_tokens_per_layer[-1]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_towers_refused(models, family):
    model = models(family)
    with pytest.raises(ValueError, match="2x2"):
        vlm_accel.accelerate(model, budget=0.5, method="tome_vit")
    assert not hasattr(model, "_vlm_accel_session")


def test_errors(models):
    model = models("llava_onevision")
    with pytest.raises(ValueError, match="pool"):
        vlm_accel.accelerate(model, budget=0.5, method="tome_vit+pool")
    with pytest.raises(ValueError, match="Budget.encoder"):
        vlm_accel.accelerate(model, budget=Budget(visual=0.5, encoder=0.5), method="visionzip")
    with pytest.raises(ValueError, match="schedule"):
        vlm_accel.accelerate(model, budget=0.5, method="tome_vit", method_options={"schedule": "fast"})
    video = tiny.make_video_inputs(model, "llava_onevision", batch=1)
    with vlm_accel.accelerate(model, budget=0.5, method="tome_vit"), torch.no_grad():
        with pytest.raises(ValueError, match="video"):
            model(**video)
    vcfg = model.config.vision_config
    impl = vcfg._attn_implementation
    vcfg._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="sdpa"):
            vlm_accel.accelerate(model, budget=0.5, method="tome_vit")
    finally:
        vcfg._attn_implementation = impl


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_reaches_the_target(kind):
    for n, k, points in [(256, 84, 11), (256, 28, 11), (576, 63, 2), (64, 16, 1), (10, 10, 3)]:
        rs = merge_schedule(n, k, points, kind)
        assert len(rs) == points and sum(rs) == n - k and min(rs) >= 0
    dec = merge_schedule(256, 84, 11, "decreasing")
    assert dec == sorted(dec, reverse=True) and dec[0] > dec[-1]


def test_bench_rows(models):
    """``vlm-accel bench encoder``'s runner on a tiny LLaVA: one row per configuration, the kept counts the budgets
    promise (timings are only recorded, never asserted)."""
    from vlm_accel.bench.encoder import budget_of, speed

    model = models("llava")
    inputs = tiny.make_inputs(model, "llava", batch=1, seed=6)
    configs = [("none", 1.0), ("tome_vit", 0.25), ("tome_vit+visionzip", budget_of("tome_vit+visionzip", 0.25, 0.5))]
    rows = speed(model, inputs, configs, repeats=1, new_tokens=2, schedule="steep")
    assert [r["visual_kept"] for r in rows] == [64, 16, 16]
    assert [r["schedule"] for r in rows] == [None, "steep", None]
    assert rows[0]["prefill_speedup"] == 1.0 and all(r["vit_ms"] > 0 for r in rows)
    # the token-count ideal: the unpatched row is 1.0; a tower merge runs its layers on fewer tokens per view
    assert rows[0]["ideal_speedup"] == rows[0]["ideal_vit_speedup"] == 1.0
    assert rows[0]["tower_tokens"] == rows[0]["tower_tokens_full"] == 65  # CLS + 8x8 patches
    for r in rows[1:]:
        assert 16 < r["tower_tokens"] < 65 and r["ideal_vit_speedup"] == 65 / r["tower_tokens"]
        assert r["llm_tokens"] == inputs["input_ids"].shape[1] - 64 + 16
        assert 1.0 < r["ideal_speedup"] < 65 / 16 and 0.0 < r["ideal_e2e_speedup"] <= r["ideal_speedup"]


def test_layer_tokens_record_the_schedule(models):
    """``TowerMerge.last.layer_tokens``: the tokens per view each tower layer ran on, as the schedule plans."""
    model = models("llava")
    inputs = tiny.make_inputs(model, "llava", batch=2, seed=6)
    with vlm_accel.accelerate(model, budget=0.25, method="tome_vit") as s, torch.no_grad():
        model(**inputs)
        last = s.tower.last
    layers = len(encoder_layers(model.model.vision_tower))
    assert len(last.layer_tokens) == layers and last.layer_tokens[0] == 65
    planned = [65]
    for i in range(layers - 1):
        planned.append(planned[-1] - last.plan.get(i, 0))
    assert last.layer_tokens == planned and last.mlp_tokens == [*planned[1:], planned[-1]]
    share = 2 * 64 / (4 * 32 + 2 * 64)  # tiny CLIP: hidden 32, MLP 64
    want = sum((1 - share) * t + share * m for t, m in zip(planned, last.mlp_tokens, strict=True)) / layers
    assert last.mean_layer_tokens == pytest.approx(want)


def test_grad_mode_changes_nothing_under_eager_attention(models):
    """tome_vit under autograd equals no_grad bit for bit with the tower's eager attention. Under SDPA the additive
    proportional-attention mask sends autograd-enabled calls to another CPU kernel (the unpatched tower passes no
    mask, so it does not see this): ~1e-5 in the features, ~1e-4 in the logits (README, tome_vit)."""
    model = models("llava", attn="eager")
    inputs = tiny.make_inputs(model, "llava", batch=2, seed=3)
    with vlm_accel.accelerate(model, budget=0.25, method="tome_vit"):
        with_grad = model(**inputs).logits.detach()
        with torch.no_grad():
            without = model(**inputs).logits
    assert torch.equal(with_grad, without)
