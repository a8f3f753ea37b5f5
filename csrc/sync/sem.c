/* sem.c: see sem.h. */
#include "sem.h"

void agx_sem_init(agx_sem *s, int limit) {
    atomic_store(&s->in_use, 0);
    atomic_store(&s->limit, limit < 0 ? 0 : limit);
    atomic_store(&s->waiters, 0);
    agx_init_sync(&s->mu, &s->cv);
    agx_sem_reset_counters(s);
}

int agx_sem_try(agx_sem *s) {
    int cur = atomic_load(&s->in_use);
    for (;;) {
        int limit = atomic_load(&s->limit);
        if (limit > 0 && cur >= limit) return 0;
        if (atomic_compare_exchange_weak(&s->in_use, &cur, cur + 1)) {
            atomic_fetch_add_explicit(&s->n_acq, 1, memory_order_relaxed);
            return 1;
        }
    }
}

static int pred_sem(void *s) { return agx_sem_try(s); }

static agx_sleeper sem_sleeper(agx_sem *s) { return (agx_sleeper){NULL, &s->waiters, &s->mu, &s->cv}; }

int agx_sem_wait_until(agx_sem *s, int64_t deadline_ns) {
    if (agx_sem_try(s)) return 1;
    agx_sleeper w = sem_sleeper(s);
    return agx_cv_sleep_until(&w, pred_sem, s, deadline_ns);
}

void agx_sem_release(agx_sem *s) {
    atomic_fetch_sub(&s->in_use, 1);
    agx_sleeper w = sem_sleeper(s);
    agx_cv_wake(&w, 0);
}

void agx_sem_set_limit(agx_sem *s, int limit) {
    atomic_store(&s->limit, limit < 0 ? 0 : limit);
    agx_sleeper w = sem_sleeper(s);
    agx_cv_wake(&w, 1); /* a raised limit may admit several */
}

void agx_sem_note_wait(agx_sem *s, int64_t waited_ns) {
    if (waited_ns < 0) waited_ns = 0;
    atomic_fetch_add_explicit(&s->n_cont, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->wait_ns, (uint64_t)waited_ns, memory_order_relaxed);
    uint64_t prev = atomic_load_explicit(&s->max_wait_ns, memory_order_relaxed);
    while ((uint64_t)waited_ns > prev &&
           !atomic_compare_exchange_weak(&s->max_wait_ns, &prev, (uint64_t)waited_ns)) {
    }
}

void agx_sem_note_timeout(agx_sem *s) { atomic_fetch_add(&s->n_timeout, 1); }

void agx_sem_read(agx_sem *s, agx_lock_counters *out) {
    out->acquisitions = atomic_load(&s->n_acq);
    out->reentries = 0;
    out->contentions = atomic_load(&s->n_cont);
    out->timeouts = atomic_load(&s->n_timeout);
    out->wait_ns = atomic_load(&s->wait_ns);
    out->max_wait_ns = atomic_load(&s->max_wait_ns);
    out->hold_ns = 0;
    out->hold_samples = 0;
    out->handoffs = 0;
}

void agx_sem_reset_counters(agx_sem *s) {
    atomic_store(&s->n_acq, 0);
    atomic_store(&s->n_cont, 0);
    atomic_store(&s->n_timeout, 0);
    atomic_store(&s->wait_ns, 0);
    atomic_store(&s->max_wait_ns, 0);
}

void agx_sem_after_fork(agx_sem *s, int kept) {
    atomic_store(&s->in_use, kept);
    atomic_store(&s->waiters, 0);
    agx_init_sync(&s->mu, &s->cv);
}
