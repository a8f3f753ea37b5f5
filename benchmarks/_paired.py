"""Paired-round statistics shared by the benchmarks that interleave two variants
(efficiency.py --slice, serving.py --paired): each round measures both variants within a
second of each other, so a ratio per round and the ratio of the totals over all rounds
are robust to a host whose speed drifts over seconds."""
from __future__ import annotations

import random
from typing import List


def total_ratio(aq: List[float], ae: List[float], bq: List[float], be: List[float]) -> float:
    """(sum aq / sum ae) / (sum bq / sum be): the two variants' throughputs over all rounds
    (aq, bq: requests per round; ae, be: seconds per round)."""
    return (sum(aq) / sum(ae)) / (sum(bq) / sum(be))


def bootstrap_ci(aq: List[float], ae: List[float], bq: List[float], be: List[float],
                 resamples: int = 2000, seed: int = 12) -> List[float]:
    """95% interval of total_ratio, resampling rounds (each round keeps its pair together)."""
    rng = random.Random(seed)
    k = len(aq)
    out = []
    for _ in range(resamples):
        idx = [rng.randrange(k) for _ in range(k)]
        out.append(total_ratio([aq[i] for i in idx], [ae[i] for i in idx],
                               [bq[i] for i in idx], [be[i] for i in idx]))
    out.sort()
    return [out[int(0.025 * resamples)], out[int(0.975 * resamples) - 1]]
