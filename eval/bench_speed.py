"""Speed benchmark (see vlm_accel.bench.speed). Example:

python eval/bench_speed.py --repeats 5 --out eval/results
"""

from vlm_accel.bench.speed import main

if __name__ == "__main__":
    main()
