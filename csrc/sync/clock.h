/* clock.h: thread ids, clocks and sleeping on a futex word or a condition
 * variable: what the lock, the semaphore and the event are built on. Pure C
 * (pthreads, C11 atomics), no Python. */
#ifndef AGX_CLOCK_H
#define AGX_CLOCK_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

/* AGX_TLS_HOT marks a small thread-local on a hot path initial-exec: one
 * fs-relative load instead of a __tls_get_addr call (general-dynamic, the
 * default in a shared object). glibc keeps a little static TLS spare for
 * objects loaded with dlopen, so only a few dozen bytes in all may carry it
 * (today: the thread-id marker and agx_thread_entries, under 40 bytes); big
 * per-thread state stays general-dynamic. Other platforms: the default. */
#if defined(__GNUC__) && defined(__linux__) && !defined(AGX_TLS_DEFAULT_MODEL)
#define AGX_TLS_HOT __attribute__((tls_model("initial-exec")))
#else
#define AGX_TLS_HOT
#endif

/* AGX_HIDDEN: a symbol shared between agxguard's own sources only (not
 * exported from the extension), so its thread-locals stay module-local. */
#if defined(__GNUC__)
#define AGX_HIDDEN __attribute__((visibility("hidden")))
#else
#define AGX_HIDDEN
#endif

/* An id for the calling thread, never 0: the address of a thread-local. It
 * survives fork() for the forking thread, which is what fork safety needs.
 * Inline: every lock acquire and release asks for it. */
extern _Thread_local char agx_thread_marker AGX_TLS_HOT AGX_HIDDEN;
static inline uintptr_t agx_thread_id(void) { return (uintptr_t)&agx_thread_marker; }

/* Monotonic time in nanoseconds (slow path only). */
int64_t agx_now_ns(void);
/* A cheap tick counter for hold times, and its rate (calibrated once). */
uint64_t agx_ticks(void);
double agx_ticks_per_ns(void);

static inline void agx_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* Owner-only counter bump: a relaxed load and store, no locked instruction. */
#define AGX_BUMP(field, by)                                                                      \
    atomic_store_explicit(&(field), atomic_load_explicit(&(field), memory_order_relaxed) + (by), \
                          memory_order_relaxed)

/* A mutex and a condvar on the monotonic clock (where the platform has one). */
void agx_init_sync(pthread_mutex_t *mu, pthread_cond_t *cv);
void agx_init_cv(pthread_cond_t *cv);

/* Where threads sleep until a predicate holds: a futex word that wakers change
 * (Linux), or a mutex and a condvar (elsewhere, and with AGX_LOCK_PORTABLE),
 * and a count of sleepers, so that a waker makes a system call only when
 * someone sleeps. */
typedef struct agx_sleeper {
    _Atomic uint32_t *word; /* futex builds */
    _Atomic int *sleepers;
    pthread_mutex_t *mu;    /* condvar builds */
    pthread_cond_t *cv;
} agx_sleeper;

/* Sleep until ready(arg) returns nonzero (then 1) or deadline_ns (agx_now_ns
 * clock; < 0: none) passes (then 0). agx_sleep_until uses the futex word where
 * there is one; agx_cv_sleep_until always the condvar. */
int agx_sleep_until(const agx_sleeper *s, int (*ready)(void *), void *arg, int64_t deadline_ns);
int agx_cv_sleep_until(const agx_sleeper *s, int (*ready)(void *), void *arg, int64_t deadline_ns);
/* After the state that ready() reads changed: wake one sleeper; `bump`: change
 * the futex word first (when the state lives elsewhere, as a lock's owner does). */
void agx_wake_one(const agx_sleeper *s, int bump);
/* The condvar wake: one sleeper, or all. */
void agx_cv_wake(const agx_sleeper *s, int all);

#endif
