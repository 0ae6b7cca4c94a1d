"""lmms-eval hooks of the local ``vlm_accel_shapes`` task (copied next to its YAML as ``utils.py``)."""

from PIL import Image

from vlm_accel.zoo import normalize_answer


def doc_to_visual(doc):
    with Image.open(doc["image_path"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
