"""Accuracy-vs-budget benchmark (see vlm_accel.bench.vqa). Example:

python eval/bench_vqa.py --n 500 --out eval/results
"""

import sys

from vlm_accel.bench.vqa import main

if __name__ == "__main__":
    sys.exit(main())
