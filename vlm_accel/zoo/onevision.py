"""The default VLM as a stock ``LlavaOnevisionForConditionalGeneration``: one model for images and videos.

Built from the trained image model (a ``LlavaForConditionalGeneration``, packaged as ``default/`` until the video
weights replaced it; the zoo README says where it is kept): the same DINOv2 ViT-S/14
tower (position embeddings pre-interpolated to the 16×16 grid of a 224-px input, so ``vision_config.image_size`` is
224 as OneVision's pooling expects), the same projector and 4-layer Llama, plus OneVision's ``image_newline``.
Input layouts (what the language model sees):

- image (single, anyres with ``image_grid_pinpoints=[[224, 224]]``): 256 base tokens (the whole image squashed to
  224×224, exactly the LLaVA model's tokens) + the aspect-preserving 224-px view, unpadded, one newline per row
  (≤ 16×17) — at most 528 tokens;
- video (``pixel_values_videos [B, T, 3, 224, 224]``): each frame's 16×16 projected grid is pooled 2×2 to 8×8 → 64
  tokens per frame, ``T·64`` + one newline token (8 frames → 513 tokens).

The word-level tokenizer keeps every id of the image model and appends the clip questions' words and ``<video>``
(still within the 96-row embedding).

    python -m vlm_accel.zoo.onevision --src IMAGE_MODEL_DIR --out /work/zoo-video-ckpt/init   # the training init
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

VIDEO_WORDS = [
    "way",
    "does",
    "move",
    "up",
    "down",
    "that",
    "appears",
    "disappears",
    "at",
    "end",
    "change",
    "first",
    "start",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% elif c['type'] == 'video' %}<video> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endif %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PINPOINTS = [[224, 224]]
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # the DINOv2 tower's normalisation
IMAGENET_STD = [0.229, 0.224, 0.225]
FRAME_TOKENS = 64  # 8×8 pooled tokens per frame


def vocabulary() -> list[str]:
    """The image model's vocabulary (same ids) + the clip words + ``<video>``."""
    from .render import vocabulary as image_vocabulary

    words = image_vocabulary()
    return words + [w for w in VIDEO_WORDS if w not in words] + ["<video>"]


def word_tokenizer(words: list[str], media: tuple[str, ...], model_max_length: int, chat_template: str):
    """Word-level ``PreTrainedTokenizerFast`` over ``words`` (lower-cased, punctuation split, ``<s>`` prepended),
    with ``media`` placeholder tokens (``"<image>"`` -> ``image_token``) as special tokens."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={f"{m.strip('<>')}_token": m for m in media},
        model_max_length=model_max_length,
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": list(media)})
    fast.chat_template = chat_template
    return fast


def build_tokenizer():
    """The clip model's tokenizer: the image model's words (same ids) + the clip words + ``<video>``."""
    return word_tokenizer(vocabulary(), ("<image>", "<video>"), 2048, CHAT_TEMPLATE)


def build_image_processor():
    from transformers import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(
        size={"height": 224, "width": 224},
        image_grid_pinpoints=PINPOINTS,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        resample=3,
        do_pad=True,
    )


class FrameVideoProcessor:
    """What ``LlavaOnevisionVideoProcessor`` computes here, without torchvision (which that class requires).

    Each frame is squashed to 224×224 (bicubic), scaled to [0, 1] and normalised with the ImageNet mean / std;
    returns ``pixel_values_videos [B, T, 3, 224, 224]``. Accepts one video or a list of videos, each a
    ``[T, H, W, 3]`` uint8 array or a list of PIL images.
    """

    model_input_names = ["pixel_values_videos"]

    def __init__(self, size: int = 224, image_mean=None, image_std=None):
        self.size = {"height": size, "width": size}
        self.image_mean = list(image_mean or IMAGENET_MEAN)
        self.image_std = list(image_std or IMAGENET_STD)

    def frames(self, frames) -> torch.Tensor:
        """``[T, 3, 224, 224]`` float32 from ``[T, H, W, 3]`` uint8 or a list of PIL images."""
        import numpy as np
        from PIL import Image

        out = []
        for f in frames:
            im = f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f, dtype=np.uint8))
            im = im.convert("RGB").resize((self.size["width"], self.size["height"]), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
        x = torch.stack(out)
        mean = torch.tensor(self.image_mean)[None, :, None, None]
        std = torch.tensor(self.image_std)[None, :, None, None]
        return (x - mean) / std

    def __call__(self, videos=None, return_tensors=None, **kwargs):
        from PIL import Image
        from transformers import BatchFeature

        if videos is None:
            raise ValueError("no videos given")
        single = getattr(videos, "ndim", 0) == 4 or (
            isinstance(videos, (list, tuple)) and len(videos) > 0 and isinstance(videos[0], Image.Image)
        )
        vids = [videos] if single else list(videos)
        pv = torch.stack([self.frames(v) for v in vids])
        return BatchFeature({"pixel_values_videos": pv}, tensor_type=return_tensors)


def build_video_processor():
    """Stock ``LlavaOnevisionVideoProcessor`` (224×224 squash, ImageNet statistics) when torchvision is installed,
    else :class:`FrameVideoProcessor` (the same arithmetic)."""
    try:
        import torchvision  # noqa: F401
        from transformers import LlavaOnevisionVideoProcessor

        return LlavaOnevisionVideoProcessor(
            size={"height": 224, "width": 224}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, resample=3
        )
    except ImportError:
        return FrameVideoProcessor()


def assemble_processor(image_processor, tokenizer, video_processor, chat_template: str = CHAT_TEMPLATE):
    """A ``LlavaOnevisionProcessor`` for this model. Without torchvision its constructor's class check fails (it
    looks up the video processor classes), so the same attributes are then set directly."""
    from transformers import LlavaOnevisionProcessor

    kw = dict(
        num_image_tokens=257,  # 256 patches + CLS: the processor subtracts 1 for the "default" strategy
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
    )
    try:
        return LlavaOnevisionProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, **kw
        )
    except (AttributeError, ImportError, TypeError):
        p = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
        p.image_processor, p.tokenizer, p.video_processor = image_processor, tokenizer, video_processor
        p.chat_template = chat_template
        p.num_image_tokens = kw["num_image_tokens"]
        p.vision_feature_select_strategy = kw["vision_feature_select_strategy"]
        p.image_token, p.video_token = "<image>", "<video>"
        p.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        p.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
        p.vision_aspect_ratio = kw["vision_aspect_ratio"]
        return p


def build_processor():
    return assemble_processor(build_image_processor(), build_tokenizer(), build_video_processor())


def load_processor(path: str | os.PathLike):
    """Load the processor saved next to the model (works with or without torchvision)."""
    from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ip = LlavaOnevisionImageProcessorPil.from_pretrained(path, local_files_only=True)
    return assemble_processor(ip, tok, build_video_processor(), tok.chat_template or CHAT_TEMPLATE)


def save_processor(processor, path: str | os.PathLike) -> None:
    """Tokenizer (with the chat template) + image processor files; the video processor has no state to save."""
    processor.tokenizer.chat_template = processor.chat_template
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)


def build_config(image_config, tokenizer):
    from transformers import Dinov2Config, LlamaConfig, LlavaOnevisionConfig

    vision = Dinov2Config(**{**image_config.vision_config.to_dict(), "image_size": 224})
    text = LlamaConfig(**image_config.text_config.to_dict())
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=PINPOINTS,
        tie_word_embeddings=True,
        multimodal_projector_bias=True,
    )


def is_onevision(path: str | os.PathLike) -> bool:
    """Whether the model directory ``path`` holds a LLaVA-OneVision model (``config.json``'s ``model_type``)."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "llava_onevision"


def load_video_default():
    """``(model, processor)`` of the embedded default with a video input: the packaged model when it is the
    OneVision one, else the packaged image model's weights in the OneVision layout (:func:`from_image_model`)."""
    from . import DEFAULT_DIR, load_default

    return load_default(DEFAULT_DIR) if is_onevision(DEFAULT_DIR) else from_image_model(DEFAULT_DIR)


@torch.no_grad()
def from_image_model(src: str | os.PathLike | None = None):
    """``(model, processor)``: a OneVision model carrying the image model's tower, projector and LM weights."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    from . import DEFAULT_DIR

    src = Path(src or DEFAULT_DIR)
    if is_onevision(src):
        raise ValueError(
            f"{src} already holds a OneVision model; from_image_model takes the trained LLaVA image model's directory "
            "(python -m training.train, or the zoo README's account of where the image weights are kept)"
        )
    llava = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32, local_files_only=True)
    processor = build_processor()
    tok = processor.tokenizer
    if len(tok) > llava.config.text_config.vocab_size:
        raise RuntimeError(f"vocabulary ({len(tok)}) outgrew the embedding ({llava.config.text_config.vocab_size})")
    cfg = build_config(llava.config, tok)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    vt = llava.model.vision_tower.state_dict()
    emb = llava.model.vision_tower.embeddings
    pos = emb.interpolate_pos_encoding(torch.zeros(1, 257, 384), 224, 224)  # CLS + 16×16, as the LLaVA model used
    vt["embeddings.position_embeddings"] = emb.position_embeddings.new_zeros(1, 257, 384) + pos
    model.model.vision_tower.load_state_dict(vt)
    model.model.multi_modal_projector.load_state_dict(llava.model.multi_modal_projector.state_dict())
    model.model.language_model.load_state_dict(llava.model.language_model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    # newline: the mean word embedding (small, neutral start)
    model.model.image_newline.copy_(model.model.language_model.embed_tokens.weight[:77].mean(0))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    )
    return model, processor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="the trained LLaVA image model's directory (python -m training.train)")
    ap.add_argument("--out", default="/work/zoo-video-ckpt/init")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    model, processor = from_image_model(args.src)
    model.save_pretrained(args.out)
    save_processor(processor, args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
