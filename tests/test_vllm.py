"""The vLLM plugin (``vlm_accel.vllm``): tiny LLaVA (CLIP tower) and Qwen2.5-VL built from configs, saved to a tmp
dir and served in-process by vLLM; greedy tokens equal ``transformers`` + ``vlm_accel.accelerate()`` at the same
budget and method (1 and 2 images per prompt, batch 2), and budget 1.0 equals plain vLLM.

The engine tests (marker ``vllm``) need vLLM importable: run them from the venv that
``scripts/setup_vllm_env.sh`` makes (``.venv-vllm/bin/python -m pytest -q -m vllm tests/test_vllm.py``); elsewhere
they skip. The settings tests run everywhere.
"""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf

from vlm_accel.vllm import Settings, settings_from_config, supported_methods

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID, PAD_ID, VOCAB = 100, 101, 102, 103, 0, 128
NEW_TOKENS = 8
# head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... (not tests/tiny.py's 16)
_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
)
_SPECIAL = {
    "llava": {"<image>": IMAGE_ID},
    "qwen2_5_vl": {
        "<|image_pad|>": IMAGE_ID,
        "<|video_pad|>": VIDEO_ID,
        "<|vision_start|>": VSTART_ID,
        "<|vision_end|>": VEND_ID,
    },
}
_SPECIAL["qwen3_vl"] = _SPECIAL["qwen2_5_vl"]
ARCH = {
    "llava": "VlmAccelLlavaForConditionalGeneration",
    "qwen2_5_vl": "VlmAccelQwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "VlmAccelQwen3VLForConditionalGeneration",
}
# image sizes (pixels) per family: LLaVA 56x56 (64 tokens); Qwen 32x32 (8x8 = 64 tokens) and 24x40 (6x10 = 60)
_SIZES = {"llava": [(56, 56), (56, 56)], "qwen2_5_vl": [(32, 32), (24, 40)], "qwen3_vl": [(32, 32), (24, 40)]}


# --- settings (no vLLM needed) --------------------------------------------------------------------------------------
class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_settings_parse_budget_and_method():
    s = settings_from_config(_Cfg(vlm_accel={"budget": 16, "method": "tome"}))
    assert s == Settings(s.budget, "tome", 0) and s.quota(64) == 16 and s.quota(10) == 10
    s = settings_from_config(_Cfg(vlm_accel={"budget": 0.25}), auto="visionzip")
    assert s.method == "visionzip" and s.quota(576) == 144
    assert settings_from_config(_Cfg()).quota(64) == 16  # defaults: budget 0.25, auto


@pytest.mark.parametrize(
    "cfg, error, words",
    [
        ({"method": "relevance"}, ValueError, ["needs the question", "work in vLLM", "divprune"]),
        ({"method": "temporal"}, ValueError, ["frames of a clip", "work in vLLM"]),
        ({"method": "nope"}, ValueError, ["unknown method"]),
        ({"budget": 1.5}, ValueError, ["fraction"]),
        ({"budget": "64"}, TypeError, ["budget"]),
        ({"budgte": 64}, ValueError, ["unknown key", "budget"]),
        ({"seed": 0.5}, TypeError, ["seed"]),
    ],
)
def test_settings_refuse_with_a_clear_error(cfg, error, words):
    with pytest.raises(error) as exc:
        settings_from_config(_Cfg(vlm_accel=cfg))
    for w in words:
        assert w in str(exc.value)


def test_in_llm_methods_are_refused():
    from vlm_accel.methods import get, names

    inside = [n for n in names() if getattr(get(n), "stage", "pre") != "pre"]
    for name in inside:
        with pytest.raises(ValueError, match="inside the LLM"):
            settings_from_config(_Cfg(vlm_accel={"method": name}))
    ok = supported_methods()
    assert {"divprune", "visionzip", "tome", "pool", "random"} <= set(ok)
    assert "relevance" not in ok and "temporal" not in ok and not set(inside) & set(ok)


def test_importing_the_plugin_imports_no_vllm():
    code = "import sys, vlm_accel, vlm_accel.vllm, vlm_accel.vllm.config; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- tiny checkpoints -----------------------------------------------------------------------------------------------
def _build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llava":
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=56,
            patch_size=7,
        )
        cfg = tf.LlavaConfig(
            vision_config=vision,
            text_config=dict(model_type="llama", **_TEXT),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_token_id=IMAGE_ID,
        )
        return tf.LlavaForConditionalGeneration(cfg).eval()
    vision = dict(
        depth=2,
        num_heads=4,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        hidden_size=32,
        out_hidden_size=64,
        intermediate_size=64,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    common = dict(
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID, vision_end_token_id=VEND_ID
    )
    if family == "qwen2_5_vl":
        vision.update(window_size=8, fullatt_block_indexes=[1])
        cfg = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=dict(_TEXT, rope_parameters=rope), **common)
        return tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    vision.update(deepstack_visual_indexes=[0, 1], num_position_embeddings=64)
    text = dict(_TEXT, head_dim=32, rope_parameters=dict(rope, mrope_interleaved=True))
    cfg = tf.Qwen3VLConfig(vision_config=vision, text_config=text, **common)
    return tf.Qwen3VLForConditionalGeneration(cfg).eval()


def _tokenizer(family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers

    special = _SPECIAL[family]
    names = {PAD_ID: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>", **{i: t for t, i in special.items()}}
    tok = Tokenizer(models.WordLevel({names.get(i, f"w{i}"): i for i in range(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(special),
    )


def _save(family: str, path) -> tuple[torch.nn.Module, object]:
    """Model, processor and tokenizer in ``path`` the way vLLM loads a hub checkpoint; returns (model, processor)."""
    from safetensors.torch import load_file, save_file

    model = _build(family)
    model.save_pretrained(path)
    if family == "llava":
        image_proc = tf.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        proc = tf.LlavaProcessor(
            image_processor=image_proc,
            tokenizer=_tokenizer(family),
            patch_size=7,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            image_token="<image>",
        )
        # transformers 5.x saves the CLIP tower as vision_tower.embeddings...; hub checkpoints (and vLLM) have
        # vision_tower.vision_model.embeddings...
        weights = load_file(path / "model.safetensors")
        prefix = "vision_tower."
        weights = {
            (prefix + "vision_model." + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in weights.items()
        }
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    else:
        kw = dict(patch_size=2, merge_size=2, temporal_patch_size=2)
        pixels = dict(min_pixels=16 * 16, max_pixels=40 * 40)
        if family == "qwen2_5_vl":
            proc = tf.Qwen2_5_VLProcessor(
                image_processor=tf.Qwen2VLImageProcessor(**kw, **pixels),
                tokenizer=_tokenizer(family),
                video_processor=tf.Qwen2VLVideoProcessor(**kw, **pixels),
            )
        else:
            size = {"shortest_edge": 16 * 16, "longest_edge": 40 * 40}
            proc = tf.Qwen3VLProcessor(
                image_processor=tf.Qwen2VLImageProcessor(**kw, size=size),
                tokenizer=_tokenizer(family),
                video_processor=tf.Qwen3VLVideoProcessor(**kw, size=size),
            )
    proc.save_pretrained(path)
    return model, proc


def _images(family: str, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in _SIZES[family]]


def _prompts(family: str) -> list[tuple[list[int], list]]:
    """Batch of 2: a prompt with one image, a prompt with two (token ids with one placeholder per image)."""
    a, b = _images(family, 1), _images(family, 2)
    img = [IMAGE_ID] if family == "llava" else [VSTART_ID, IMAGE_ID, VEND_ID]
    return [([1, 5, 6, *img, 7, 8], a[:1]), ([1, 9, *img, 10, *img, 11, 12, 13], [b[0], a[1]])]


# --- transformers reference -----------------------------------------------------------------------------------------
def _full_counts(proc, family: str, images) -> list[int]:
    """Tokens the encoder gives each image (before any reduction)."""
    if family == "llava":
        return [(56 // 7) ** 2] * len(images)
    return (proc.image_processor(images=images, return_tensors="pt")["image_grid_thw"].prod(-1) // 4).tolist()


def _hf_generate(model, proc, family: str, ids: list[int], images) -> list[int]:
    """Greedy tokens of the transformers model on one prompt (placeholders expanded to each image's full count)."""
    pix = proc.image_processor(images=images, return_tensors="pt")
    full, it = [], iter(_full_counts(proc, family, images))
    for t in ids:
        full += [IMAGE_ID] * next(it) if t == IMAGE_ID else [t]
    input_ids = torch.tensor([full])
    kw = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pix["pixel_values"])
    if family != "llava":
        kw.update(image_grid_thw=pix["image_grid_thw"], mm_token_type_ids=(input_ids == IMAGE_ID).long())
    # vLLM's ignore_eos: EOS may be generated and decoding goes on (min_new_tokens would forbid EOS instead)
    config = copy.deepcopy(model.generation_config)
    config.update(eos_token_id=[], max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        out = model.generate(**kw, generation_config=config)
    return out[0, input_ids.shape[1] :].tolist()


def _hf_reference(model, proc, family, prompts, budget=None, method="auto") -> list[list[int]]:
    import vlm_accel

    if budget is None:
        return [_hf_generate(model, proc, family, ids, images) for ids, images in prompts]
    with vlm_accel.accelerate(model, budget=budget, method=method):
        return [_hf_generate(model, proc, family, ids, images) for ids, images in prompts]


CASES = [
    ("llava", 16, "divprune"),
    ("llava", 0.25, "visionzip"),
    ("qwen2_5_vl", 16, "divprune"),
    ("qwen2_5_vl", 0.2, "tome"),
    ("qwen3_vl", 0.25, "divprune"),
    ("qwen3_vl", 12, "tome"),
]


# --- vLLM -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{family: (dir, prompts, {(budget, method) | None: transformers tokens})}``: every reference is computed
    before any vLLM engine starts in this process."""
    _vllm()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = {}
    for family in ARCH:
        path = tmp_path_factory.mktemp(family)
        model, proc = _save(family, path)
        prompts = _prompts(family)
        refs = {None: _hf_reference(model, proc, family, prompts)}
        for fam, budget, method in CASES:
            if fam == family:
                refs[budget, method] = _hf_reference(model, proc, family, prompts, budget, method)
        counts = [_full_counts(proc, family, images) for _, images in prompts]
        out[family] = (path, prompts, refs, counts)
    return out


def _vllm():
    return pytest.importorskip(
        "vllm", reason="vLLM is not importable here: run from the venv made by scripts/setup_vllm_env.sh"
    )


def _serve(path, prompts, overrides: dict | None) -> tuple[list[list[int]], list[int]]:
    """Start an in-process vLLM engine on ``path`` (``hf_overrides``), generate greedily for the batch, shut it
    down; returns (tokens per prompt, prompt lengths after placeholder expansion)."""
    vllm = _vllm()
    llm = vllm.LLM(
        model=str(path),
        dtype="float32",
        max_model_len=512,
        max_num_seqs=2,
        enforce_eager=True,
        distributed_executor_backend="uni",
        limit_mm_per_prompt={"image": 2},
        hf_overrides=overrides or {},
        seed=0,
    )
    try:
        params = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        reqs = [{"prompt_token_ids": ids, "multi_modal_data": {"image": images}} for ids, images in prompts]
        outs = llm.generate(reqs, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [len(o.prompt_token_ids) for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _overrides(family, budget, method):
    return {"architectures": [ARCH[family]], "vlm_accel": {"budget": budget, "method": method}}


@pytest.mark.vllm
@pytest.mark.parametrize("family, budget, method", CASES)
def test_vllm_equals_transformers_accelerate(checkpoints, family, budget, method):
    path, prompts, refs, counts = checkpoints[family]
    got, lengths = _serve(path, prompts, _overrides(family, budget, method))
    assert got == refs[budget, method]
    quota = settings_from_config(_Cfg(vlm_accel={"budget": budget, "method": method})).quota
    expect = [len(ids) - len(ns) + sum(quota(n) for n in ns) for (ids, _), ns in zip(prompts, counts, strict=True)]
    assert lengths == expect  # placeholders: exactly the quota per image


@pytest.mark.vllm
@pytest.mark.parametrize("family", list(ARCH))
def test_full_budget_equals_plain_vllm(checkpoints, family):
    path, prompts, refs, counts = checkpoints[family]
    plain, plain_len = _serve(path, prompts, None)
    full, full_len = _serve(path, prompts, _overrides(family, 1.0, "divprune"))
    assert full == plain and full_len == plain_len == [
        len(ids) - len(ns) + sum(ns) for (ids, _), ns in zip(prompts, counts, strict=True)
    ]
    assert plain == refs[None]
