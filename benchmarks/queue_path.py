"""The C request queue's own cost per request on the staged path, one thread, no device:
register a buffer (_q_stage), queue 8 futures (_q_put), take them (_q_take, _q_staged)
and answer them (_q_complete); microseconds per request, best and median of R rounds of
3000 batches. Give it the directory of an agxguard build to compare commits:

    python3 benchmarks/queue_path.py [AGXGUARD_DIR] [ROUNDS]

(for another commit: git archive <sha> csrc setup.py agxguard | tar x -C DIR, then
python3 setup.py build_ext --inplace there). Run the two builds alternately: one
process's figure moves with the machine.
"""
import concurrent.futures
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(HERE))

import torch  # noqa: E402

from agxguard._C import RequestQueue  # noqa: E402


class Q(RequestQueue):
    name = "q"


def main() -> None:
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    q = Q()
    x = torch.zeros(1, 256)
    xs = [torch.randn(1, 256) for _ in range(8)]
    r = q._q_put(x, concurrent.futures.Future(), False, None, None)
    batch, *_ = q._q_take(1, 0.0, None)
    q._q_complete(batch, [x], None)
    key = r.key
    buf = torch.empty(8, 256)
    # builds before 6f5b840 take six arguments (no `single`)
    extra = (False,) if "single" in (RequestQueue._q_stage.__doc__ or "") else ()

    def one_batch() -> None:
        q._q_stage(buf, key, buf.data_ptr(), 1024, 8, torch.Tensor, *extra)
        for i in range(8):
            q._q_put(xs[i], concurrent.futures.Future(), False, None, None)
        batch, ys, _, _, _ = q._q_take(8, 0.0, None)
        staged = q._q_staged()
        assert staged is not None and staged[1] == 8, staged
        q._q_complete(batch, ys, None)

    per = []
    for _ in range(rounds):
        n = 3000
        t = time.perf_counter()
        for _ in range(n):
            one_batch()
        per.append((time.perf_counter() - t) / (n * 8) * 1e6)
    per.sort()
    print(f"us per request: best {per[0]:.3f}, median {per[len(per) // 2]:.3f} ({rounds} rounds)")


if __name__ == "__main__":
    main()
