/* lock.c: see lock.h. */
#include "lock.h"

#include "spin.h"

#define BUMP AGX_BUMP

static void heir_init(agx_lock *l) {
    atomic_store(&l->heir, 0);
    atomic_store(&l->claim, 0);
    atomic_store(&l->heir_seq, 0);
    atomic_store(&l->heir_waiters, 0);
    agx_init_cv(&l->heir_cv);
}

void agx_lock_init(agx_lock *l, const char *name) {
    l->name = name;
    atomic_store(&l->seq, 0);
    atomic_store(&l->owner, 0);
    l->depth = 0;
    l->last_owner = 0;
    atomic_store(&l->waiters, 0);
    agx_init_sync(&l->mu, &l->cv);
    heir_init(l);
    agx_lock_reset_counters(l);
}

/* A waiter spins this long (GIL released) before it sleeps: a guarded call
 * that ends within it hands over without a system call or a context switch
 * on either side. */
#ifndef SPIN_NS
#define SPIN_NS 20000
#endif

/* take: acquire the lock; else: only see it free (the caller takes it later). */
static inline int attempt(agx_lock *l, int take) {
    if (atomic_load_explicit(&l->owner, memory_order_relaxed) != 0) return 0;
    return take ? agx_lock_try(l) : 1;
}

static int pred_take(void *l) { return attempt(l, 1); }
static int pred_free(void *l) { return attempt(l, 0); }

static agx_sleeper lock_sleeper(agx_lock *l) { return (agx_sleeper){&l->seq, &l->waiters, &l->mu, &l->cv}; }

static int wait_for(agx_lock *l, int64_t deadline_ns, int take) {
    if (attempt(l, take) || agx_spin_until(take ? pred_take : pred_free, l, SPIN_NS)) return 1;
    agx_sleeper s = lock_sleeper(l);
    return agx_sleep_until(&s, take ? pred_take : pred_free, l, deadline_ns);
}

static void lock_wake(agx_lock *l) {
    agx_sleeper s = lock_sleeper(l);
    agx_wake_one(&s, 1);
}

int agx_lock_wait_until(agx_lock *l, int64_t deadline_ns) { return wait_for(l, deadline_ns, 1); }

int agx_lock_wait_free_until(agx_lock *l, int64_t deadline_ns) { return wait_for(l, deadline_ns, 0); }

int agx_lock_watch_until(agx_lock *l, int64_t deadline_ns, int64_t spin_ns) {
    if (attempt(l, 0) || (spin_ns > SPIN_NS && agx_spin_slotted(pred_free, l, spin_ns))) return 1;
    return wait_for(l, deadline_ns, 0);
}

void agx_lock_pass_wakeup(agx_lock *l) {
    if (atomic_load(&l->owner) == 0 && atomic_load(&l->waiters) > 0) lock_wake(l);
}

static int take_seat(agx_lock *l, uintptr_t me) {
    uintptr_t cur = atomic_load(&l->heir);
    if (cur == me) return 1;
    return cur == 0 && atomic_compare_exchange_strong(&l->heir, &cur, me);
}

int agx_lock_claim(agx_lock *l) {
    uintptr_t me = agx_thread_id();
    if (atomic_load(&l->heir) != me) return 0;
    atomic_store(&l->claim, me);
    return 1;
}

static int pred_seat(void *l) { return take_seat(l, agx_thread_id()); }

static agx_sleeper seat_sleeper(agx_lock *l) { return (agx_sleeper){&l->heir_seq, &l->heir_waiters, &l->mu, &l->heir_cv}; }

int agx_lock_heir_wait_until(agx_lock *l, int64_t deadline_ns) {
    if (take_seat(l, agx_thread_id())) return 1;
    agx_sleeper s = seat_sleeper(l);
    return agx_sleep_until(&s, pred_seat, l, deadline_ns);
}

void agx_lock_heir_leave(agx_lock *l) {
    uintptr_t me = agx_thread_id(), mine = me;
    if (!atomic_compare_exchange_strong(&l->heir, &me, 0)) return;
    atomic_compare_exchange_strong(&l->claim, &mine, 0);
    agx_sleeper s = seat_sleeper(l);
    agx_wake_one(&s, 1);
}

void agx_lock_note_wait(agx_lock *l, int64_t waited_ns) {
    if (waited_ns < 0) waited_ns = 0;
    BUMP(l->n_cont, 1);
    BUMP(l->wait_ns, (uint64_t)waited_ns);
    if ((uint64_t)waited_ns > atomic_load_explicit(&l->max_wait_ns, memory_order_relaxed))
        atomic_store_explicit(&l->max_wait_ns, (uint64_t)waited_ns, memory_order_relaxed);
}

void agx_lock_note_timeout(agx_lock *l) { atomic_fetch_add(&l->n_timeout, 1); }

void agx_lock_wake_waiter(agx_lock *l) { lock_wake(l); }

static uint64_t ticks_to_ns(uint64_t ticks) { return (uint64_t)((double)ticks / agx_ticks_per_ns()); }

void agx_lock_read(agx_lock *l, agx_lock_counters *out) {
    out->acquisitions = atomic_load_explicit(&l->n_acq, memory_order_relaxed);
    out->reentries = atomic_load_explicit(&l->n_reent, memory_order_relaxed);
    out->contentions = atomic_load_explicit(&l->n_cont, memory_order_relaxed);
    out->timeouts = atomic_load_explicit(&l->n_timeout, memory_order_relaxed);
    out->wait_ns = atomic_load_explicit(&l->wait_ns, memory_order_relaxed);
    out->max_wait_ns = atomic_load_explicit(&l->max_wait_ns, memory_order_relaxed);
    uint64_t samples = atomic_load_explicit(&l->hold_samples, memory_order_relaxed);
    double sampled_ns = (double)ticks_to_ns(atomic_load_explicit(&l->hold_ticks, memory_order_relaxed));
    out->hold_samples = samples;
    out->handoffs = atomic_load_explicit(&l->n_handoff, memory_order_relaxed);
    out->hold_ns = samples ? (uint64_t)(sampled_ns * (double)out->acquisitions / (double)samples) : 0;
}

void agx_lock_reset_counters(agx_lock *l) {
    atomic_store(&l->n_acq, 0);
    atomic_store(&l->n_reent, 0);
    atomic_store(&l->n_cont, 0);
    atomic_store(&l->n_timeout, 0);
    atomic_store(&l->wait_ns, 0);
    atomic_store(&l->max_wait_ns, 0);
    atomic_store(&l->hold_ticks, 0);
    atomic_store(&l->hold_samples, 0);
    atomic_store(&l->n_handoff, 0);
}

void agx_lock_after_fork(agx_lock *l) {
    if (!agx_lock_owned(l)) {
        atomic_store(&l->owner, 0);
        l->depth = 0;
    }
    atomic_store(&l->waiters, 0);
    agx_init_sync(&l->mu, &l->cv); /* a dead thread may have held mu */
    uintptr_t me = agx_thread_id();
    int mine = atomic_load(&l->heir) == me;
    heir_init(l);
    if (mine) atomic_store(&l->heir, me);
}

