/* spin.c: see spin.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#endif
#include "spin.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#ifdef __linux__
#include <sched.h>
#endif

#include "clock.h"

int agx_spin_until(int (*ready)(void *), void *arg, int64_t spin_ns) {
    uint64_t budget = (uint64_t)((double)spin_ns * agx_ticks_per_ns()), start = agx_ticks();
    for (unsigned i = 1;; i++) {
        if (ready(arg)) return 1;
        agx_cpu_relax();
        if ((i & 63) == 0 && agx_ticks() - start > budget) return 0;
    }
}

int agx_spin_slotted(int (*ready)(void *), void *arg, int64_t spin_ns) {
    if (spin_ns <= 0 || !agx_spin_enter()) return 0;
    int got = agx_spin_until(ready, arg, spin_ns);
    agx_spin_leave();
    return got;
}

static _Atomic int spinners;

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
static _Thread_local int tl_cpus AGX_TLS_HOT;
static _Thread_local unsigned tl_gen AGX_TLS_HOT;
static _Thread_local int64_t tl_read_at AGX_TLS_HOT;

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
