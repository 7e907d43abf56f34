"""How far one random backfill order's top-1 sits from another's: the noise floor of the
"top-1 never below random order's" comparison (issue 10).

FastFill-random curves of several seeded permutations on the test gallery (cached embeddings,
bench/curve_cache.py; the h of bench/curve_lib.py); for every ordered pair, the lowest
top-1 difference over the backfill points. Nothing is chosen on these numbers.

    python bench/curve_random_spread.py --scenario bigger_model --seed 0 --permutations 5

Prints the median and the worst of the pairwise lowest differences, in points.
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from curve_lib import apply_h, load_with_h, random_curves, scenario_parser


def main(argv=None):
    ap = scenario_parser(__doc__.splitlines()[0])
    ap.add_argument("--permutations", type=int, default=5)
    a = ap.parse_args(argv)
    if a.permutations < 2:
        ap.error("--permutations must be at least 2")
    d, hf, _ = load_with_h(a)
    t, _ = apply_h(hf, d["old_test"])
    new, labels, ids = d["new_test"].astype(np.float64), d["y_test"], d["test_ids"]
    t0 = time.time()
    top1 = np.array([c.top1.to_numpy() for c in random_curves(
        t, new, labels, ids, range(100, 100 + a.permutations), distance=a.distance)])
    print(f"{a.permutations} random orders in {time.time() - t0:.0f} s")
    lowest = [float((top1[i] - top1[j]).min())
              for i, j in itertools.permutations(range(len(top1)), 2)]
    print(f"{a.scenario} seed {a.seed}, {len(ids)}-item gallery, {top1.shape[1]} points: lowest "
          f"top-1 difference between two random orders over {len(lowest)} ordered pairs: "
          f"median {100 * np.median(lowest):+.2f} pt, worst {100 * min(lowest):+.2f} pt")


if __name__ == "__main__":
    main()
