"""Staging in the C request queue (csrc/python/reqqueue.c, "Staging"): the dispatcher
registers a buffer for the next batch (_q_stage), requests of its key get its next rows
and are copied there (by their own callers, GIL released, or by the take), and the take
tells the dispatcher (_q_staged) whether the batch it formed is exactly the buffer's
first rows. The test thread plays the dispatcher, as in test_batcher_cqueue.py; the
Batcher uses this on its device path (cuda/mps), checked on a GPU by
test_batcher_serving.py's cuda pipeline test.
"""
import concurrent.futures
import random
import threading
import time

import pytest
import torch

from agxguard._C import RequestQueue

from test_batcher_cqueue import TIMEOUT, Caller, Q, wait_queued

WIDTH = 3


def key_of(q, x):
    """The queue's batching key number for requests shaped like x."""
    r = q._q_put(x, concurrent.futures.Future(), False, None, None)
    batch, _, _, _, _ = q._q_take(1, 0.0, None)
    assert batch == [r]
    q._q_complete(batch, [x], None)
    return r.key


def stage(q, key, rows=8, fill=-1.0):
    buf = torch.full((rows, WIDTH), fill)
    assert q._q_stage(buf, key, buf.data_ptr(), WIDTH * 4, rows, torch.Tensor, False) is True
    return buf


def row(v, n=1):
    return torch.full((n, WIDTH), float(v))


def test_callers_copy_their_own_requests_into_the_buffer_and_the_batch_is_its_first_rows():
    q = Q()
    key = key_of(q, row(0))
    buf = stage(q, key)
    callers = [Caller(q, row(i + 1)) for i in range(8)]
    for c in callers:
        c.start()
    wait_queued(q, 8)
    time.sleep(0.1)  # each caller copies right after releasing the GIL, before it waits
    batch, xs, rows, _, _ = q._q_take(8, 0.0, None)
    got, n = q._q_staged()
    assert got is buf and n == 8
    assert torch.equal(buf, torch.cat(xs))  # row i is the i-th request of the batch
    assert q._q_staged() is None  # read once
    s = q._q_stats()
    assert (s["staged_batches"], s["staged_by_callers"]) == (1, 8)
    q._q_complete(batch, [x * 2 for x in xs], None)
    for c in callers:
        c.join(TIMEOUT)
        assert c.error is None and torch.equal(c.result, c.x * 2)


def test_the_take_copies_what_no_caller_copied_futures_and_requests_queued_before_the_buffer():
    q = Q()
    key = key_of(q, row(0))
    early = [q._q_put(row(i), concurrent.futures.Future(), False, None, None) for i in range(3)]
    buf = stage(q, key)  # the three queued get rows 0..2
    late = [q._q_put(row(i, 2), concurrent.futures.Future(), False, None, None) for i in (7, 8)]
    batch, xs, _, _, _ = q._q_take(8, 0.0, None)
    assert batch == early + late
    got, n = q._q_staged()
    assert got is buf and n == 7
    assert torch.equal(buf[:7], torch.cat(xs)) and torch.equal(buf[7], row(-1)[0])  # the rest untouched
    assert q._q_stats()["staged_by_callers"] == 0


def test_a_batch_that_is_not_the_buffers_first_rows_is_refused_and_the_buffer_freed():
    q = Q()
    key = key_of(q, row(0))
    # a request given up after it got rows leaves a gap: the batch skips it
    buf = stage(q, key)
    reqs = [q._q_put(row(i), concurrent.futures.Future(), False, None, None) for i in range(4)]
    assert q._q_give_up(reqs[1]) is True
    batch, xs, _, _, _ = q._q_take(8, 0.0, None)
    assert batch == [reqs[0], reqs[2], reqs[3]]
    assert q._q_staged() == (buf, 0)
    q._q_complete(batch, xs, None)
    # a non-contiguous request gets no rows: the batch starts with it
    buf = stage(q, key)
    nc = torch.arange(2 * WIDTH, dtype=torch.float32).reshape(WIDTH, 2).t()[:1]
    assert not nc.is_contiguous()
    first = q._q_put(nc, concurrent.futures.Future(), False, None, None)
    second = q._q_put(row(5), concurrent.futures.Future(), False, None, None)
    batch, xs, _, _, _ = q._q_take(8, 0.0, None)
    assert batch == [first, second] and q._q_staged() == (buf, 0)
    assert torch.equal(torch.cat(xs), torch.cat([nc, row(5)]))  # concatenated as usual
    q._q_complete(batch, xs, None)
    # another shape (key) is never given rows; more rows than the buffer holds neither
    buf = stage(q, key, rows=2)
    other = q._q_put(torch.zeros(1, WIDTH + 1), concurrent.futures.Future(), False, None, None)
    a = q._q_put(row(1, 2), concurrent.futures.Future(), False, None, None)
    b = q._q_put(row(2), concurrent.futures.Future(), False, None, None)  # does not fit
    batch, _, _, _, _ = q._q_take(8, 0.0, None)
    assert batch == [other] and q._q_staged() == (buf, 0)
    buf = stage(q, key, rows=2)
    batch, xs, _, _, _ = q._q_take(8, 0.0, None)
    assert batch == [a, b]
    got, n = q._q_staged()
    # a was copied into the buffer by the take, b has no rows there: the batch is concatenated
    assert got is buf and n == 0 and torch.equal(buf, row(1, 2))


def test_staging_refuses_bad_arguments_a_second_buffer_and_padded_queues():
    q = Q()
    buf = torch.zeros(4, WIDTH)
    bad = [(buf, 0, 0, 12, 4, torch.Tensor, False), (buf, 0, buf.data_ptr(), 0, 4, torch.Tensor, False),
           (buf, 0, buf.data_ptr(), 12, 0, torch.Tensor, False),
           (buf, 0, buf.data_ptr(), 12, 4, "Tensor", False)]
    for args in bad:
        with pytest.raises(ValueError, match="data_ptr must be non-zero, row_bytes and rows >= 1"):
            q._q_stage(*args)
    with pytest.raises(TypeError, match="_q_stage"):
        q._q_stage(buf)
    assert q._q_stage(buf, 0, buf.data_ptr(), 12, 4, torch.Tensor, False) is True
    assert q._q_stage(buf, 0, buf.data_ptr(), 12, 4, torch.Tensor, False) is False  # one at a time
    padded = RequestQueue(pad_dim=1)
    with pytest.raises(ValueError, match="pad_dim are not staged"):
        padded._q_stage(buf, 0, buf.data_ptr(), 12, 4, torch.Tensor, False)


def test_many_callers_and_two_buffers_in_turn_never_mix_requests():
    """16 threads, each request carrying its own value; the test dispatcher registers one
    of two buffers after every take (as the Batcher does with its pool) and answers each
    request from the staged buffer when the batch is staged (else from the inputs):
    every answer must be its own request, and most batches staged. (It caught a copy past
    the end of a buffer: torch releases the GIL inside Tensor.is_neg(), and rows checked
    before that call were taken by another caller by the time they were given.)"""
    q = Q(spin_us=200)
    key = key_of(q, row(0))
    threads, per = 16, 200
    pool = [torch.full((8, WIDTH), -1.0) for _ in range(2)]
    stop = threading.Event()
    wrong, staged = [], [0]

    def dispatcher():
        turn = 0
        q._q_stage(pool[0], key, pool[0].data_ptr(), WIDTH * 4, 8, torch.Tensor, False)
        while not stop.is_set():
            got = q._q_take(8, 0.0005, None)
            if got is None:
                return
            batch, xs, rows, _, deliver = got
            if not batch:
                continue
            st = q._q_staged()
            turn ^= 1
            nxt = pool[turn]
            q._q_stage(nxt, key, nxt.data_ptr(), WIDTH * 4, 8, torch.Tensor, False)
            if st is not None and st[1] == len(batch):
                staged[0] += 1
                src = st[0][:st[1]].clone()
                st[0].fill_(-1.0)  # reused later: stale rows must not pass as answers
            else:
                src = torch.cat(xs)
            q._q_complete(batch, list(src.split(1)), None)

    def caller(t):
        rng = random.Random(t)
        for i in range(per):
            v = t * 1000 + i
            out = q(row(v), timeout=TIMEOUT)
            if not torch.equal(out, row(v)):
                wrong.append((v, out))
            if rng.random() < 0.1:
                time.sleep(0.0002)

    d = threading.Thread(target=dispatcher, daemon=True)
    d.start()
    cs = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
    for c in cs:
        c.start()
    for c in cs:
        c.join(60)
    stop.set()
    q._q_close("closed", False)
    d.join(TIMEOUT)
    assert not wrong, wrong[:3]
    s = q._q_stats()
    assert s["answered"] == threads * per + 1
    assert staged[0] >= s["batches"] // 4, (staged[0], s["batches"])
    assert s["staged_by_callers"] > 0


def test_a_negated_single_element_is_not_staged():
    """The .imag of a conjugated complex tensor of one element is a contiguous view whose
    memory holds the value before negation: with a stage of one element per row, such a
    request is asked is_neg() and concatenated (torch negates it), never copied raw."""
    q = Q()
    one = torch.tensor([[5.0]])
    key = key_of(q, one)
    neg = torch.tensor([[1.0 + 2.0j]]).conj().imag
    assert neg.is_neg() and neg.is_contiguous() and neg.item() == -2.0
    buf = torch.full((4, 1), 9.0)
    assert q._q_stage(buf, key, buf.data_ptr(), 4, 4, torch.Tensor, True) is True
    a = q._q_put(neg, concurrent.futures.Future(), False, None, None)
    b = q._q_put(one, concurrent.futures.Future(), False, None, None)
    batch, xs, _, _, _ = q._q_take(8, 0.0, None)
    assert batch == [a, b] and q._q_staged() == (buf, 0)  # the batch is concatenated
    assert torch.cat(xs).tolist() == [[-2.0], [5.0]]
    # the same stage without the check would have taken the raw +2.0: it is the check that refuses
    buf = torch.full((4, 1), 9.0)
    assert q._q_stage(buf, key, buf.data_ptr(), 4, 4, torch.Tensor, False) is True
    c = q._q_put(neg, concurrent.futures.Future(), False, None, None)
    batch, _, _, _, _ = q._q_take(8, 0.0, None)
    assert batch == [c] and q._q_staged() == (buf, 1) and buf[0].item() == 2.0
