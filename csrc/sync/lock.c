/* lock.c: see lock.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#endif
#include "lock.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
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

static void init_cv(pthread_cond_t *cv) {
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
#if !defined(__APPLE__)
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
#endif
    pthread_cond_init(cv, &attr);
    pthread_condattr_destroy(&attr);
}

static void init_sync(pthread_mutex_t *mu, pthread_cond_t *cv) {
    pthread_mutex_init(mu, NULL);
    init_cv(cv);
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
    /* an absolute CLOCK_MONOTONIC time: init_cv sets that clock here */
    struct timespec ts = {deadline_ns / 1000000000LL, deadline_ns % 1000000000LL};
    return pthread_cond_timedwait(cv, mu, &ts) != ETIMEDOUT;
#endif
}

/* One place where threads sleep until a predicate holds. A waitable has a
 * futex word that its wakers change (Linux), or a mutex and a condvar
 * (elsewhere, and with AGX_LOCK_PORTABLE), and a count of sleepers, so that a
 * waker makes a system call only when someone sleeps. */
typedef struct sleeper {
    _Atomic uint32_t *word; /* futex builds */
    _Atomic int *sleepers;
    pthread_mutex_t *mu;    /* condvar builds */
    pthread_cond_t *cv;
} sleeper;

typedef int (*predicate)(void *);

/* The predicate is checked under mu and wakers signal under mu, so a wake
 * between the check and the sleep cannot be lost. Returns 1 once ready(arg)
 * held, 0 at the deadline (deadline_ns < 0: none). */
static int cv_sleep_until(const sleeper *s, predicate ready, void *arg, int64_t deadline_ns) {
    int got = 0;
    atomic_fetch_add(s->sleepers, 1);
    pthread_mutex_lock(s->mu);
    for (;;) {
        if (ready(arg)) { got = 1; break; }
        if (deadline_ns >= 0 && agx_now_ns() >= deadline_ns) break;
        if (!timed_sleep(s->cv, s->mu, deadline_ns)) {
            got = ready(arg);
            break;
        }
    }
    pthread_mutex_unlock(s->mu);
    atomic_fetch_sub(s->sleepers, 1);
    return got;
}

static void cv_wake(const sleeper *s, int all) {
    if (atomic_load(s->sleepers) > 0) {
        pthread_mutex_lock(s->mu);
        if (all)
            pthread_cond_broadcast(s->cv);
        else
            pthread_cond_signal(s->cv);
        pthread_mutex_unlock(s->mu);
    }
}

#ifdef AGX_USE_FUTEX
/* The word is read before the predicate is checked: a waker that changes it
 * after the check makes the futex wait return at once. The sleepers count is
 * raised first (seq_cst), so a waker that changed the state and then saw no
 * sleeper is one whose change the predicate sees. */
static int sleep_until(const sleeper *s, predicate ready, void *arg, int64_t deadline_ns) {
    int got = 0;
    atomic_fetch_add(s->sleepers, 1);
    for (;;) {
        uint32_t seen = atomic_load(s->word);
        if (ready(arg)) { got = 1; break; }
        struct timespec rel, *relp = NULL;
        if (deadline_ns >= 0) {
            int64_t left = deadline_ns - agx_now_ns();
            if (left <= 0) break;
            rel.tv_sec = left / 1000000000LL;
            rel.tv_nsec = left % 1000000000LL;
            relp = &rel;
        }
        syscall(SYS_futex, s->word, FUTEX_WAIT_PRIVATE, seen, relp, NULL, 0);
    }
    atomic_fetch_sub(s->sleepers, 1);
    return got;
}

/* After the waitable's state changed: wake one sleeper. `bump`: change the word
 * first (when the state lives elsewhere, as a lock's owner does). */
static void wake_one(const sleeper *s, int bump) {
    if (atomic_load(s->sleepers) == 0) return;
    if (bump) atomic_fetch_add(s->word, 1);
    syscall(SYS_futex, s->word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}
#else
#define sleep_until cv_sleep_until
static void wake_one(const sleeper *s, int bump) {
    (void)bump;
    cv_wake(s, 0);
}
#endif

static void heir_init(agx_lock *l) {
    atomic_store(&l->heir, 0);
    atomic_store(&l->claim, 0);
    atomic_store(&l->heir_seq, 0);
    atomic_store(&l->heir_waiters, 0);
    init_cv(&l->heir_cv);
}

void agx_lock_init(agx_lock *l, const char *name) {
    l->name = name;
    atomic_store(&l->seq, 0);
    atomic_store(&l->owner, 0);
    l->depth = 0;
    l->last_owner = 0;
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

int agx_spin_until(int (*ready)(void *), void *arg, int64_t spin_ns) {
    uint64_t budget = (uint64_t)((double)spin_ns * agx_ticks_per_ns()), start = agx_ticks();
    for (unsigned i = 1;; i++) {
        if (ready(arg)) return 1;
        cpu_relax();
        if ((i & 63) == 0 && agx_ticks() - start > budget) return 0;
    }
}

int agx_spin_slotted(int (*ready)(void *), void *arg, int64_t spin_ns) {
    if (spin_ns <= 0 || !agx_spin_enter()) return 0;
    int got = agx_spin_until(ready, arg, spin_ns);
    agx_spin_leave();
    return got;
}

static int pred_take(void *l) { return attempt(l, 1); }
static int pred_free(void *l) { return attempt(l, 0); }

static sleeper lock_sleeper(agx_lock *l) { return (sleeper){&l->seq, &l->waiters, &l->mu, &l->cv}; }

static int wait_for(agx_lock *l, int64_t deadline_ns, int take) {
    if (attempt(l, take) || agx_spin_until(take ? pred_take : pred_free, l, SPIN_NS)) return 1;
    sleeper s = lock_sleeper(l);
    return sleep_until(&s, take ? pred_take : pred_free, l, deadline_ns);
}

static void lock_wake(agx_lock *l) {
    sleeper s = lock_sleeper(l);
    wake_one(&s, 1);
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

static sleeper seat_sleeper(agx_lock *l) { return (sleeper){&l->heir_seq, &l->heir_waiters, &l->mu, &l->heir_cv}; }

int agx_lock_heir_wait_until(agx_lock *l, int64_t deadline_ns) {
    if (take_seat(l, agx_thread_id())) return 1;
    sleeper s = seat_sleeper(l);
    return sleep_until(&s, pred_seat, l, deadline_ns);
}

void agx_lock_heir_leave(agx_lock *l) {
    uintptr_t me = agx_thread_id(), mine = me;
    if (!atomic_compare_exchange_strong(&l->heir, &me, 0)) return;
    atomic_compare_exchange_strong(&l->claim, &mine, 0);
    sleeper s = seat_sleeper(l);
    wake_one(&s, 1);
}

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
    l->last_owner = agx_thread_id();
    atomic_store_explicit(&l->owner, 0, memory_order_seq_cst);
    if (atomic_load_explicit(&l->waiters, memory_order_seq_cst) > 0) lock_wake(l);
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

static int pred_sem(void *s) { return agx_sem_try(s); }

static sleeper sem_sleeper(agx_sem *s) { return (sleeper){NULL, &s->waiters, &s->mu, &s->cv}; }

int agx_sem_wait_until(agx_sem *s, int64_t deadline_ns) {
    if (agx_sem_try(s)) return 1;
    sleeper w = sem_sleeper(s);
    return cv_sleep_until(&w, pred_sem, s, deadline_ns);
}

static void sem_wake(agx_sem *s, int all) {
    sleeper w = sem_sleeper(s);
    cv_wake(&w, all);
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
    init_sync(&s->mu, &s->cv);
}

/* ---- event ---- */

static _Atomic int spinners;

/* CPUs this thread may run on (its affinity mask on Linux). */
#ifdef __linux__
/* CPUs' worth of time a cgroup CPU quota allows (rounded up), or 0 for none:
 * a container limited to 2 CPUs still sees every CPU in its affinity mask, and
 * spinners there would burn the quota that the work needs. Read once. */
static int read_two_longs(const char *path, long *a, long *b) {
    FILE *f = fopen(path, "r");
    if (f == NULL) return 0;
    char text[64] = {0};
    int n = fgets(text, sizeof text, f) != NULL;
    fclose(f);
    if (!n) return 0;
    if (strncmp(text, "max", 3) == 0) return 0; /* cgroup v2: no quota */
    return sscanf(text, "%ld %ld", a, b);
}

static int quota_cpus(void) {
    static _Atomic int cached = -1;
    int q = atomic_load(&cached);
    if (q >= 0) return q;
    long quota = 0, period = 0;
    q = 0;
    if (read_two_longs("/sys/fs/cgroup/cpu.max", &quota, &period) == 2 ||
        (read_two_longs("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", &quota, &period) == 1 &&
         read_two_longs("/sys/fs/cgroup/cpu/cpu.cfs_period_us", &period, &period) == 1)) {
        if (quota > 0 && period > 0) q = (int)((quota + period - 1) / period);
    }
    atomic_store(&cached, q);
    return q;
}
#endif

static int read_usable_cpus(void) {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set), q = quota_cpus();
        return q > 0 && q < n ? q : n;
    }
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* Every wait that may spin asks this, so each thread keeps the answer: it is read
 * again after agx_affinity_changed() (agxguard's own pinning calls it) or, for
 * changes made elsewhere, after AFFINITY_TTL_NS. */
#define AFFINITY_TTL_NS (100 * 1000000LL)
static _Atomic unsigned affinity_gen;
static _Thread_local int tl_cpus;
static _Thread_local unsigned tl_gen;
static _Thread_local int64_t tl_read_at;

void agx_affinity_changed(void) { atomic_fetch_add(&affinity_gen, 1); }

int agx_usable_cpus(void) {
    unsigned gen = atomic_load_explicit(&affinity_gen, memory_order_relaxed);
    int64_t now = agx_now_ns();
    if (tl_cpus == 0 || tl_gen != gen || now - tl_read_at > AFFINITY_TTL_NS) {
        tl_cpus = read_usable_cpus();
        tl_gen = gen;
        tl_read_at = now;
    }
    return tl_cpus;
}

int agx_spin_enter(void) {
    /* two CPUs stay for the work the spinners wait on (a thread running a batch,
     * a thread holding the GIL) */
    int limit = agx_usable_cpus() - 2, cur = atomic_load(&spinners);
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

static int pred_event(void *e) { return agx_event_consume(e); }

/* Spin for the event, but not past the wait's deadline. */
static int event_spin(agx_event *e, int64_t deadline_ns, int64_t spin_ns) {
    if (spin_ns > 0 && deadline_ns >= 0) {
        int64_t left = deadline_ns - agx_now_ns();
        if (left < spin_ns) spin_ns = left;
    }
    return agx_spin_slotted(pred_event, e, spin_ns);
}

static sleeper event_sleeper(agx_event *e) { return (sleeper){&e->state, &e->sleepers, &e->mu, &e->cv}; }

int agx_event_wait_until(agx_event *e, int64_t deadline_ns, int64_t spin_ns) {
    if (agx_event_consume(e) || event_spin(e, deadline_ns, spin_ns)) return 1;
    sleeper s = event_sleeper(e);
    return sleep_until(&s, pred_event, e, deadline_ns);
}

void agx_event_set(agx_event *e) {
    atomic_store(&e->state, 1);
    sleeper s = event_sleeper(e);
    wake_one(&s, 0); /* the state is the word: a sleeper's wait returns */
}

