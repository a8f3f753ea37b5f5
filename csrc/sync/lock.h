/* lock.h: the lock primitives every domain is made of. Pure C (pthreads, C11
 * atomics), no Python, so the ThreadSanitizer stress test builds it alone.
 *
 * agx_lock is re-entrant for its owner. The uncontended path is one
 * compare-and-swap on `owner`. A waiter spins briefly, then sleeps: on Linux on
 * a futex (one system call each side of a handoff), elsewhere (macOS, or when
 * built with AGX_LOCK_PORTABLE) on a mutex and condition variable. The releaser
 * makes a system call only when someone waits.
 * agx_sem is a counting semaphore with an adjustable limit (the throttle).
 *
 * Counters are written only by the thread that holds the lock (relaxed atomic
 * load + store, no read-modify-write) and may be read by any thread. */
#ifndef AGX_LOCK_H
#define AGX_LOCK_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

/* An id for the calling thread, never 0: the address of a thread-local. It
 * survives fork() for the forking thread, which is what fork safety needs. */
uintptr_t agx_thread_id(void);

/* Monotonic time in nanoseconds (slow path only). */
int64_t agx_now_ns(void);
/* A cheap tick counter for hold times, and its rate (calibrated once). */
uint64_t agx_ticks(void);
double agx_ticks_per_ns(void);

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

/* Hold times cost two tick reads (about 10 ns each here, 20 on some VMs), so
 * only some holds are timed: the first 64 acquisitions of a lock, then one in
 * 16. The reported total is the sampled mean times the acquisitions. */
#define AGX_HOLD_SAMPLED(n) ((n) <= 64 || ((n) & 15) == 0)

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
 * deadline (deadline_ns < 0: none). */
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

/* Release one level. Returns -1 if the caller does not own the lock. */
int agx_lock_release(agx_lock *l);

static inline int agx_lock_owned(agx_lock *l) {
    return atomic_load_explicit(&l->owner, memory_order_relaxed) == agx_thread_id();
}

void agx_lock_read(agx_lock *l, agx_lock_counters *out);
void agx_lock_reset_counters(agx_lock *l);
/* In a child after fork(): a lock held by a thread that did not survive is
 * made free; one held by the forking thread stays held. */
void agx_lock_after_fork(agx_lock *l);

/* Counting semaphore with a limit that may change at run time (0 = no limit). */
typedef struct agx_sem {
    _Atomic int in_use;
    _Atomic int limit;
    _Atomic int waiters;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t n_acq, n_cont, n_timeout, wait_ns, max_wait_ns;
} agx_sem;

void agx_sem_init(agx_sem *s, int limit);
int agx_sem_try(agx_sem *s);
int agx_sem_wait_until(agx_sem *s, int64_t deadline_ns);
void agx_sem_release(agx_sem *s);
void agx_sem_set_limit(agx_sem *s, int limit);
void agx_sem_note_wait(agx_sem *s, int64_t waited_ns);
void agx_sem_note_timeout(agx_sem *s);
void agx_sem_read(agx_sem *s, agx_lock_counters *out);
void agx_sem_reset_counters(agx_sem *s);
/* In a fork child: `kept` slots are still held by the surviving thread. */
void agx_sem_after_fork(agx_sem *s, int kept);

/* An auto-reset event (a binary semaphore): set() makes it set, a wait that
 * sees it set clears it. Made for handing a result to one waiting thread fast:
 * the waiter first spins (up to spin_ns, while a spinning slot is free: see
 * agx_spin_enter), then sleeps (futex on Linux, condvar
 * elsewhere). The setter makes a system call only when the waiter sleeps. */
typedef struct agx_event {
    _Atomic uint32_t state; /* 1 set, 0 clear; the futex word */
    _Atomic int sleepers;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} agx_event;

void agx_event_init(agx_event *e);
void agx_event_set(agx_event *e);
/* Clear it; returns 1 if it was set. Never blocks. */
int agx_event_consume(agx_event *e);
/* Wait until set (then clear it and return 1) or until deadline_ns (< 0: none)
 * passes (return 0). */
int agx_event_wait_until(agx_event *e, int64_t deadline_ns, int64_t spin_ns);
/* Spinning slots: a thread may spin only while it holds one (at most the
 * thread's usable CPUs less two at a time, so spinners never starve the threads
 * they wait for; none on a machine of two CPUs). */
/* CPUs the calling thread may use: its affinity mask (Linux), capped by a
 * cgroup CPU quota (read once). Kept per thread; call agx_affinity_changed()
 * after changing a thread's affinity (other changes are seen within 100 ms). */
int agx_usable_cpus(void);
void agx_affinity_changed(void);
int agx_spin_enter(void);
void agx_spin_leave(void);
/* Spin (pausing) until ready(arg) returns nonzero (then 1) or spin_ns passes
 * (then 0). agx_spin_slotted does the same inside a spinning slot, and returns 0
 * at once when spin_ns <= 0 or no slot is free. */
int agx_spin_until(int (*ready)(void *), void *arg, int64_t spin_ns);
int agx_spin_slotted(int (*ready)(void *), void *arg, int64_t spin_ns);

#endif
