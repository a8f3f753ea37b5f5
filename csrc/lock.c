/* lock.c: see lock.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#endif
#include "lock.h"

#include <errno.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sched.h>
#endif
#if defined(__linux__) && !defined(AGX_LOCK_PORTABLE)
#define AGX_USE_FUTEX 1
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

static _Thread_local char thread_marker;

uintptr_t agx_thread_id(void) { return (uintptr_t)&thread_marker; }

int64_t agx_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

uint64_t agx_ticks(void) {
#if defined(__x86_64__) || defined(__i386__)
    return __rdtsc();
#elif defined(__aarch64__)
    uint64_t v;
    __asm__ volatile("mrs %0, cntvct_el0" : "=r"(v));
    return v;
#else
    return (uint64_t)agx_now_ns();
#endif
}

double agx_ticks_per_ns(void) {
    static _Atomic double rate; /* 0 until calibrated; races only repeat the work */
    double r = atomic_load(&rate);
    if (r > 0) return r;
#if defined(__x86_64__) || defined(__i386__) || defined(__aarch64__)
    int64_t t0 = agx_now_ns();
    uint64_t c0 = agx_ticks();
    struct timespec pause = {0, 2000000};
    nanosleep(&pause, NULL);
    int64_t t1 = agx_now_ns();
    uint64_t c1 = agx_ticks();
    r = (t1 > t0 && c1 > c0) ? (double)(c1 - c0) / (double)(t1 - t0) : 1.0;
#else
    r = 1.0;
#endif
    atomic_store(&rate, r);
    return r;
}

/* Owner-only counter bump: a relaxed load and store, no locked instruction. */
#define BUMP(field, by)                                                            \
    atomic_store_explicit(&(field), atomic_load_explicit(&(field), memory_order_relaxed) + (by), \
                          memory_order_relaxed)

static void deadline_to_timespec(int64_t deadline_ns, struct timespec *ts) {
    /* condition variables below are set to CLOCK_MONOTONIC */
    ts->tv_sec = deadline_ns / 1000000000LL;
    ts->tv_nsec = deadline_ns % 1000000000LL;
}

static void init_sync(pthread_mutex_t *mu, pthread_cond_t *cv) {
    pthread_mutex_init(mu, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
#if !defined(__APPLE__)
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
#endif
    pthread_cond_init(cv, &attr);
    pthread_condattr_destroy(&attr);
}

/* Sleep on cv until woken or the deadline passes. Returns 0 on deadline. */
static int timed_sleep(pthread_cond_t *cv, pthread_mutex_t *mu, int64_t deadline_ns) {
    if (deadline_ns < 0) {
        pthread_cond_wait(cv, mu);
        return 1;
    }
#if defined(__APPLE__)
    int64_t left = deadline_ns - agx_now_ns();
    if (left <= 0) return 0;
    struct timespec rel = {left / 1000000000LL, left % 1000000000LL};
    return pthread_cond_timedwait_relative_np(cv, mu, &rel) != ETIMEDOUT;
#else
    struct timespec ts;
    deadline_to_timespec(deadline_ns, &ts);
    return pthread_cond_timedwait(cv, mu, &ts) != ETIMEDOUT;
#endif
}

static void heir_init(agx_lock *l) {
    atomic_store(&l->heir, 0);
    atomic_store(&l->claim, 0);
    atomic_store(&l->heir_seq, 0);
    atomic_store(&l->heir_waiters, 0);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
#if !defined(__APPLE__)
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
#endif
    pthread_cond_init(&l->heir_cv, &attr);
    pthread_condattr_destroy(&attr);
}

void agx_lock_init(agx_lock *l, const char *name) {
    l->name = name;
    atomic_store(&l->seq, 0);
    atomic_store(&l->owner, 0);
    l->depth = 0;
    atomic_store(&l->waiters, 0);
    init_sync(&l->mu, &l->cv);
    heir_init(l);
    agx_lock_reset_counters(l);
}

/* A waiter spins this long (GIL released) before it sleeps: a guarded call
 * that ends within it hands over without a system call or a context switch
 * on either side. */
#ifndef SPIN_NS
#define SPIN_NS 20000
#endif

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* take: acquire the lock; else: only see it free (the caller takes it later). */
static inline int attempt(agx_lock *l, int take) {
    if (atomic_load_explicit(&l->owner, memory_order_relaxed) != 0) return 0;
    return take ? agx_lock_try(l) : 1;
}

static int spin(agx_lock *l, int take, int64_t spin_ns) {
    uint64_t budget = (uint64_t)((double)spin_ns * agx_ticks_per_ns()), start = agx_ticks();
    for (unsigned i = 1;; i++) {
        if (attempt(l, take)) return 1;
        cpu_relax();
        if ((i & 63) == 0 && agx_ticks() - start > budget) return 0;
    }
}

#ifdef AGX_USE_FUTEX
static int wait_for(agx_lock *l, int64_t deadline_ns, int take) {
    if (attempt(l, take) || spin(l, take, SPIN_NS)) return 1;
    int got = 0;
    atomic_fetch_add(&l->waiters, 1);
    for (;;) {
        /* Read seq before looking: a release after the look bumps seq, so the
         * futex wait below returns at once instead of missing the wakeup. */
        uint32_t seen = atomic_load(&l->seq);
        if (attempt(l, take)) { got = 1; break; }
        struct timespec rel, *relp = NULL;
        if (deadline_ns >= 0) {
            int64_t left = deadline_ns - agx_now_ns();
            if (left <= 0) break;
            rel.tv_sec = left / 1000000000LL;
            rel.tv_nsec = left % 1000000000LL;
            relp = &rel;
        }
        syscall(SYS_futex, &l->seq, FUTEX_WAIT_PRIVATE, seen, relp, NULL, 0);
    }
    atomic_fetch_sub(&l->waiters, 1);
    return got;
}

static void wake_one(agx_lock *l) {
    atomic_fetch_add(&l->seq, 1);
    syscall(SYS_futex, &l->seq, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}
#else
static int wait_for(agx_lock *l, int64_t deadline_ns, int take) {
    if (attempt(l, take) || spin(l, take, SPIN_NS)) return 1;
    int got = 0;
    atomic_fetch_add(&l->waiters, 1);
    pthread_mutex_lock(&l->mu);
    for (;;) {
        /* Checked under mu: a releaser that freed the lock before we looked
         * must take mu to signal, so it cannot signal into the gap. */
        if (attempt(l, take)) { got = 1; break; }
        if (deadline_ns >= 0 && agx_now_ns() >= deadline_ns) break;
        if (!timed_sleep(&l->cv, &l->mu, deadline_ns)) {
            got = attempt(l, take);
            break;
        }
    }
    pthread_mutex_unlock(&l->mu);
    atomic_fetch_sub(&l->waiters, 1);
    return got;
}

static void wake_one(agx_lock *l) {
    pthread_mutex_lock(&l->mu);
    pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->mu);
}
#endif

int agx_lock_wait_until(agx_lock *l, int64_t deadline_ns) { return wait_for(l, deadline_ns, 1); }

int agx_lock_wait_free_until(agx_lock *l, int64_t deadline_ns) { return wait_for(l, deadline_ns, 0); }

int agx_lock_watch_until(agx_lock *l, int64_t deadline_ns, int64_t spin_ns) {
    if (attempt(l, 0)) return 1;
    if (spin_ns > SPIN_NS && agx_spin_enter()) {
        int seen = spin(l, 0, spin_ns);
        agx_spin_leave();
        if (seen) return 1;
    }
    return wait_for(l, deadline_ns, 0);
}

void agx_lock_pass_wakeup(agx_lock *l) {
    if (atomic_load(&l->owner) == 0 && atomic_load(&l->waiters) > 0) wake_one(l);
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

#ifdef AGX_USE_FUTEX
int agx_lock_heir_wait_until(agx_lock *l, int64_t deadline_ns) {
    uintptr_t me = agx_thread_id();
    if (take_seat(l, me)) return 1;
    int got = 0;
    atomic_fetch_add(&l->heir_waiters, 1);
    for (;;) {
        uint32_t seen = atomic_load(&l->heir_seq); /* before looking: see wait_for */
        if (take_seat(l, me)) { got = 1; break; }
        struct timespec rel, *relp = NULL;
        if (deadline_ns >= 0) {
            int64_t left = deadline_ns - agx_now_ns();
            if (left <= 0) break;
            rel.tv_sec = left / 1000000000LL;
            rel.tv_nsec = left % 1000000000LL;
            relp = &rel;
        }
        syscall(SYS_futex, &l->heir_seq, FUTEX_WAIT_PRIVATE, seen, relp, NULL, 0);
    }
    atomic_fetch_sub(&l->heir_waiters, 1);
    return got;
}

void agx_lock_heir_leave(agx_lock *l) {
    uintptr_t me = agx_thread_id(), mine = me;
    if (!atomic_compare_exchange_strong(&l->heir, &me, 0)) return;
    atomic_compare_exchange_strong(&l->claim, &mine, 0);
    atomic_fetch_add(&l->heir_seq, 1);
    if (atomic_load(&l->heir_waiters) > 0)
        syscall(SYS_futex, &l->heir_seq, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}
#else
int agx_lock_heir_wait_until(agx_lock *l, int64_t deadline_ns) {
    uintptr_t me = agx_thread_id();
    if (take_seat(l, me)) return 1;
    int got = 0;
    atomic_fetch_add(&l->heir_waiters, 1);
    pthread_mutex_lock(&l->mu);
    for (;;) {
        if (take_seat(l, me)) { got = 1; break; } /* under mu: the leaver signals under it */
        if (deadline_ns >= 0 && agx_now_ns() >= deadline_ns) break;
        if (!timed_sleep(&l->heir_cv, &l->mu, deadline_ns)) {
            got = take_seat(l, me);
            break;
        }
    }
    pthread_mutex_unlock(&l->mu);
    atomic_fetch_sub(&l->heir_waiters, 1);
    return got;
}

void agx_lock_heir_leave(agx_lock *l) {
    uintptr_t me = agx_thread_id(), mine = me;
    if (!atomic_compare_exchange_strong(&l->heir, &me, 0)) return;
    atomic_compare_exchange_strong(&l->claim, &mine, 0);
    if (atomic_load(&l->heir_waiters) > 0) {
        pthread_mutex_lock(&l->mu);
        pthread_cond_signal(&l->heir_cv);
        pthread_mutex_unlock(&l->mu);
    }
}
#endif

void agx_lock_note_wait(agx_lock *l, int64_t waited_ns) {
    if (waited_ns < 0) waited_ns = 0;
    BUMP(l->n_cont, 1);
    BUMP(l->wait_ns, (uint64_t)waited_ns);
    if ((uint64_t)waited_ns > atomic_load_explicit(&l->max_wait_ns, memory_order_relaxed))
        atomic_store_explicit(&l->max_wait_ns, (uint64_t)waited_ns, memory_order_relaxed);
}

void agx_lock_note_timeout(agx_lock *l) { atomic_fetch_add(&l->n_timeout, 1); }

int agx_lock_release(agx_lock *l) {
    if (!agx_lock_owned(l)) return -1;
    if (--l->depth > 0) return 0;
    if (l->acquired_tick) {
        BUMP(l->hold_ticks, agx_ticks() - l->acquired_tick);
        BUMP(l->hold_samples, 1);
    }
    atomic_store_explicit(&l->owner, 0, memory_order_seq_cst);
    if (atomic_load_explicit(&l->waiters, memory_order_seq_cst) > 0) wake_one(l);
    return 0;
}

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
}

void agx_lock_after_fork(agx_lock *l) {
    if (!agx_lock_owned(l)) {
        atomic_store(&l->owner, 0);
        l->depth = 0;
    }
    atomic_store(&l->waiters, 0);
    init_sync(&l->mu, &l->cv); /* a dead thread may have held mu */
    uintptr_t me = agx_thread_id();
    int mine = atomic_load(&l->heir) == me;
    heir_init(l);
    if (mine) atomic_store(&l->heir, me);
}

/* ---- semaphore ---- */

void agx_sem_init(agx_sem *s, int limit) {
    atomic_store(&s->in_use, 0);
    atomic_store(&s->limit, limit < 0 ? 0 : limit);
    atomic_store(&s->waiters, 0);
    init_sync(&s->mu, &s->cv);
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

int agx_sem_wait_until(agx_sem *s, int64_t deadline_ns) {
    if (agx_sem_try(s)) return 1;
    int got = 0;
    atomic_fetch_add(&s->waiters, 1);
    pthread_mutex_lock(&s->mu);
    for (;;) {
        if (agx_sem_try(s)) { got = 1; break; }
        if (deadline_ns >= 0 && agx_now_ns() >= deadline_ns) break;
        if (!timed_sleep(&s->cv, &s->mu, deadline_ns)) {
            got = agx_sem_try(s);
            break;
        }
    }
    pthread_mutex_unlock(&s->mu);
    atomic_fetch_sub(&s->waiters, 1);
    return got;
}

static void sem_wake(agx_sem *s, int all) {
    if (atomic_load(&s->waiters) > 0) {
        pthread_mutex_lock(&s->mu);
        if (all)
            pthread_cond_broadcast(&s->cv);
        else
            pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
}

void agx_sem_release(agx_sem *s) {
    atomic_fetch_sub(&s->in_use, 1);
    sem_wake(s, 0);
}

void agx_sem_set_limit(agx_sem *s, int limit) {
    atomic_store(&s->limit, limit < 0 ? 0 : limit);
    sem_wake(s, 1); /* a raised limit may admit several */
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
    init_sync(&s->mu, &s->cv);
}

/* ---- event ---- */

void agx_cpu_relax(void) { cpu_relax(); }

static _Atomic int spinners;

/* CPUs this thread may run on (its affinity mask on Linux). */
static int usable_cpus(void) {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int agx_spin_enter(void) {
    /* two CPUs stay for the work the spinners wait on (a thread running a batch,
     * a thread holding the GIL) */
    int limit = usable_cpus() - 2, cur = atomic_load(&spinners);
    while (cur < limit) {
        if (atomic_compare_exchange_weak(&spinners, &cur, cur + 1)) return 1;
    }
    return 0;
}

void agx_spin_leave(void) { atomic_fetch_sub(&spinners, 1); }

void agx_event_init(agx_event *e) {
    atomic_store(&e->state, 0);
    atomic_store(&e->sleepers, 0);
    init_sync(&e->mu, &e->cv);
}

int agx_event_consume(agx_event *e) {
    return atomic_load_explicit(&e->state, memory_order_relaxed) != 0 &&
           atomic_exchange_explicit(&e->state, 0, memory_order_acquire) != 0;
}

static int event_spin(agx_event *e, int64_t deadline_ns, int64_t spin_ns) {
    if (spin_ns <= 0 || !agx_spin_enter()) return 0;
    uint64_t budget = (uint64_t)((double)spin_ns * agx_ticks_per_ns()), start = agx_ticks();
    int got = 0;
    for (unsigned i = 1;; i++) {
        if (agx_event_consume(e)) { got = 1; break; }
        cpu_relax();
        if ((i & 63) == 0) {
            if (agx_ticks() - start > budget) break;
            if (deadline_ns >= 0 && (i & 1023) == 0 && agx_now_ns() >= deadline_ns) break;
        }
    }
    agx_spin_leave();
    return got;
}

#ifdef AGX_USE_FUTEX
int agx_event_wait_until(agx_event *e, int64_t deadline_ns, int64_t spin_ns) {
    if (agx_event_consume(e) || event_spin(e, deadline_ns, spin_ns)) return 1;
    int got = 0;
    atomic_fetch_add(&e->sleepers, 1); /* seq_cst: pairs with the setter's store, then load */
    for (;;) {
        if (agx_event_consume(e)) { got = 1; break; }
        struct timespec rel, *relp = NULL;
        if (deadline_ns >= 0) {
            int64_t left = deadline_ns - agx_now_ns();
            if (left <= 0) break;
            rel.tv_sec = left / 1000000000LL;
            rel.tv_nsec = left % 1000000000LL;
            relp = &rel;
        }
        /* returns at once if state is no longer 0 */
        syscall(SYS_futex, &e->state, FUTEX_WAIT_PRIVATE, 0, relp, NULL, 0);
    }
    atomic_fetch_sub(&e->sleepers, 1);
    return got;
}

void agx_event_set(agx_event *e) {
    atomic_store(&e->state, 1);
    if (atomic_load(&e->sleepers) > 0) syscall(SYS_futex, &e->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}
#else
int agx_event_wait_until(agx_event *e, int64_t deadline_ns, int64_t spin_ns) {
    if (agx_event_consume(e) || event_spin(e, deadline_ns, spin_ns)) return 1;
    int got = 0;
    atomic_fetch_add(&e->sleepers, 1);
    pthread_mutex_lock(&e->mu);
    for (;;) {
        /* checked under mu: the setter takes mu to signal */
        if (agx_event_consume(e)) { got = 1; break; }
        if (deadline_ns >= 0 && agx_now_ns() >= deadline_ns) break;
        if (!timed_sleep(&e->cv, &e->mu, deadline_ns)) {
            got = agx_event_consume(e);
            break;
        }
    }
    pthread_mutex_unlock(&e->mu);
    atomic_fetch_sub(&e->sleepers, 1);
    return got;
}

void agx_event_set(agx_event *e) {
    atomic_store(&e->state, 1);
    if (atomic_load(&e->sleepers) > 0) {
        pthread_mutex_lock(&e->mu);
        pthread_cond_signal(&e->cv);
        pthread_mutex_unlock(&e->mu);
    }
}
#endif
