"""An accelerated model at a reduced budget under ``torch.compile``: ``generate(cache_implementation="static",
compile_config=...)`` compiles every decoding step as one graph, generates exactly the eager accelerated tokens, and
does not recompile for a second prompt of the same budget (another image, another length, another reduced length).

Each test builds its own model: transformers keeps the compiled call on the model instance (``_compiled_call``),
which would make the shared fixture's models unpicklable for later tests.
"""

import shutil

import pytest
import torch

import vlm_accel

import tiny

KW = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4)


def _config(backend: str):
    from transformers import CompileConfig

    config = CompileConfig(backend=backend, fullgraph=True)
    config._compile_all_devices = True  # compile on CPU too
    return config


def _two_prompts(model, family: str, kind: str):
    """Two prompts of batch 2; the second differs in content and, where the family allows, in length."""
    first = tiny.inputs_for(model, family, kind, batch=2, seed=0)
    second = tiny.inputs_for(model, family, "mixed" if kind == "image" else kind, batch=2, seed=1)
    return first, second


CASES = [(f, "image", "divprune") for f in tiny.FAMILIES] + [("qwen2_vl", "video", "divprune")]
CASES += [("llava", "image", "tome_vit"), ("llava_next", "image", "tome_vit+visionzip")]  # merged inside the tower


@pytest.mark.parametrize("family,kind,method", CASES)
def test_compiled_static_decoding_equals_eager_without_recompile(family, kind, method):
    model = tiny.build(family)
    prompts = _two_prompts(model, family, kind)
    config = _config("eager")
    with torch.no_grad(), vlm_accel.accelerate(model, budget=0.3, method=method) as sess:
        refs = [model.generate(**p, **KW) for p in prompts]  # eager, growing cache
        torch.compiler.reset()
        try:
            first = model.generate(**prompts[0], **KW, cache_implementation="static", compile_config=config)
            assert sess.stats.visual_tokens_kept < sess.stats.visual_tokens_in
            with torch._dynamo.config.patch(error_on_recompile=True):
                second = model.generate(**prompts[1], **KW, cache_implementation="static", compile_config=config)
        finally:
            torch.compiler.reset()
    assert torch.equal(first, refs[0])
    assert torch.equal(second, refs[1])


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor on CPU needs a C++ compiler"
)
def test_compiled_with_inductor_on_cpu():
    """The default backend (inductor, C++ on CPU) too: same tokens as eager, one graph for two prompts."""
    model = tiny.build("llava")
    prompts = [tiny.inputs_for(model, "llava", "image", seed=s) for s in (0, 1)]
    config = _config("inductor")
    with torch.no_grad(), vlm_accel.accelerate(model, budget=0.3, method="visionzip"):
        refs = [model.generate(**p, **KW) for p in prompts]
        torch.compiler.reset()
        try:
            outs = [model.generate(**prompts[0], **KW, cache_implementation="static", compile_config=config)]
            with torch._dynamo.config.patch(error_on_recompile=True):
                outs.append(model.generate(**prompts[1], **KW, cache_implementation="static", compile_config=config))
        finally:
            torch.compiler.reset()
    for out, ref in zip(outs, refs, strict=True):
        assert torch.equal(out, ref)


def test_static_cache_reused_after_a_reduced_prompt_by_a_plain_one():
    """A static cache that held a reduced prompt, reused for a prompt that reduces nothing (text only): the stale
    slot state must not leak into it."""
    model = tiny.build("llava")
    image = tiny.inputs_for(model, "llava", "image")
    text = {"input_ids": image["input_ids"][:, -6:], "attention_mask": image["attention_mask"][:, -6:]}
    config = _config("eager")
    with torch.no_grad(), vlm_accel.accelerate(model, budget=0.3, method="divprune"):
        ref = model.generate(**text, **KW)
        torch.compiler.reset()
        try:
            model.generate(**image, **KW, cache_implementation="static", compile_config=config)
            out = model.generate(**text, **KW, cache_implementation="static", compile_config=config)
        finally:
            torch.compiler.reset()
    assert torch.equal(out, ref)


def test_in_llm_stages_refuse_compiled_decoding(models):
    """In-LLM stages keep per-step Python state: asked to compile, generate says so before running anything; with a
    static cache and no compile request they decode uncompiled (transformers' auto-compile is turned off for them)."""
    model = models("llava")
    inputs = tiny.inputs_for(model, "llava", "image")
    with torch.no_grad(), vlm_accel.accelerate(model, budget=0.3, method="fastv"):
        with pytest.raises(ValueError, match="cannot decode under torch.compile"):
            model.generate(**inputs, **KW, cache_implementation="static", compile_config=_config("eager"))
        static = model.generate(**inputs, **KW, cache_implementation="static")
        growing = model.generate(**inputs, **KW)
    assert torch.equal(static, growing)
