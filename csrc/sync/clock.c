/* clock.c: see clock.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "clock.h"

#include <errno.h>
#include <time.h>
#if defined(__linux__) && !defined(AGX_LOCK_PORTABLE)
#define AGX_USE_FUTEX 1
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

_Thread_local char agx_thread_marker AGX_TLS_HOT AGX_HIDDEN;

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

void agx_init_cv(pthread_cond_t *cv) {
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
#if !defined(__APPLE__)
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
#endif
    pthread_cond_init(cv, &attr);
    pthread_condattr_destroy(&attr);
}

void agx_init_sync(pthread_mutex_t *mu, pthread_cond_t *cv) {
    pthread_mutex_init(mu, NULL);
    agx_init_cv(cv);
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
    /* an absolute CLOCK_MONOTONIC time: agx_init_cv sets that clock here */
    struct timespec ts = {deadline_ns / 1000000000LL, deadline_ns % 1000000000LL};
    return pthread_cond_timedwait(cv, mu, &ts) != ETIMEDOUT;
#endif
}

/* The predicate is checked under mu and wakers signal under mu, so a wake
 * between the check and the sleep cannot be lost. */
int agx_cv_sleep_until(const agx_sleeper *s, int (*ready)(void *), void *arg, int64_t deadline_ns) {
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

void agx_cv_wake(const agx_sleeper *s, int all) {
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
int agx_sleep_until(const agx_sleeper *s, int (*ready)(void *), void *arg, int64_t deadline_ns) {
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

void agx_wake_one(const agx_sleeper *s, int bump) {
    if (atomic_load(s->sleepers) == 0) return;
    if (bump) atomic_fetch_add(s->word, 1);
    syscall(SYS_futex, s->word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}
#else
int agx_sleep_until(const agx_sleeper *s, int (*ready)(void *), void *arg, int64_t deadline_ns) {
    return agx_cv_sleep_until(s, ready, arg, deadline_ns);
}

void agx_wake_one(const agx_sleeper *s, int bump) {
    (void)bump;
    agx_cv_wake(s, 0);
}
#endif
