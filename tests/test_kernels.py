"""Selection kernels and the faster reducers.

Default suite (CPU): the torch references against their definitions, dispatch and errors, the batched reducers
against the previous per-segment implementations (same kept sets and weights) and against per-segment calls.

``-m kernels``: every Triton kernel against its reference over a grid of shapes (tiny, ragged, non-power-of-two
widths), on CUDA when present, else in the interpreter (``TRITON_INTERPRET=1 python -m pytest -m kernels``; skipped
without it). Tolerances: fp32 values within ``atol=1e-5`` (similarities, in [-1, 1]) or ``rtol=1e-4, atol=1e-6``
(attention probabilities, whose sums the kernels form in another order); indices equal where the reference's best
value beats the runner-up by more than that tolerance (an arg-max on a float tie may take either).
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import vlm_accel
from vlm_accel import kernels
from vlm_accel.bench.kernels import LEGACY
from vlm_accel.kernels import reference
from vlm_accel.llm.attention import attention_probs
from vlm_accel.methods import Context, get
from vlm_accel.methods.batch import reduce_segments


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed))


# --- references ---------------------------------------------------------------------------------------------------
def test_sim_argmax_reference_is_the_best_cosine_match():
    a, b = randn(2, 7, 5, seed=1), randn(2, 9, 5, seed=2)
    val, idx = kernels.sim_argmax(a, b, torch.tensor([9, 4]))
    for s, limit in ((0, 9), (1, 4)):
        for i in range(7):
            cos = torch.nn.functional.cosine_similarity(a[s, i][None], b[s, :limit], dim=-1)
            assert int(idx[s, i]) == int(cos.argmax()) and abs(float(val[s, i]) - float(cos.max())) < 1e-6
    v2, i2 = kernels.sim_argmax(a[0], b[0])  # no batch axis in, none out
    assert v2.shape == (7,) and torch.equal(i2, idx[0])


def test_max_min_select_batched_equals_per_segment_and_is_prefix_consistent():
    x = randn(3, 40, 8, seed=3)
    lengths = torch.tensor([40, 31, 25])
    out = kernels.max_min_select(x, 12, lengths)
    for s in range(3):
        alone = kernels.max_min_select(x[s, : lengths[s]], 12)
        assert torch.equal(out[s], alone)
        assert int(out[s].max()) < int(lengths[s]) and out[s].unique().numel() == 12
    assert torch.equal(kernels.max_min_select(x, 5, lengths), out[:, :5])


@pytest.mark.parametrize("with_init", [False, True])
def test_max_min_select_distance_matrix_and_per_pick_products_agree(with_init):
    """The reference's two forms (the CPU's one distance matrix, the kernel's product per pick) pick alike."""
    x, lengths = randn(3, 50, 12, seed=14), torch.tensor([50, 41, 30])
    init = None
    if with_init:
        init = torch.zeros(3, 50, dtype=torch.bool)
        init[:, 5:9] = True
    a = reference.max_min_select(x, 10, lengths, init, gram=True)
    b = reference.max_min_select(x, 10, lengths, init, gram=False)
    assert torch.equal(a, b)


def test_max_min_select_first_pick_is_the_largest_mean_distance():
    x = randn(30, 6, seed=4)
    xn = torch.nn.functional.normalize(x, dim=-1)
    assert int(kernels.max_min_select(x, 1)[0]) == int((1 - xn @ xn.T).mean(1).argmax())


def test_max_min_select_with_init_avoids_the_chosen():
    x = randn(2, 20, 4, seed=5)
    init = torch.zeros(2, 20, dtype=torch.bool)
    init[0, :3] = True
    init[1, 10:12] = True
    out = kernels.max_min_select(x, 6, init=init)
    for s in range(2):
        assert not set(out[s].tolist()) & set(init[s].nonzero().view(-1).tolist())
    with pytest.raises(ValueError, match="tokens left"):
        kernels.max_min_select(x, 18, init=init)


def test_patch_similarity_reference():
    a, b = randn(4, 6, 10, seed=6), randn(4, 6, 10, seed=7)
    cos = kernels.patch_similarity(a, b)
    assert cos.shape == (4, 6)
    torch.testing.assert_close(cos, torch.nn.functional.cosine_similarity(a, b, dim=-1))
    torch.testing.assert_close(kernels.patch_similarity(a, b, "l1"), (a - b).abs().mean(-1))
    with pytest.raises(ValueError, match="metric"):
        kernels.patch_similarity(a, b, "l2")


@pytest.mark.parametrize("reduce", ["mean", "head"])
def test_attention_scores_reference_equals_attention_probs(reduce, monkeypatch):
    q, k = randn(2, 4, 3, 8, seed=8), randn(2, 2, 11, 8, seed=9)
    allowed = torch.rand(2, 3, 11, generator=torch.Generator().manual_seed(0)) > 0.3
    allowed[1, 2] = False  # a row that may attend to nothing contributes zeros
    probs = attention_probs(q, k, 0.3, allowed)  # [B, H, R, L]
    want = probs.mean(2) if reduce == "head" else probs.mean((1, 2))
    torch.testing.assert_close(kernels.attention_scores(q, k, 0.3, allowed, reduce), want)
    monkeypatch.setattr(reference, "ROW_ELEMENTS", 30)  # rows in chunks: same result
    torch.testing.assert_close(kernels.attention_scores(q, k, 0.3, allowed, reduce), want)
    keys_ok = allowed[:, :1]  # [B, 1, L]: the same validity for every row, broadcast
    torch.testing.assert_close(
        kernels.attention_scores(q, k, 0.3, keys_ok, reduce),
        kernels.attention_scores(q, k, 0.3, keys_ok.expand(-1, 3, -1), reduce),
    )


def test_dispatch_errors_name_what_to_do(monkeypatch):
    x = randn(2, 5, 4)
    with pytest.raises(ValueError, match="backend must be"):
        kernels.sim_argmax(x, x, backend="cuda")
    with pytest.raises(ValueError, match="same batch"):
        kernels.sim_argmax(x, randn(3, 5, 4))
    with pytest.raises(ValueError, match="multiple"):
        kernels.attention_scores(randn(1, 3, 2, 4), randn(1, 2, 5, 4), 1.0)
    with pytest.raises(ValueError, match="broadcast"):
        kernels.attention_scores(randn(1, 2, 2, 4), randn(1, 2, 5, 4), 1.0, torch.ones(1, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduce"):
        kernels.attention_scores(randn(1, 2, 2, 4), randn(1, 2, 5, 4), 1.0, reduce="sum")
    if kernels.triton_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kernels.sim_argmax(x, x, backend="triton")
    torch.testing.assert_close(kernels.sim_argmax(x, x, backend="torch")[0], torch.ones(2, 5))


def test_import_and_selection_work_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, vlm_accel\n"
        "from vlm_accel.methods import Context, get\n"
        "x = torch.randn(64, 8)\n"
        "for name in vlm_accel.methods():\n"
        "    if getattr(get(name), 'stage', 'pre') == 'pre':\n"
        "        assert get(name)(x, 7, Context(grid=(8, 8), importance=torch.rand(64))).keep.numel() <= 7\n"
        "from vlm_accel import kernels\n"
        "assert not kernels.triton_available()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# --- the reducers: same results as the previous implementation, batched == per segment --------------------------
@pytest.mark.parametrize("name", ["divprune", "visionzip", "tome", "relevance"])
def test_reducers_equal_previous_implementation(name):
    for seed, (n, d, k) in enumerate([(576, 64, 63), (100, 16, 9), (37, 8, 5), (200, 32, 50), (64, 16, 2)]):
        x = randn(n, d, seed=seed)
        evidence = Context(importance=torch.rand(n, generator=torch.Generator().manual_seed(seed)), query=randn(5, d))
        for ctx in (evidence, Context()):
            new, old = get(name)(x, k, ctx), LEGACY[name](x, k, ctx)
            assert torch.equal(new.keep, old.keep), (name, n, k)
            if old.weights is not None:
                torch.testing.assert_close(new.weights, old.weights)


def test_temporal_equals_previous_implementation():
    frames, p = 6, 30
    base, static = randn(p, 16, seed=1), torch.rand(p, generator=torch.Generator().manual_seed(2)) < 0.5
    clip = torch.cat([torch.where(static[:, None], base + 0.05 * randn(p, 16, seed=10 + t), randn(p, 16, seed=t))
                      for t in range(frames)])  # fmt: skip
    for k in (10, 40, 100, 150):  # ~100 runs at the threshold: 150 cuts the 50 least similar links more
        ctx = Context(grid=(5, 6), frames=frames)
        new, old = get("temporal")(clip, k, ctx), LEGACY["temporal"](clip, k, ctx)
        assert torch.equal(new.keep, old.keep)
        torch.testing.assert_close(new.weights, old.weights)


@pytest.mark.parametrize("name", vlm_accel.methods())
def test_reduce_segments_equals_per_segment_calls(name):
    if getattr(get(name), "stage", "pre") != "pre":
        pytest.skip("in-LLM methods are run by the session")
    sizes = [64, 64, 48, 64, 48, 64]  # two groups of equal size, interleaved
    xs = [randn(n, 8, seed=i) for i, n in enumerate(sizes)]
    ks = [7, 7, 5, 7, 48, 7]  # one segment keeps everything
    query = randn(4, 8)
    grids = {64: (8, 8), 48: (6, 8)}

    def ctxs():
        return [
            Context(grid=grids[x.shape[0]], importance=randn(x.shape[0], seed=i), query=query, generator=gen(i))
            for i, x in enumerate(xs)
        ]

    got = reduce_segments(get(name), xs, ks, ctxs())
    want = [get(name)(x, k, c) for x, k, c in zip(xs, ks, ctxs(), strict=True)]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.keep, w.keep)
        assert (g.weights is None) == (w.weights is None)
        if w.weights is not None:
            torch.testing.assert_close(g.weights, w.weights)


# --- Triton kernels against their references ----------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before Python starts (CPU interpreter)",
)


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


def assert_argmax_ok(val, idx, ref_val, ref_idx, sim, tol=1e-5):
    """Values within ``tol``; the kernel's pick scores the reference's max within ``tol`` (ties may go either
    way); where the best beats the runner-up by more than ``tol``, the same index."""
    torch.testing.assert_close(val.cpu(), ref_val.cpu(), atol=tol, rtol=0)
    picked = sim.gather(-1, idx.cpu()[..., None]).squeeze(-1)
    assert bool(((ref_val.cpu() - picked) <= tol).all())
    if sim.shape[-1] > 1:
        top2 = sim.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > tol
    else:
        clear = torch.ones_like(ref_idx, dtype=torch.bool).cpu()
    assert torch.equal(idx.cpu()[clear], ref_idx.cpu()[clear])


@pytest.mark.parametrize(
    "bsz,m,p,d,ragged",
    [(1, 1, 1, 1, False), (2, 5, 3, 7, False), (3, 33, 17, 70, True), (1, 64, 100, 130, False), (2, 17, 1, 33, True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.kernels
@needs_kernels
def test_kernel_sim_argmax(bsz, m, p, d, ragged, dtype):
    a, b = randn(bsz, m, d, seed=1).to(dtype), randn(bsz, p, d, seed=2).to(dtype)
    b_len = torch.randint(1, p + 1, (bsz,), generator=torch.Generator().manual_seed(3)) if ragged else None
    val, idx = kernels.sim_argmax(*_dev(a, b), None if b_len is None else b_len.to(DEVICE), backend="triton")
    ref_val, ref_idx = reference.sim_argmax(a, b, b_len)
    sim = reference.normalize(a) @ reference.normalize(b).transpose(1, 2)
    if b_len is not None:
        sim = sim.masked_fill(~reference.valid_mask(b_len, bsz, p, "cpu")[:, None], float("-inf"))
    assert val.dtype == torch.float32 and idx.dtype == torch.long
    assert_argmax_ok(val, idx, ref_val, ref_idx, sim)


@pytest.mark.parametrize(
    "bsz,n,d,k,ragged,with_init",
    [(1, 2, 3, 1, False, False), (1, 3, 1, 3, False, False), (2, 10, 5, 4, True, False), (3, 100, 33, 12, True, False),
     (2, 130, 20, 9, False, True), (1, 70, 64, 20, False, True)],
)  # fmt: skip
@pytest.mark.kernels
@needs_kernels
def test_kernel_max_min_select(bsz, n, d, k, ragged, with_init):
    """Greedy picks equal the reference's exactly, with the launcher's block size and with a larger one."""
    x = randn(bsz, n, d, seed=n)
    lengths = torch.tensor([n - 3 * s for s in range(bsz)]) if ragged else None
    init = None
    if with_init:
        init = torch.zeros(bsz, n, dtype=torch.bool)
        init[:, : n // 10] = True
    lengths_d, init_d = (None if t is None else t.to(DEVICE) for t in (lengths, init))
    want = reference.max_min_select(x, k, lengths, init)  # random data: no near-ties
    got = kernels.max_min_select(*_dev(x), k, lengths_d, init_d, backend="triton")
    assert torch.equal(got.cpu(), want)
    from vlm_accel.kernels import triton_ops

    assert torch.equal(triton_ops.max_min_select(*_dev(x), k, lengths_d, init_d, block_n=64).cpu(), want)


@pytest.mark.parametrize("m,d", [(1, 1), (5, 3), (33, 64), (100, 130)])
@pytest.mark.parametrize("metric", ["cosine", "l1"])
@pytest.mark.kernels
@needs_kernels
def test_kernel_patch_similarity(m, d, metric):
    a, b = randn(m, d, seed=m), randn(m, d, seed=d)
    got = kernels.patch_similarity(*_dev(a, b), metric, backend="triton")
    torch.testing.assert_close(got.cpu(), reference.patch_similarity(a, b, metric), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "bsz,h,hkv,r,length,hd,mask",
    [(1, 1, 1, 1, 1, 8, None), (2, 4, 2, 3, 50, 24, "random"), (1, 8, 1, 5, 130, 64, "causal"),
     (2, 2, 2, 17, 33, 16, "random"), (1, 1, 1, 40, 40, 100, None)],
)  # fmt: skip
@pytest.mark.parametrize("reduce", ["mean", "head"])
@pytest.mark.kernels
@needs_kernels
def test_kernel_attention_scores(bsz, h, hkv, r, length, hd, mask, reduce):
    q, k = randn(bsz, h, r, hd, seed=r), randn(bsz, hkv, length, hd, seed=length)
    allowed = None
    if mask == "random":
        allowed = torch.rand(bsz, r, length, generator=torch.Generator().manual_seed(0)) > 0.3
        allowed[0, 0] = False  # a row with no allowed key
    elif mask == "causal":
        rows = torch.arange(length - r, length)[None].expand(bsz, -1)
        allowed = torch.arange(length)[None, None] <= rows[..., None]
    scale = hd**-0.5
    mask = None if allowed is None else allowed.to(DEVICE)
    got = kernels.attention_scores(*_dev(q, k), scale, mask, reduce, backend="triton")
    want = reference.attention_scores(q, k, scale, allowed, reduce)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["divprune", "visionzip", "tome", "relevance", "temporal"])
@pytest.mark.kernels
@needs_kernels
def test_methods_through_the_kernels_keep_the_same_tokens(name, monkeypatch):
    """Whole reducers with every op on the kernels (``VLM_ACCEL_KERNELS=triton``) keep what the references keep."""
    frames, p, d = 3, 20, 16
    x = randn(frames * p, d, seed=11)
    x[p : 2 * p] = x[:p] + 0.01 * randn(p, d, seed=12)  # frame 1 repeats frame 0: temporal runs
    ctx = Context(grid=(4, 5), frames=frames, importance=None, query=randn(4, d, seed=13))
    want = get(name)(x, 9, ctx)
    monkeypatch.setenv("VLM_ACCEL_KERNELS", "triton")
    on_device = Context(grid=(4, 5), frames=frames, query=ctx.query.to(DEVICE))
    got = get(name)(x.to(DEVICE), 9, on_device)
    assert torch.equal(got.keep.cpu(), want.keep)
    if want.weights is not None:
        torch.testing.assert_close(got.weights.cpu(), want.weights)


COMPILE_ALL = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vlm_accel.kernels import triton_ops as T

POINTERS = {"blen_ptr": "*i64", "idx_ptr": "*i64", "pi_ptr": "*i64", "m_ptr": "*u8", "val_ptr": "*fp32",
            "mind_ptr": "*fp32", "pv_ptr": "*fp32", "lse_ptr": "*fp32"}  # the rest: the input dtype
CONSTANTS = {"HAS_LEN": True, "HAS_MASK": True, "COSINE": True, "BM": 32, "BP": 32, "BD": 64, "BN": 64, "BNB": 16,
             "BR": 16, "BL": 32}
kernels = [T._sim_argmax_kernel, T._maxmin_step_kernel, T._patch_similarity_kernel, T._attn_lse_kernel,
           T._attn_colsum_kernel]
for fn in kernels:
    for dtype in ("*fp32", "*bf16"):
        sig, const = {}, {}
        for p in fn.params:
            if p.is_constexpr:
                sig[p.name], const[p.name] = "constexpr", CONSTANTS[p.name]
            elif p.name.endswith("_ptr"):
                maxmin = fn is T._maxmin_step_kernel  # its x is unit rows in fp32, its out the picks
                if p.name == "out_ptr":
                    sig[p.name] = "*i64" if maxmin else "*fp32"
                else:
                    sig[p.name] = "*fp32" if maxmin and p.name == "x_ptr" else POINTERS.get(p.name, dtype)
            else:
                sig[p.name] = "fp32" if p.name == "scale" else "i32"
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["ptx"], fn.__name__
print("compiled", len(kernels))
"""


@pytest.mark.kernels
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_kernels_compile_for_a_cuda_gpu_without_one():
    """Every kernel compiles to PTX for sm_90 (H100 / H200), bf16 and fp32 inputs: what the interpreter does not
    check (constexpr globals, types, dot shapes). Compiled in a subprocess without ``TRITON_INTERPRET``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILE_ALL], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0 and "compiled 5" in out.stdout, out.stderr[-3000:]
