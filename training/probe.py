"""Lookup probe: does the answer position find the object a colour question names?

For held-out scenes with two objects of different shapes, ask "What color is the <shape>?" about each object and
measure, per LM layer and head, the attention mass from the answer position onto the asked object's patches and onto
the other object's patches. A model that looks objects up by shape name puts its mass on the asked object; one that
does not splits it by saliency, whichever object is asked (what the step-2000 weights did: 0.50 / 0.50).

    python -m training.probe [--model DIR] [--n 60]
"""

from __future__ import annotations

import argparse
import logging

import torch

from vlm_accel.zoo import DEFAULT_DIR
from vlm_accel.zoo.render import render_scene

log = logging.getLogger("training.probe")


@torch.no_grad()
def lookup_mass(model, processor, n: int = 60, start: int = 0) -> dict[str, torch.Tensor]:
    """Attention mass from the answer position, averaged over ``n`` two-object scenes × both objects.

    Returns ``asked`` and ``other``: ``[layers, heads]`` mass on the asked / the other object's image tokens.
    """
    asked, other = [], []
    sid = start
    while len(asked) < 2 * n:
        scene = render_scene(sid, "heldout")
        sid += 1
        objs = scene.objects
        if len(objs) != 2 or objs[0].shape == objs[1].shape:
            continue
        labels = torch.from_numpy(scene.patch_labels.reshape(-1).copy())
        for k in range(2):
            prompt = processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": f"What color is the {objs[k].shape}?"}],
                    }
                ],
                add_generation_prompt=True,
            )
            inputs = processor(images=scene.image, text=prompt, return_tensors="pt")
            out = model(**inputs, output_attentions=True)
            img = (inputs["input_ids"][0] == model.config.image_token_index).nonzero()[:, 0]
            att = torch.stack([a[0, :, -1] for a in out.attentions]).float()  # [layers, heads, L]
            asked.append(att[:, :, img[labels == k]].sum(-1))
            other.append(att[:, :, img[labels == 1 - k]].sum(-1))
    return {"asked": torch.stack(asked).mean(0), "other": torch.stack(other).mean(0)}


def main() -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_DIR))
    ap.add_argument("--n", type=int, default=60, help="two-object scenes (each asked about both objects)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = LlavaForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    ).eval()
    processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
    m = lookup_mass(model, processor, args.n)
    for layer in range(m["asked"].shape[0]):
        pairs = zip(m["asked"][layer].tolist(), m["other"][layer].tolist(), strict=True)
        cells = "  ".join(f"h{h} {a:.2f}/{o:.2f}" for h, (a, o) in enumerate(pairs))
        log.info("layer %d  (asked/other)  %s", layer, cells)


if __name__ == "__main__":
    main()
