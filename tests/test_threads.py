"""One accelerated model used by several threads / interleaved requests gives each request its own right answer."""

import threading

import pytest
import torch
from transformers.cache_utils import DynamicCache

import vlm_accel
from vlm_accel.control.budget import Budget

import tiny


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_threads_share_one_accelerated_model(models, family):
    model = models(family)
    reqs = [tiny.inputs_for(model, family, "image", batch=b, seed=s) for b, s in ((1, 1), (2, 2), (1, 3), (2, 4))]
    with vlm_accel.accelerate(model, 0.5, method="divprune"), torch.no_grad():
        want = [model.generate(**r, max_new_tokens=3, min_new_tokens=3, do_sample=False) for r in reqs]
        logits = [model(**r).logits for r in reqs]
        got, errors = {}, []

        def work(t: int):
            try:
                for rep in range(3):
                    i = (t + rep) % len(reqs)
                    g = model.generate(**reqs[i], max_new_tokens=3, min_new_tokens=3, do_sample=False)
                    out = model(**reqs[i]).logits
                    got.setdefault(t, []).append((i, g, out))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors
    assert sum(len(v) for v in got.values()) == 12
    for runs in got.values():
        for i, g, out in runs:
            assert torch.equal(g, want[i])
            assert torch.equal(out, logits[i])


def test_interleaved_manual_requests_keep_their_own_caches(models):
    """Prefill A, prefill B, then decode A and B alternately: each equals its own uninterrupted run."""
    model = models("llava")
    a = tiny.inputs_for(model, "llava", "image", batch=1, seed=5)
    b = tiny.inputs_for(model, "llava", "image", batch=1, seed=6)

    def run(inputs, cache):
        out = model(**inputs, cache=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True), inputs["attention_mask"]

    def step(tok, mask, cache):
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        out = model(input_ids=tok, attention_mask=mask, cache=cache, use_cache=True)
        return out.logits[:, -1], out.logits[:, -1].argmax(-1, keepdim=True), mask

    with vlm_accel.accelerate(model, 0.25, method="divprune"), torch.no_grad():
        ref = {}
        for name, x in (("a", a), ("b", b)):
            cache = DynamicCache()
            tok, mask = run(x, cache)
            seq = []
            for _ in range(3):
                logit, tok, mask = step(tok, mask, cache)
                seq.append(logit)
            ref[name] = seq
        ca, cb = DynamicCache(), DynamicCache()
        ta, ma = run(a, ca)
        tb, mb = run(b, cb)
        got = {"a": [], "b": []}
        for _ in range(3):
            la, ta, ma = step(ta, ma, ca)
            lb, tb, mb = step(tb, mb, cb)
            got["a"].append(la)
            got["b"].append(lb)
    for name in ("a", "b"):
        for x, y in zip(got[name], ref[name], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_interleaving_refused_where_state_is_per_prefill(models):
    """With in-LLM stages or KV eviction only the latest prefill's cache can be continued: a clear error."""
    model = models("llava")
    a = tiny.inputs_for(model, "llava", "image", batch=1, seed=5)
    b = tiny.inputs_for(model, "llava", "image", batch=1, seed=6)
    for budget, method in ((Budget(visual=0.25), "fastv"), (Budget(kv=0.5), "divprune")):
        with vlm_accel.accelerate(model, budget, method=method), torch.no_grad():
            ca, cb = DynamicCache(), DynamicCache()
            out = model(**a, cache=ca, use_cache=True)
            model(**b, cache=cb, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([a["attention_mask"], torch.ones_like(tok)], 1)
            with pytest.raises(RuntimeError, match="earlier prefill"):
                model(input_ids=tok, attention_mask=mask, cache=ca, use_cache=True)
