"""Tiny random models of every supported family, built from configs (offline), and matching inputs."""

from __future__ import annotations

import torch
import transformers as tf

IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID, PAD_ID = 100, 101, 102, 103, 0
VOCAB = 128
FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]

_LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
)
_QWEN_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
_VIT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=7
)
_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def build(family: str, attn: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A tiny random ``...ForConditionalGeneration`` of ``family`` in eval mode."""
    torch.manual_seed(seed)
    common = dict(image_token_id=IMAGE_ID)
    if family == "llava":
        cfg = tf.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", **_VIT),
            text_config=dict(model_type="llama", **_LLAMA),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            **common,
        )
        cls = tf.LlavaForConditionalGeneration
    elif family == "llava_next":
        cfg = tf.LlavaNextConfig(
            vision_config=dict(model_type="clip_vision_model", **_VIT),
            text_config=dict(model_type="llama", **_LLAMA),
            image_grid_pinpoints=_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            **common,
        )
        cls = tf.LlavaNextForConditionalGeneration
    elif family == "llava_onevision":
        cfg = tf.LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", **_VIT),
            text_config=dict(model_type="qwen2", **_LLAMA),
            image_grid_pinpoints=_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            video_token_id=VIDEO_ID,
            **common,
        )
        cls = tf.LlavaOnevisionForConditionalGeneration
    elif family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"):
        vis = dict(depth=2, num_heads=4, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        if family == "qwen2_vl":
            vis.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
            cfg_cls, cls, text = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, dict(_QWEN_TEXT)
        elif family == "qwen2_5_vl":
            vis.update(
                hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=8, fullatt_block_indexes=[1]
            )
            cfg_cls, cls, text = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, dict(_QWEN_TEXT)
        else:
            vis.update(
                hidden_size=32,
                out_hidden_size=64,
                intermediate_size=64,
                deepstack_visual_indexes=[0, 1],
                num_position_embeddings=64,
            )
            text = dict(_QWEN_TEXT, head_dim=16)
            text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
            cfg_cls, cls = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration
            if family == "qwen3_5":  # hybrid decoder: Gated DeltaNet (linear attention) + full attention
                del vis["deepstack_visual_indexes"]
                text.update(
                    num_hidden_layers=4,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                    linear_conv_kernel_dim=4,
                    linear_key_head_dim=16,
                    linear_value_head_dim=16,
                    linear_num_key_heads=2,
                    linear_num_value_heads=4,
                )
                text["rope_parameters"] = dict(text["rope_parameters"], partial_rotary_factor=0.5)
                cfg_cls, cls = tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration
        cfg = cfg_cls(
            vision_config=vis,
            text_config=text,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VSTART_ID,
            vision_end_token_id=VEND_ID,
            **common,
        )
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn
    model = cls(cfg).to(dtype).eval()
    return model


def _image_block(model, family, gen, size):
    """Pixel inputs for one image and the number of placeholder tokens it needs."""
    if family == "llava":
        pv = torch.randn(1, 3, 56, 56, generator=gen)
        return {"pixel_values": pv}, 64
    if family in ("llava_next", "llava_onevision"):
        h, w = size
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        views = image_size_to_num_patches((h, w), model.config.image_grid_pinpoints, 56)
        pv = torch.randn(1, 5, 3, 56, 56, generator=gen)
        sizes = torch.tensor([[h, w]])
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pv, image_sizes=sizes).pooler_output
        return {"pixel_values": pv, "image_sizes": sizes, "_views": views}, feats[0].shape[0]
    gh, gw = size
    patch = 3 * 2 * 2 * 2
    pv = torch.randn(gh * gw, patch, generator=gen)
    return {"pixel_values": pv, "image_grid_thw": torch.tensor([[1, gh, gw]])}, gh * gw // 4


def make_inputs(
    model, family: str, batch: int = 1, seed: int = 0, dtype=torch.float32, per_row: tuple[int, ...] | None = None
) -> dict:
    """Left-padded inputs: row ``i`` has its own image(s) (own size for anyres/Qwen) and its own prompt length.

    ``per_row``: images in each row (default one); several images in a row are separated by a text token."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {
        "llava_next": [(56, 112), (112, 112)],
        "llava_onevision": [(112, 56), (56, 56)],
        "qwen2_vl": [(12, 16), (16, 12)],
        "qwen2_5_vl": [(16, 16), (12, 16)],
        "qwen3_vl": [(12, 16), (16, 16)],
    }
    per_row = per_row or (1,) * batch
    rows, blocks = [], []
    for i in range(batch):
        ids = torch.randint(1, 90, (3 + i,), generator=gen).tolist()
        for j in range(per_row[i]):
            blk, n_img = _image_block(model, family, gen, sizes.get(family, [None, None])[(i + j) % 2])
            if j:
                ids += torch.randint(1, 90, (1,), generator=gen).tolist()
            if family.startswith("qwen"):
                ids += [VSTART_ID] + [IMAGE_ID] * n_img + [VEND_ID]
            else:
                ids += [IMAGE_ID] * n_img
            blocks.append(blk)
        ids += torch.randint(1, 90, (6 - 2 * i,), generator=gen).tolist()
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch, width), PAD_ID)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention_mask[i, width - len(r) :] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family in ("llava_next", "llava_onevision"):
        out["pixel_values"] = torch.cat([b["pixel_values"] for b in blocks]).to(dtype)
        out["image_sizes"] = torch.cat([b["image_sizes"] for b in blocks])
    elif family == "llava":
        out["pixel_values"] = torch.cat([b["pixel_values"] for b in blocks]).to(dtype)
    else:
        out["pixel_values"] = torch.cat([b["pixel_values"] for b in blocks]).to(dtype)
        out["image_grid_thw"] = torch.cat([b["image_grid_thw"] for b in blocks])
        out["mm_token_type_ids"] = (input_ids == IMAGE_ID).long()
    return out


VIDEO_FAMILIES = ["llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def make_video_inputs(
    model, family: str, batch: int = 1, seed: int = 0, frames: int = 4, dtype=torch.float32, static: bool = False
) -> dict:
    """Left-padded video prompts, one clip per row (``frames`` frames, its own content; ``static``: all frames equal).

    Qwen: ``frames`` temporal slices of a 12x16 patch grid (48 tokens each); LLaVA-OneVision: ``frames`` frames of
    56 px pooled to 4x4 tokens each, plus one newline token.
    """
    gen = torch.Generator().manual_seed(seed)
    rows, pix, grids = [], [], []
    for i in range(batch):
        if family == "llava_onevision":
            frame = torch.randn(1, 1, 3, 56, 56, generator=gen)
            clip = frame.expand(1, frames, 3, 56, 56) if static else torch.randn(1, frames, 3, 56, 56, generator=gen)
            pix.append(clip.clone())
            n_tok = frames * 16 + 1
        else:
            gh, gw, patch = 12, 16, 3 * 2 * 2 * 2
            one = torch.randn(gh * gw, patch, generator=gen)
            clip = one.repeat(frames, 1) if static else torch.randn(frames * gh * gw, patch, generator=gen)
            pix.append(clip)
            grids.append(torch.tensor([[frames, gh, gw]]))
            n_tok = frames * gh * gw // 4
        pre = torch.randint(1, 90, (3 + i,), generator=gen).tolist()
        post = torch.randint(1, 90, (6 - 2 * i,), generator=gen).tolist()
        if family == "qwen3_vl":  # one vision block per frame, after a timestamp
            per = n_tok // frames
            body = sum(([50 + t, 60, VSTART_ID] + [VIDEO_ID] * per + [VEND_ID] for t in range(frames)), [])
        elif family.startswith("qwen"):
            body = [VSTART_ID] + [VIDEO_ID] * n_tok + [VEND_ID]
        else:
            body = [VIDEO_ID] * n_tok
        rows.append(pre + body + post)
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch, width), PAD_ID)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention_mask[i, width - len(r) :] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values_videos": torch.cat(pix).to(dtype)}
    if family.startswith("qwen"):
        out["video_grid_thw"] = torch.cat(grids)
        out["mm_token_type_ids"] = (input_ids == VIDEO_ID).long() * 2
    return out


# image: one image per row; multi: two images in the first row, one in the second; mixed: an image in the first row,
# text only in the second; video: one clip per row
CASES = [(f, k) for k in ("image", "multi", "mixed") for f in FAMILIES] + [(f, "video") for f in VIDEO_FAMILIES]


def inputs_for(model, family: str, kind: str, batch: int = 1, seed: int = 0, dtype=torch.float32) -> dict:
    if kind == "video":
        return make_video_inputs(model, family, batch=batch, seed=seed, dtype=dtype)
    per_row = {"multi": (2, 1), "mixed": (1, 0)}.get(kind, (1, 1))[:batch]
    return make_inputs(model, family, batch=batch, seed=seed, dtype=dtype, per_row=per_row)


def build_default_like(seed: int = 0):
    """A tiny random model shaped like the embedded default (DINOv2 tower at 224 px / 14 px patches, 256 tokens),
    with the default's real processor (word-level tokenizer, chat template)."""
    from training.build import build_processor

    processor = build_processor()
    tok = processor.tokenizer
    torch.manual_seed(seed)
    cfg = tf.LlavaConfig(
        vision_config=dict(
            model_type="dinov2",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=14,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return tf.LlavaForConditionalGeneration(cfg).eval(), processor


def stream_processor(family: str = "qwen2_vl"):
    """What :class:`vlm_accel.video.stream.StreamSession` needs of a processor, for the tiny models: the family's
    stock image processor (Qwen: 2-px patches, 2x2 merge, <= 24x24 px; LLaVA-NeXT / OneVision: 56-px tiles on the tiny
    pinpoints) and a word-level tokenizer whose ids match ``IMAGE_ID`` etc. (words ``w3`` .. ``w99``)."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    specials = {"<pad>": PAD_ID, "<s>": 1, "</s>": 2}
    specials.update({"<|image_pad|>": IMAGE_ID, "<|video_pad|>": VIDEO_ID})
    specials.update({"<|vision_start|>": VSTART_ID, "<|vision_end|>": VEND_ID})
    vocab = {**specials, **{f"w{i}": i for i in range(3, 100)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t.startswith("<|")]})
    image = "<|vision_start|><|image_pad|><|vision_end|>" if family.startswith("qwen") else "<|image_pad|>"
    fast.chat_template = (
        "{% for m in messages %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + " {% else %}{{ c['text'] }} {% endif %}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}w7{% endif %}"
    )
    if family.startswith("qwen"):
        ip = tf.Qwen2VLImageProcessorPil(
            patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=4 * 4, max_pixels=24 * 24
        )
    else:
        cls = tf.LlavaNextImageProcessorPil if family == "llava_next" else tf.LlavaOnevisionImageProcessorPil
        ip = cls(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_grid_pinpoints=_PINPOINTS)
    return SimpleNamespace(
        image_processor=ip,
        tokenizer=fast,
        apply_chat_template=lambda conv, **kw: fast.apply_chat_template(conv, tokenize=False, **kw),
        decode=fast.decode,
    )


def skip_unsupported(model, method: str, kind: str = "image") -> None:
    """Skip a matrix case whose method acts inside the vision tower on a family whose tower cannot merge (its adapter
    refuses ``tower_spec`` with a ``ValueError``, which ``accelerate`` raises too), or on a video (a merge inside the
    tower cannot follow the per-frame pooling after it: refused per request, tests/test_encoder_merge.py)."""
    import pytest

    from vlm_accel.adapters import adapter_for
    from vlm_accel.methods import get

    if get(method).stage != "tower":
        return
    if kind == "video":
        pytest.skip(f"{method} merges images only")
    try:
        adapter_for(model).tower_spec()
    except ValueError as e:
        pytest.skip(f"{method}: {e}")


# --- the 2026 families (issue #27): hybrid Qwen3.5, Gemma 3, InternVL -----------------------------------------------
NEW_FAMILIES = ["qwen3_5", "gemma3", "internvl", "smolvlm", "llava_onevision1_5", "glm4v"]
_BOI, _EOI = 104, 105


def build_new(family: str, attn: str = "sdpa", seed: int = 0):
    """A tiny random model of a 2026 family (its own config classes, transformers >= 5.25)."""
    if family == "qwen3_5":
        return build(family, attn=attn, seed=seed)
    torch.manual_seed(seed)
    text = dict(_LLAMA, num_key_value_heads=2)
    if family == "gemma3":
        cfg = tf.Gemma3Config(
            text_config=dict(text, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
            vision_config=dict(_VIT),
            mm_tokens_per_image=16,
            image_token_id=IMAGE_ID,
            boi_token_id=_BOI,
            eoi_token_id=_EOI,
        )
        cls = tf.Gemma3ForConditionalGeneration
    elif family == "internvl":
        vit = dict(_VIT, image_size=[56, 56], patch_size=[7, 7])
        cfg = tf.InternVLConfig(
            vision_config=vit,
            text_config=dict(model_type="qwen2", **text),
            image_token_id=IMAGE_ID,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        cls = tf.InternVLForConditionalGeneration
    elif family == "smolvlm":
        cfg = tf.SmolVLMConfig(
            vision_config=dict(_VIT),
            text_config=dict(model_type="llama", **text),
            image_token_id=IMAGE_ID,
            scale_factor=2,
        )
        cls = tf.SmolVLMForConditionalGeneration
    elif family == "llava_onevision1_5":
        vis = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2, spatial_merge_size=2)
        cfg = tf.LlavaOnevision15Config(
            vision_config=dict(vis, out_hidden_size=64, in_channels=3),
            text_config=dict(text, head_dim=16),
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VSTART_ID,
            vision_end_token_id=VEND_ID,
        )
        cls = tf.LlavaOnevision15ForConditionalGeneration
    elif family == "glm4v":  # GLM-4.6V: M-RoPE from its own get_rope_index
        vis = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2, spatial_merge_size=2)
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}
        cfg = tf.Glm46VConfig(
            vision_config=dict(vis, temporal_patch_size=2, out_hidden_size=64, image_size=16),
            text_config=dict(text, rope_parameters=rope),
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            image_start_token_id=VSTART_ID,
            image_end_token_id=VEND_ID,
        )
        cls = tf.Glm46VForConditionalGeneration
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn
    return cls(cfg).eval()


def new_inputs(model, family: str, batch: int = 1, seed: int = 0) -> dict:
    """Left-padded rows, one image each (InternVL: row 0's image in two tiles, the others in one; SmolVLM: two tiles
    per row)."""
    if family == "qwen3_5":
        return make_inputs(model, "qwen3_vl", batch=batch, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    rows, tiles = [], []
    for r in range(batch):
        text = torch.randint(3, 90, (4 + 3 * r,), generator=gen).tolist()
        if family == "gemma3":
            rows.append([1, *text[:2], _BOI, *[IMAGE_ID] * 16, _EOI, *text[2:]])
        elif family in ("llava_onevision1_5", "glm4v"):
            rows.append([1, *text[:2], VSTART_ID, *[IMAGE_ID] * 16, VEND_ID, *text[2:]])
        elif family == "smolvlm":
            rows.append([1, *text[:2], *([IMAGE_ID] * 16 + [7]) * 2, *text[2:]])
        else:
            n = 2 if r == 0 else 1
            tiles.append(n)
            rows.append([1, *text[:2], *([IMAGE_ID] * 16 + [7]) * n, *text[2:]])
    width = max(map(len, rows))
    ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    out = {"input_ids": ids, "attention_mask": (ids != PAD_ID).long()}
    n_images = sum(tiles) if tiles else batch
    if family == "smolvlm":
        out["pixel_values"] = torch.randn(batch, 2, 3, 56, 56, generator=gen)
    elif family in ("llava_onevision1_5", "glm4v"):  # 8 x 8 patches of 2 px, merged 2 x 2: 16 tokens per image
        temporal = 2 if family == "glm4v" else 1
        out["pixel_values"] = torch.randn(batch * 64, 3 * 2 * 2 * temporal, generator=gen)
        out["image_grid_thw"] = torch.tensor([[1, 8, 8]] * batch)
        if family == "glm4v":
            out["mm_token_type_ids"] = (ids == IMAGE_ID).long()
    else:
        out["pixel_values"] = torch.randn(n_images, 3, 56, 56, generator=gen)
    if family == "gemma3":
        out["token_type_ids"] = (ids == IMAGE_ID).long()
    return out
