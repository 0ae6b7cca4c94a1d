"""Video speed benchmark (see vlm_accel.bench.video). Example:

python eval/bench_video.py --video carphone_pristine.mp4 --frames 8 16 32
"""

import sys

from vlm_accel.bench.video import main

if __name__ == "__main__":
    sys.exit(main())
