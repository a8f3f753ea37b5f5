/* acquire.c: blocking waits for Python and native callers (see acquire.h). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#include "acquire.h"
#include "module_state.h"
#include "spin.h"

_Atomic int agx_heir_seat_on = 1;
/* The heir's spin before it sleeps (in a spinning slot, spin.h). Without it the
 * grace period rarely sees a release (the heir sleeps, and a futex wake comes
 * late): H200, global@grace+nospin vs global, results/efficiency_h200_variants.txt,
 * grace sightings 161 vs 54,218 on small_mlp, throughput within the noise
 * (0.81-1.07 vs 0.77-1.23 of threading.Lock across the eight workloads). */
_Atomic int64_t agx_heir_spin_ns = 200000;
/* The grace period (heir_watch). What it buys, H200, 8 threads, global/threading.Lock
 * medians of 5 paired repeats (results/efficiency_h200_variants.txt, commit f8c2713,
 * both with the 5 ms claim), grace vs watch: small_mlp 1.04/0.99, story_transformer
 * 0.82/0.86, large_transformer 0.91/0.88, medium_mlp 0.90/0.96, matmul 1.23/1.13,
 * server pattern small_mlp 0.93/0.91, story 0.77/0.74, large 1.02/1.00 (spread of
 * single repeats about +-0.15); the heir's GIL trips that lost the race fell from
 * 51,526 of 51,977 to 14 of 425 (small_mlp), 41,775 of 42,226 to 15 of 396 (matmul).
 * Direct taking (the waiter takes the lock with the GIL released, as
 * threading.Lock's do) was 0.89-1.16, and its p99 latency 8-280 ms on the
 * short workloads where the others stayed under 0.4 ms. */
_Atomic int agx_region_wait = AGX_WAIT_GRACE;
_Atomic int64_t agx_grace_ns = 20000;
_Atomic int agx_claim_on = 1;
agx_wait_counts agx_wait_counts_now;

/* A holder that keeps the GIL between its guarded calls takes the lock again
 * before the heir can get the GIL to take it; after watching this long the
 * heir claims the lock (lock.h), as CPython's GIL forces a switch after its
 * interval. Counted from when it became heir, not from when it began to wait:
 * a waiter that slept long on the seat must not claim at once, or the lock
 * would change hands after every hold, each time at the price of GIL handoffs. */
#define CLAIM_NS (5 * 1000000LL)
/* ... and only once the lock has been taken this many times in front of it:
 * each forced handoff costs about one more hold (another thread's model and
 * stream go cold on the GPU), so the claim bounds a waiter's turn in holds of
 * the lock, not in time alone. The op lock, held microseconds per op, passes
 * 64 holds well within CLAIM_NS (claims as before); a region lock held for a
 * whole request claims after 64 requests instead of after every few.
 * H200, python3 benchmarks/efficiency.py --device cuda --threads 8 --duration 0.4
 * --repeats 5 --configs lock,global,global@grace+noclaim,... (commit f8c2713):
 * claiming after 5 ms alone, global/threading.Lock was story_transformer 0.82,
 * its server pattern 0.77, small_mlp server 0.93 with 11-14% of holds handed
 * over; without a claim 1.04, 0.96, 1.07 with 2% (p99 latency 68-85 ms with
 * the claim, 0.7-400 ms without; threading.Lock's own p99 1.3-400 ms). */
#define CLAIM_PASSES 64
/* Even so the claim cost region locks more than it gave, so only the op lock's
 * heir claims; a region lock (global, stream) hands over the way threading.Lock
 * does, when a waiter sees it free, and is as fair as threading.Lock and no
 * fairer (p99 latency up to about 400 ms for large_transformer, as the Lock's).
 * H200, python3 benchmarks/efficiency.py --device cuda --workloads small_mlp,
 * story_transformer,large_transformer,medium_mlp,matmul,small_mlp@server,
 * story_transformer@server,large_transformer@server --configs lock,global,
 * global@noclaim --threads 8 --duration 0.4 --repeats 5 (commit a0217a7,
 * results/efficiency_h200.txt), global/threading.Lock with the 64-hold claim vs
 * none: 1.00/1.12, 1.17/1.32, 0.97/0.99, 0.92/1.09, 1.02/1.09, server 0.91/1.07,
 * 1.02/1.04, 0.94/0.97; holds handed over 0.8-6.9% vs 0.1-5.3%. The op lock keeps
 * it: tests/test_torch_ops.py (no thread starves; waits reached 0.3-0.5 s without). */

static void abort_on_timeout(const char *name, const char *what, int64_t waited_ns) {
    fprintf(stderr,
            "agxguard: waited %lld ms for the '%s' %s, past the timeout; aborting "
            "(AGXGUARD_LOCK_TIMEOUT_MS, timeout action 'abort')\n",
            (long long)(waited_ns / 1000000), name, what);
    fflush(stderr);
    abort();
}

/* The end of the wait slice that starts now: the slice, cut at the warn
 * threshold (once), the timeout and `cut` (>= 0: another instant, such as the
 * heir's claim time). */
static int64_t slice_end(int64_t start, int64_t warn, int warned, int64_t timeout, int64_t cut) {
    int64_t deadline = agx_now_ns() + AGX_SLICE_NS;
    if (cut >= 0 && cut < deadline) deadline = cut;
    if (timeout > 0 && start + timeout < deadline) deadline = start + timeout;
    if (warn > 0 && !warned && start + warn < deadline) deadline = start + warn;
    return deadline;
}

/* Between slices, with the GIL: run signal handlers, warn once past the warn
 * threshold, give up past the timeout. Returns 0 to go on waiting, -1 with a
 * Python exception set. */
static int between_slices(const char *name, const char *what, int64_t start, int64_t warn, int *warned,
                          int64_t timeout, void (*note_timeout)(void *), void *obj) {
    if (PyErr_CheckSignals() < 0) return -1;
    int64_t waited = agx_now_ns() - start;
    if (warn > 0 && !*warned && waited >= warn) {
        *warned = 1;
        if (PyErr_WarnFormat(agx_LockWaitWarning, 1, "agxguard: waited %lld ms for the '%s' %s (warn threshold %lld ms)",
                             (long long)(waited / 1000000), name, what, (long long)(warn / 1000000)) < 0)
            return -1;
    }
    if (timeout > 0 && waited >= timeout) {
        note_timeout(obj);
        if (atomic_load(&agx_wait.timeout_aborts)) abort_on_timeout(name, what, waited);
        PyErr_Format(agx_LockTimeout, "agxguard: gave up on the '%s' %s after %lld ms (timeout %lld ms)", name, what,
                     (long long)(waited / 1000000), (long long)(timeout / 1000000));
        return -1;
    }
    return 0;
}

static void note_lock_timeout(void *l) { agx_lock_note_timeout(l); }
static void note_sem_timeout(void *s) { agx_sem_note_timeout(s); }

static int lock_taken(void *l) { return atomic_load_explicit(&((agx_lock *)l)->owner, memory_order_relaxed) != 0; }

/* The heir, GIL released, until the lock is worth taking the GIL for (1) or
 * the deadline passes (0). Watching alone returns at the first free sighting;
 * with a grace period (AGX_WAIT_GRACE) a sighting counts only if the lock stays
 * free for grace_ns: a releaser that takes it straight back (it holds the GIL,
 * it is on its way into its next region) keeps it, and the heir does not take
 * the GIL from it for a try that would lose. */
static uint64_t acquisitions(agx_lock *l) { return atomic_load_explicit(&l->n_acq, memory_order_relaxed); }

/* The heir that watched in vain for CLAIM_NS and CLAIM_PASSES holds claims the lock. */
static void maybe_claim(agx_lock *l, int *claimed, int64_t heir_since, uint64_t acq_since) {
    if (*claimed || agx_now_ns() - heir_since < CLAIM_NS || acquisitions(l) - acq_since < CLAIM_PASSES) return;
    *claimed = agx_lock_claim(l);
}

static int heir_watch(agx_lock *l, int64_t deadline, int may_claim, int *claimed, int64_t heir_since,
                      uint64_t acq_since) {
    int64_t spin = atomic_load_explicit(&agx_heir_spin_ns, memory_order_relaxed);
    int grace = atomic_load_explicit(&agx_region_wait, memory_order_relaxed) == AGX_WAIT_GRACE;
    int64_t grace_ns = atomic_load_explicit(&agx_grace_ns, memory_order_relaxed);
    for (;;) {
        if (may_claim) maybe_claim(l, claimed, heir_since, acq_since);
        if (!agx_lock_watch_until(l, deadline, spin)) return 0;
        /* claimed: nobody else may take it; no slot: no grace */
        if (!grace || *claimed || !agx_spin_slotted(lock_taken, l, grace_ns)) return 1;
        atomic_fetch_add_explicit(&agx_wait_counts_now.grace_retaken, 1, memory_order_relaxed);
        if (deadline >= 0 && agx_now_ns() >= deadline) return 0;
    }
}

/* A Python waiter for a lock. Default (watch): it only watches the lock with
 * the GIL released and takes it after getting the GIL back, so it never holds
 * the lock while it waits for the GIL; only one Python waiter at a time watches
 * (the heir, lock.h), so a release sends one thread to the GIL, not all of
 * them. AGX_WAIT_DIRECT: it takes the lock with the GIL released and then
 * waits for the GIL holding it, as threading.Lock's waiters do. */
int agx_acquire_py(agx_lock *l) {
    if (agx_lock_try(l)) return 0; /* once with the GIL held, as CPython's locks do */
    int64_t start = agx_now_ns();
    int64_t warn = atomic_load(&agx_wait.warn_ns), timeout = atomic_load(&agx_wait.timeout_ns);
    /* only the op lock's heir claims (CLAIM_NS says why) */
    int warned = 0, claimed = 0, may_claim = l == agx_op_lock() && atomic_load_explicit(&agx_claim_on, memory_order_relaxed);
    int direct = atomic_load_explicit(&agx_region_wait, memory_order_relaxed) == AGX_WAIT_DIRECT;
    int seat = !direct && atomic_load_explicit(&agx_heir_seat_on, memory_order_relaxed);
    int64_t heir_since = -1; /* when this waiter got the heir seat */
    uint64_t acq_since = 0;  /* the lock's acquisitions then */
    for (;;) {
        int64_t cut = may_claim && !claimed && heir_since >= 0 ? heir_since + CLAIM_NS : -1;
        if (cut >= 0 && cut <= agx_now_ns()) cut = -1;
        int64_t deadline = slice_end(start, warn, warned, timeout, cut);
        int seen = 0;
        Py_BEGIN_ALLOW_THREADS
        if (direct) {
            seen = agx_lock_wait_until(l, deadline);
        } else if (!seat || agx_lock_heir_wait_until(l, deadline)) {
            if (seat && heir_since < 0) {
                heir_since = agx_now_ns();
                acq_since = acquisitions(l);
            }
            seen = seat ? heir_watch(l, deadline, may_claim, &claimed, heir_since, acq_since)
                        : agx_lock_wait_free_until(l, deadline);
        }
        Py_END_ALLOW_THREADS
        if (seen && !direct) {
            atomic_fetch_add_explicit(&agx_wait_counts_now.gil_trips, 1, memory_order_relaxed);
            if (!agx_lock_try(l)) {
                atomic_fetch_add_explicit(&agx_wait_counts_now.gil_trips_lost, 1, memory_order_relaxed);
                agx_lock_pass_wakeup(l); /* lost the race: another waiter may take it */
                seen = 0;
            }
        }
        if (seen) {
            if (seat) agx_lock_heir_leave(l);
            agx_lock_note_wait(l, agx_now_ns() - start);
            return 0;
        }
        if (between_slices(l->name, "lock", start, warn, &warned, timeout, note_lock_timeout, l) < 0) {
            if (seat) agx_lock_heir_leave(l); /* the seat goes to the next waiter */
            return -1;
        }
    }
}

/* A Python waiter for a throttle slot: it takes the slot with the GIL released. */
int agx_throttle_acquire_py(void) {
    agx_sem *s = agx_throttle();
    if (agx_sem_try(s)) return 0;
    int64_t start = agx_now_ns();
    int64_t warn = atomic_load(&agx_wait.warn_ns), timeout = atomic_load(&agx_wait.timeout_ns);
    int warned = 0;
    for (;;) {
        int64_t deadline = slice_end(start, warn, warned, timeout, -1);
        int got;
        Py_BEGIN_ALLOW_THREADS
        got = agx_sem_wait_until(s, deadline);
        Py_END_ALLOW_THREADS
        if (got) {
            agx_sem_note_wait(s, agx_now_ns() - start);
            return 0;
        }
        if (between_slices("throttle", "throttle", start, warn, &warned, timeout, note_sem_timeout, s) < 0)
            return -1;
    }
}

#if PY_VERSION_HEX >= 0x030D0000
#define AGX_FINALIZING() Py_IsFinalizing()
#else
#define AGX_FINALIZING() _Py_IsFinalizing()
#endif

/* A hooked driver call cannot fail (many are void Objective-C methods) and
 * must not run without its lock, so a native wait ends only by taking the lock
 * or by ending the process: past the timeout under either action (a driver
 * call has no way to raise), and when Python's signal handlers raise (Ctrl-C)
 * while the main thread waits in a driver call: KeyboardInterrupt ends the
 * process as SIGINT does, anything else with abort(). */
static void end_native_wait(const char *name, int64_t waited_ns, const char *why, int sigint) {
    fprintf(stderr,
            "agxguard: a driver call waited %lld ms for the '%s' lock and %s; a driver call cannot "
            "raise and must not run unlocked, so the process ends here\n",
            (long long)(waited_ns / 1000000), name, why);
    fflush(stderr);
    if (sigint) {
        signal(SIGINT, SIG_DFL);
        raise(SIGINT);
    }
    abort();
}

/* Between slices of a native wait: run Python's signal handlers if this is
 * the main thread (the only one that runs them). Returns 0 once the thread is
 * known not to be the main one (no more checks needed), else 1. */
static int native_check_signals(PyThreadState **ts, agx_lock *l, int64_t start) {
    if (AGX_FINALIZING()) return 0;
    PyGILState_STATE g = PyGILState_UNLOCKED;
    if (*ts)
        PyEval_RestoreThread(*ts);
    else
        g = PyGILState_Ensure();
    int main_thread = _PyOS_IsMainThread();
    if (main_thread && PyErr_CheckSignals() < 0) {
        int kbd = PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
        end_native_wait(l->name, agx_now_ns() - start,
                        kbd ? "was interrupted (KeyboardInterrupt)" : "a signal handler raised", kbd);
    }
    if (*ts)
        *ts = PyEval_SaveThread();
    else
        PyGILState_Release(g);
    return main_thread;
}

void agx_acquire_native(agx_lock *l) {
    if (agx_lock_try(l)) return;
    PyThreadState *ts = NULL;
    int reachable = 0; /* a thread of Python's, which may run its signal handlers */
    if (Py_IsInitialized() && !AGX_FINALIZING()) {
        if (PyGILState_Check())
            ts = PyEval_SaveThread();
        reachable = ts != NULL || PyGILState_GetThisThreadState() != NULL;
    }
    int64_t start = agx_now_ns();
    int64_t warn = atomic_load(&agx_wait.warn_ns);
    int64_t timeout = atomic_load(&agx_wait.timeout_ns);
    int warned = 0;
    for (;;) {
        int64_t deadline = reachable ? agx_now_ns() + AGX_SLICE_NS : -1;
        if (warn > 0 && !warned && (deadline < 0 || start + warn < deadline)) deadline = start + warn;
        if (timeout > 0 && (deadline < 0 || start + timeout < deadline)) deadline = start + timeout;
        if (agx_lock_wait_until(l, deadline)) break;
        int64_t waited = agx_now_ns() - start;
        if (warn > 0 && !warned && waited >= warn) {
            warned = 1;
            fprintf(stderr, "agxguard: a driver call waited %lld ms for the '%s' lock\n",
                    (long long)(waited / 1000000), l->name);
        }
        if (timeout > 0 && waited >= timeout) {
            agx_lock_note_timeout(l);
            end_native_wait(l->name, waited,
                            atomic_load(&agx_wait.timeout_aborts)
                                ? "passed the timeout (AGXGUARD_LOCK_TIMEOUT_MS, action 'abort')"
                                : "passed the timeout (AGXGUARD_LOCK_TIMEOUT_MS; action 'raise' cannot raise "
                                  "from a driver call)",
                            0);
        }
        if (reachable) reachable = native_check_signals(&ts, l, start);
    }
    agx_lock_note_wait(l, agx_now_ns() - start);
    if (ts) PyEval_RestoreThread(ts);
}
