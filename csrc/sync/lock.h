/* lock.h: the lock every domain is made of. Pure C (pthreads, C11 atomics),
 * no Python, so the ThreadSanitizer stress test builds it alone. The other
 * primitives: sem.h (the throttle), event.h, spin.h, clock.h.
 *
 * agx_lock is re-entrant for its owner. The uncontended path is one
 * compare-and-swap on `owner`. A waiter spins briefly, then sleeps: on Linux on
 * a futex (one system call each side of a handoff), elsewhere (macOS, or when
 * built with AGX_LOCK_PORTABLE) on a mutex and condition variable. The releaser
 * makes a system call only when someone waits.
 *
 * Counters are written only by the thread that holds the lock (relaxed atomic
 * load + store, no read-modify-write) and may be read by any thread. */
#ifndef AGX_LOCK_H
#define AGX_LOCK_H

#include "clock.h"

typedef struct agx_lock_counters {
    uint64_t acquisitions; /* outermost acquisitions */
    uint64_t reentries;    /* nested acquisitions by the owner */
    uint64_t contentions;  /* acquisitions that had to wait */
    uint64_t timeouts;     /* waits given up past the timeout */
    uint64_t wait_ns;      /* total time spent waiting */
    uint64_t max_wait_ns;
    uint64_t hold_ns;      /* total time held (outermost acquire to release), estimated
                              from sampled holds: see AGX_HOLD_SAMPLED */
    uint64_t hold_samples; /* how many holds were timed */
    uint64_t handoffs;     /* outermost acquisitions by another thread than the last holder */
} agx_lock_counters;

typedef struct agx_lock {
    const char *name;        /* the domain, for messages */
    _Atomic uintptr_t owner; /* 0 when free */
    _Atomic uintptr_t claim; /* 0, or the heir that waited too long: only it may take the lock */
    unsigned depth;          /* re-entry depth; only the owner touches it */
    _Atomic int waiters;     /* threads sleeping or about to sleep */
    _Atomic uint32_t seq;    /* Linux: the futex word, bumped by each waking release */
    pthread_mutex_t mu;      /* elsewhere (and with AGX_LOCK_PORTABLE): mutex + condvar */
    pthread_cond_t cv;
    _Atomic uintptr_t heir;  /* the one Python waiter that watches for a release (0: none) */
    _Atomic uint32_t heir_seq; /* Linux: futex word of the heir seat, bumped when it frees */
    _Atomic int heir_waiters;
    pthread_cond_t heir_cv;  /* elsewhere: the seat's condvar (with mu) */
    uint64_t acquired_tick;  /* owner only; 0 when this hold is not timed */
    uintptr_t last_owner;    /* owner only: who released it last */
    /* counters: owner-written except timeouts (atomic add) */
    _Atomic uint64_t n_acq, n_reent, n_cont, n_timeout, wait_ns, max_wait_ns, hold_ticks, hold_samples, n_handoff;
} agx_lock;

void agx_lock_init(agx_lock *l, const char *name);

/* Hold times cost two tick reads (about 10 ns each here, 12 to 20 on some
 * VMs), so only some holds are timed: the first 64 acquisitions of a lock, then
 * one in 64 (about 0.4 ns per acquisition on such a VM; one in 16 cost 1.5, a
 * tenth of a hooked call's budget). The reported total is the sampled mean
 * times the acquisitions. */
#define AGX_HOLD_SAMPLED(n) ((n) <= 64 || ((n) & 63) == 0)

/* Try once, never blocks. Returns 1 if the caller now holds the lock
 * (acquired or re-entered), 0 if another thread holds it. */
static inline int agx_lock_try(agx_lock *l) {
    uintptr_t me = agx_thread_id();
    uintptr_t cur = atomic_load_explicit(&l->owner, memory_order_relaxed);
    if (cur == me) {
        l->depth++;
        atomic_store_explicit(&l->n_reent,
                              atomic_load_explicit(&l->n_reent, memory_order_relaxed) + 1,
                              memory_order_relaxed);
        return 1;
    }
    uintptr_t expect = 0, claim = atomic_load_explicit(&l->claim, memory_order_relaxed);
    if (cur == 0 && (claim == 0 || claim == me) && atomic_compare_exchange_strong_explicit(
                        &l->owner, &expect, me, memory_order_acquire, memory_order_relaxed)) {
        l->depth = 1;
        if (l->last_owner != me)
            atomic_store_explicit(&l->n_handoff, atomic_load_explicit(&l->n_handoff, memory_order_relaxed) + 1,
                                  memory_order_relaxed);
        uint64_t n = atomic_load_explicit(&l->n_acq, memory_order_relaxed) + 1;
        atomic_store_explicit(&l->n_acq, n, memory_order_relaxed);
        l->acquired_tick = AGX_HOLD_SAMPLED(n) ? agx_ticks() : 0;
        return 1;
    }
    return 0;
}

/* Block until the lock is taken or `deadline_ns` (agx_now_ns clock; < 0 means
 * no deadline) passes. Returns 1 when acquired, 0 on deadline. Does not count
 * a contention: the caller, who knows the whole wait, calls agx_lock_note_wait. */
int agx_lock_wait_until(agx_lock *l, int64_t deadline_ns);

/* Block until the lock is seen free (not taken) or the deadline passes.
 * Returns 1 when seen free. A caller that then does not take the lock (it lost
 * the race, or gave up) calls agx_lock_pass_wakeup so no sleeper is stranded. */
int agx_lock_wait_free_until(agx_lock *l, int64_t deadline_ns);
void agx_lock_pass_wakeup(agx_lock *l);
/* The same, spinning up to spin_ns first when a spinning slot is free
 * (agx_spin_enter); for the heir, the one waiter that watches. */
int agx_lock_watch_until(agx_lock *l, int64_t deadline_ns, int64_t spin_ns);

/* The heir seat. A waiter that must take the lock with the GIL held (a
 * Python thread) watches for the release with the GIL released, then takes the
 * GIL back and tries. If every such waiter did that at once, each release would
 * send them all to the GIL, where all but one sleep and are woken one by one
 * (and the holder, back from its call, queues behind them). So only the heir
 * watches; the others sleep until the seat is free. The heir keeps the seat
 * when it loses a race and leaves it once it holds the lock or gives up.
 * agx_lock_heir_wait_until returns 1 once the caller holds the seat, 0 at the
 * deadline (deadline_ns < 0: none).
 * What it buys: op mode on small_mlp, 8 threads, 0.84x free threads with the
 * seat, 0.48x without (75% of ops contended instead of 5%): H100 host,
 * python3 benchmarks/op_contention.py --device cuda --workload small_mlp
 * --threads 8 --duration 0.6 --repeats 3 (results/op_contention_h100.txt). In
 * global mode on the H200 it made no difference beyond noise (global@grace+noseat
 * vs global@grace+noclaim, results/efficiency_h200_variants.txt), and the grace
 * period and the claim (acquire.c) are the heir's. */
int agx_lock_heir_wait_until(agx_lock *l, int64_t deadline_ns);
void agx_lock_heir_leave(agx_lock *l);
/* An heir that has waited too long (a holder that keeps the GIL takes the lock
 * again and again before the heir can get the GIL) claims the lock: from then
 * on only the heir can take it when it comes free. Returns 1 if the caller is
 * the heir and now holds the claim. Leaving the seat drops the claim. */
int agx_lock_claim(agx_lock *l);

/* Record a finished wait of `waited_ns` (caller holds the lock). */
void agx_lock_note_wait(agx_lock *l, int64_t waited_ns);
/* Record a wait given up past its timeout (caller does not hold the lock). */
void agx_lock_note_timeout(agx_lock *l);

static inline int agx_lock_owned(agx_lock *l) {
    return atomic_load_explicit(&l->owner, memory_order_relaxed) == agx_thread_id();
}

/* Wake one sleeper of l after a release that saw waiters (lock.c). */
void agx_lock_wake_waiter(agx_lock *l);

/* Release one level. Returns -1 if the caller does not own the lock. Inline:
 * the uncontended release is one exchange (the seq_cst store) and one load of
 * `waiters`; the store must stay seq_cst: with a plain release store the load
 * of `waiters` could be ordered before it and miss a thread that just raised
 * `waiters` and saw the lock still held (a lost wakeup). */
static inline int agx_lock_release(agx_lock *l) {
    uintptr_t me = agx_thread_id();
    if (atomic_load_explicit(&l->owner, memory_order_relaxed) != me) return -1;
    if (--l->depth > 0) return 0;
    if (l->acquired_tick) {
        AGX_BUMP(l->hold_ticks, agx_ticks() - l->acquired_tick);
        AGX_BUMP(l->hold_samples, 1);
    }
    l->last_owner = me;
    atomic_store_explicit(&l->owner, 0, memory_order_seq_cst);
    if (atomic_load_explicit(&l->waiters, memory_order_seq_cst) > 0) agx_lock_wake_waiter(l);
    return 0;
}

void agx_lock_read(agx_lock *l, agx_lock_counters *out);
void agx_lock_reset_counters(agx_lock *l);
/* In a child after fork(): a lock held by a thread that did not survive is
 * made free; one held by the forking thread stays held. */
void agx_lock_after_fork(agx_lock *l);

#endif
