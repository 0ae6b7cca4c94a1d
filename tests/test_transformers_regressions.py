"""Differences that transformers' own model tests found with the models accelerated at budget 1.0
(``scripts/transformers_suites.py``), reduced to the tiny models: at 1.0 nothing may change."""

import pytest
import torch

import vlm_accel

import tiny


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_get_image_features_tuple_from_config_unchanged_at_full_budget(models, family):
    model = models(family)
    inputs = tiny.inputs_for(model, family, "image")
    vision = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
    inner = model.model
    previous = inner.config.return_dict
    inner.config.return_dict = False  # as transformers' test_get_image_features_output: the decorator returns a tuple
    try:
        with torch.no_grad():
            ref = inner.get_image_features(**vision)
            with vlm_accel.accelerate(model, budget=1.0):
                out = inner.get_image_features(**vision)
    finally:
        inner.config.return_dict = previous
    assert isinstance(ref, tuple)
    assert _same(out, ref)


@pytest.mark.slow
def test_compiled_static_cache_generate_does_not_recompile_at_full_budget():
    """Two ``generate`` calls with a static cache and a compiled forward: the second (shorter) one reuses the compiled
    step unaccelerated; at budget 1.0 it must too."""
    from transformers import CompileConfig

    model = tiny.build("llava")
    inputs = tiny.inputs_for(model, "llava", "image")
    config = CompileConfig(backend="eager", fullgraph=False)
    config._compile_all_devices = True  # compile on CPU too
    kw = dict(do_sample=False, use_cache=True, compile_config=config, cache_implementation="static")
    with vlm_accel.accelerate(model, budget=1.0), torch.no_grad():
        torch.compiler.reset()
        model.generate(**inputs, max_new_tokens=5, **kw)
        with torch._dynamo.config.patch(error_on_recompile=True):
            model.generate(**inputs, max_new_tokens=2, **kw)
    torch.compiler.reset()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_compiled_fullgraph_decoding_at_full_budget(family):
    """transformers' test_generate_compile_model_forward_fullgraph at budget 1.0: the decoding step compiles as one
    graph (nothing of the session is traced) and generates exactly the unaccelerated tokens."""
    from transformers import CompileConfig

    model = tiny.build(family)
    inputs = tiny.inputs_for(model, family, "image")
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # compile on CPU too
    kw = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        with vlm_accel.accelerate(model, budget=1.0):
            torch.compiler.reset()
            out = model.generate(**inputs, **kw, compile_config=config)
    torch.compiler.reset()
    assert torch.equal(out, ref)
