"""Write a local lmms-eval task from the embedded default model's held-out split (offline, no hub).

    python eval/lmms/make_task.py OUT [--n 200] [--seed 0]

OUT gets ``images/*.png``, ``questions.jsonl`` (``{image, question, answer, type}``: also the ``--data`` format of
``vlm-accel bench vqa``), and the task ``vlm_accel_shapes.yaml`` + ``utils.py`` for ``--include_path OUT``. Metric:
``exact_match`` after :func:`vlm_accel.zoo.normalize_answer`, the same as ``vlm-accel bench vqa``; greedy, 4 new
tokens (the bench's setting).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TASK = "vlm_accel_shapes"
HERE = Path(__file__).resolve().parent

YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: vlm_accel.zoo.heldout(n={n}, seed={seed})
"""


def write_task(out: str | Path, n: int = 200, seed: int = 0) -> Path:
    """Write the task into ``out``; returns the ``questions.jsonl`` path."""
    from vlm_accel.zoo import heldout

    out = Path(out).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    data = out / "questions.jsonl"
    with open(data, "w") as f:
        for i, item in enumerate(heldout(n, seed)):
            name = f"images/{i:05d}.png"
            item["image"].save(out / name)
            rec = {"image": name, "image_path": str(out / name), "question": item["question"]}
            rec.update(answer=str(item["answer"]), type=item["type"])
            f.write(json.dumps(rec) + "\n")
    (out / f"{TASK}.yaml").write_text(YAML.format(task=TASK, data=data, n=n, seed=seed))
    shutil.copy(HERE / "task_utils.py", out / "utils.py")
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(write_task(a.out, a.n, a.seed))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
