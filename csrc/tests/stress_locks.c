/* stress_locks.c: the lock domains under many threads, for ThreadSanitizer.
 *
 * Each critical section updates plain (non-atomic) shared data; if a lock
 * failed to order two sections, ThreadSanitizer reports a data race and the
 * overlap checks below fail. Also checks exact counters, re-entrancy, the
 * throttle limit, concurrent stream-table inserts, and stats read while the
 * locks are in use. Exit status 0 means every invariant held.
 *
 *   stress_locks [threads] [iterations] [unlocked]
 *
 * With "unlocked" the global section runs without its lock: ThreadSanitizer
 * must then report a race (the check that the check can fail).
 *
 * Then the nesting rule (guard.h): threads open entries three deep (a region
 * on one stream, a region on another, a call on an object) through the same
 * agx_entry_* path the hooks and guard() use, while a thread switches modes
 * at random; an alarm ends a run that deadlocks. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "event.h"
#include "guard.h"

/* The native wait of acquire.c, without Python. */
void agx_acquire_native(agx_lock *l) {
    if (!agx_lock_try(l)) {
        int64_t t0 = agx_now_ns();
        agx_lock_wait_until(l, -1);
        agx_lock_note_wait(l, agx_now_ns() - t0);
    }
}

static int threads = 8, iterations = 2000;
static long global_counter;          /* guarded by the global lock */
static int global_inside;            /* must never exceed 1 */
#define KEYS 4
static long stream_counter[KEYS];    /* guarded by each stream's lock */
static int stream_inside[KEYS];
static _Atomic int throttle_inside, throttle_max;
static _Atomic int failures;
static _Atomic int stop_reader;
static int unlocked;

#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            fprintf(stderr, "FAIL: " __VA_ARGS__);         \
            fputc('\n', stderr);                           \
            atomic_fetch_add(&failures, 1);                \
        }                                                  \
    } while (0)

static void take(agx_lock *l) {
    if (!agx_lock_try(l)) {
        int64_t t0 = agx_now_ns();
        agx_lock_wait_until(l, -1);
        agx_lock_note_wait(l, agx_now_ns() - t0);
    }
}

/* The way Python waiters take a lock: take the heir seat, watch the lock
 * free, then try; pass the wakeup on when the try loses; leave the seat once
 * the lock is held. */
static void take_watching(agx_lock *l) {
    for (int round = 0; !agx_lock_try(l); round++) {
        if (round == 3) agx_lock_claim(l); /* as a late heir does (no-op for others) */
        if (agx_lock_heir_wait_until(l, -1) && agx_lock_wait_free_until(l, -1) && agx_lock_try(l)) {
            agx_lock_heir_leave(l);
            return;
        }
        agx_lock_pass_wakeup(l);
    }
    agx_lock_heir_leave(l); /* no-op unless this thread held the seat */
}

static long op_counter; /* guarded by the op lock */
static int op_inside;

static void *worker(void *arg) {
    long id = (long)arg;
    for (int i = 0; i < iterations; i++) {
        /* global mode, a region with a nested re-entry */
        agx_lock *g = agx_global_lock();
        if (!unlocked) {
            take(g);
            take(g);
        }
        global_inside++;
        CHECK(unlocked || global_inside == 1, "global region overlap (%d inside)", global_inside);
        global_counter++;
        global_inside--;
        if (!unlocked) {
            agx_lock_release(g);
            agx_lock_release(g);
        }

        /* stream locks, two threads per key; the table is shared with inserts below */
        int k = (int)(id % KEYS);
        agx_lock *s = agx_stream_lock(1000 + k);
        take(s);
        stream_inside[k]++;
        CHECK(stream_inside[k] == 1, "stream %d overlap", k);
        stream_counter[k]++;
        stream_inside[k]--;
        agx_lock_release(s);

        /* many new keys created concurrently */
        agx_lock *fresh = agx_stream_lock((uint64_t)(id * 100000 + i % 50) + 1);
        take(fresh);
        agx_lock_release(fresh);

        /* throttle of 2 */
        agx_sem *t = agx_throttle();
        if (!agx_sem_try(t)) agx_sem_wait_until(t, -1);
        int now = atomic_fetch_add(&throttle_inside, 1) + 1;
        int prev = atomic_load(&throttle_max);
        while (now > prev && !atomic_compare_exchange_weak(&throttle_max, &prev, now)) {
        }
        CHECK(now <= 2, "throttle admitted %d", now);
        atomic_fetch_sub(&throttle_inside, 1);
        agx_sem_release(t);

        /* the mode rule: call sites in op mode take the op lock */
        agx_lock *op = agx_lock_for(AGX_SITE_CALL, 0, 0, NULL);
        CHECK(op == agx_op_lock(), "op mode did not give the op lock to a call site");
        if (id % 2)
            take(op);
        else
            take_watching(op);
        op_inside++;
        CHECK(op_inside == 1, "op section overlap");
        op_counter++;
        op_inside--;
        agx_lock_release(op);
    }
    return NULL;
}

static void *reader(void *arg) {
    (void)arg;
    while (!atomic_load(&stop_reader)) {
        for (int d = 0; d < AGX_DOMAIN_COUNT; d++) {
            agx_domain_counters c;
            agx_domain_read((agx_domain)d, &c);
        }
    }
    return NULL;
}

/* agx_event: a token passed round a ring of threads; each hop's data write must
 * be visible to the next thread (TSan checks the event orders them), and no set
 * may be lost (a lost one hangs the ring). Half the members spin first. */
#define RING_ROUNDS 500
static agx_event ring_events[64];
static long ring_hops; /* written by the token holder only */

static void *ring_member(void *arg) {
    long i = (long)arg, n = threads < 64 ? threads : 64;
    for (int r = 0; r < RING_ROUNDS; r++) {
        agx_event_wait_until(&ring_events[i], -1, (i & 1) ? 50000 : 0);
        ring_hops++;
        agx_event_set(&ring_events[(i + 1) % n]);
    }
    return NULL;
}

static void ring_test(void) {
    long n = threads < 64 ? threads : 64;
    if (n < 2) return;
    pthread_t tids[64];
    for (long i = 0; i < n; i++) agx_event_init(&ring_events[i]);
    for (long i = 0; i < n; i++) pthread_create(&tids[i], NULL, ring_member, (void *)i);
    agx_event_set(&ring_events[0]);
    for (long i = 0; i < n; i++) pthread_join(tids[i], NULL);
    CHECK(ring_hops == n * RING_ROUNDS, "event ring: %ld hops, expected %ld", ring_hops, n * RING_ROUNDS);
}

/* ---- nested entries under mode switches ---- */
static _Atomic int stop_switcher;
static long nested_global; /* plain data, written only while holding the global lock */
static long nested_stream[KEYS]; /* written only while holding stream key 2000+k's lock */
static _Atomic long nested_done;
static long nested_op;                 /* plain data, written only while holding the op lock */
static _Atomic long nested_op_entries; /* how many entries took the op lock */

static void *mode_switcher(void *arg) {
    unsigned r = 12345;
    (void)arg;
    while (!atomic_load(&stop_switcher)) {
        r = r * 1103515245u + 12345u;
        agx_mode_set((int)((r >> 16) % AGX_MODE_COUNT));
    }
    return NULL;
}

static void *nested_worker(void *arg) {
    long id = (long)arg;
    int objects[4];
    for (int i = 0; i < iterations; i++) {
        int k1 = (int)((id + i) % KEYS), k2 = (int)((id * 7 + i * 3) % KEYS);
        agx_entry outer, inner, call, hook;
        agx_thread_entries *t = agx_entries();
        /* a hooked call entered as swizzle_hook.h does: the inline op path first */
        int mode = agx_entry_mode_in(t);
        if (!(mode == AGX_MODE_OP && agx_entry_try_op_call(t, &hook)))
            agx_entry_enter_native(t, &hook, mode, AGX_SITE_CALL, 0, 0, &objects[i & 3]);
        CHECK(!hook.lock || agx_lock_owned(hook.lock), "a hooked call's lock is not held by its thread");
        if (hook.lock == agx_op_lock()) {
            nested_op++;
            atomic_fetch_add(&nested_op_entries, 1);
        }
        agx_entry_pop_any(&hook);
        CHECK(agx_entry_depth() == 0, "a hooked call's entry left open");
        agx_entry_enter_native(t, &outer, agx_entry_mode_in(t), AGX_SITE_REGION, 1, 2000 + (uint64_t)k1, NULL);
        agx_entry_enter_native(t, &inner, agx_entry_mode_in(t), AGX_SITE_REGION, 1, 2000 + (uint64_t)k2, NULL);
        agx_entry_enter_native(t, &call, agx_entry_mode_in(t), AGX_SITE_CALL, i & 1, 2000 + (uint64_t)k2,
                               &objects[i & 3]);
        agx_entry *es[3] = {&outer, &inner, &call};
        for (int j = 0; j < 3; j++) {
            agx_lock *l = es[j]->lock;
            if (!l) continue;
            CHECK(agx_lock_owned(l), "an entry's lock is not held by its thread");
            if (l == agx_global_lock()) nested_global++;
            for (int k = 0; k < KEYS; k++)
                if (l == agx_stream_lock(2000 + (uint64_t)k)) nested_stream[k]++;
        }
        agx_entry_pop(&call);
        agx_entry_pop(&inner);
        agx_entry_pop(&outer);
        CHECK(agx_entry_depth() == 0, "entries left open");
        atomic_fetch_add(&nested_done, 1);
    }
    return NULL;
}

/* switching: a thread switches modes at random; else stream mode throughout
 * (where nested entries on other streams meet the lock order most often). */
static void nested_test(int switching) {
    pthread_t sw, *tids = calloc((size_t)threads, sizeof *tids);
    atomic_store(&nested_done, 0);
    atomic_store(&stop_switcher, !switching);
    agx_mode_set(AGX_MODE_STREAM);
    pthread_create(&sw, NULL, mode_switcher, NULL);
    for (long i = 0; i < threads; i++) pthread_create(&tids[i], NULL, nested_worker, (void *)i);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    atomic_store(&stop_switcher, 1);
    pthread_join(sw, NULL);
    free(tids);
    CHECK(atomic_load(&nested_done) == (long)threads * iterations, "nested: %ld of %ld done",
          atomic_load(&nested_done), (long)threads * iterations);
    CHECK(nested_op == atomic_load(&nested_op_entries), "hooked calls under the op lock lost updates: %ld of %ld",
          nested_op, atomic_load(&nested_op_entries));
    printf("nested (%s): %ld entries three deep, %ld hooked calls under the op lock so far, %llu nested skips so far\n",
           switching ? "mode switches" : "stream mode", atomic_load(&nested_done), atomic_load(&nested_op_entries),
           (unsigned long long)agx_nesting_skips());
}

int main(int argc, char **argv) {
    if (argc > 1) threads = atoi(argv[1]);
    if (argc > 2) iterations = atoi(argv[2]);
    if (argc > 3) unlocked = strcmp(argv[3], "unlocked") == 0;
    if (threads < 1 || iterations < 1) {
        fprintf(stderr, "usage: stress_locks [threads>=1] [iterations>=1]\n");
        return 2;
    }
    agx_guard_init();
    agx_mode_set(AGX_MODE_OP);
    agx_sem_set_limit(agx_throttle(), 2);

    pthread_t rd, *tids = calloc((size_t)threads, sizeof *tids);
    pthread_create(&rd, NULL, reader, NULL);
    for (long i = 0; i < threads; i++) pthread_create(&tids[i], NULL, worker, (void *)i);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    atomic_store(&stop_reader, 1);
    pthread_join(rd, NULL);
    free(tids);

    if (!unlocked) ring_test();
    long total = (long)threads * iterations;
    if (unlocked) return atomic_load(&failures) ? 1 : 0; /* the counts below assume the lock */
    CHECK(global_counter == total, "global counter %ld, expected %ld", global_counter, total);
    long streams = 0;
    for (int k = 0; k < KEYS; k++) streams += stream_counter[k];
    CHECK(streams == total, "stream counters %ld, expected %ld", streams, total);
    agx_domain_counters g, op;
    agx_domain_read(AGX_DOMAIN_GLOBAL, &g);
    agx_domain_read(AGX_DOMAIN_OP, &op);
    CHECK(g.c.acquisitions == (uint64_t)total, "global acquisitions %llu", (unsigned long long)g.c.acquisitions);
    CHECK(g.c.reentries == (uint64_t)total, "global reentries %llu", (unsigned long long)g.c.reentries);
    CHECK(op_counter == total, "op counter %ld, expected %ld", op_counter, total);
    CHECK(op.c.acquisitions == (uint64_t)total, "op acquisitions %llu", (unsigned long long)op.c.acquisitions);
    CHECK(threads < 2 || atomic_load(&throttle_max) >= 1, "throttle never admitted");
    alarm(120); /* a deadlock ends the run (SIGALRM), not the test session */
    nested_test(1);
    nested_test(0);
    alarm(0);
    printf("stress_locks: %d threads x %d iterations, global contentions %llu, throttle max %d, failures %d\n",
           threads, iterations, (unsigned long long)g.c.contentions, atomic_load(&throttle_max),
           atomic_load(&failures));
    return atomic_load(&failures) ? 1 : 0;
}
