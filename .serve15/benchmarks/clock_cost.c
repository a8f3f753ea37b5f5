/* clock_cost.c: what the uncontended C lock path is made of, on this machine.
 * ns per: the tick read used for hold times, clock_gettime(MONOTONIC), and a
 * try+release of an agx_lock. Build: make clock-cost */
#include <stdio.h>
#include <time.h>

#include "lock.h"

#define N 20000000L

static double per_ns(int64_t t0, long n) { return (double)(agx_now_ns() - t0) / (double)n; }

int main(void) {
    volatile uint64_t sink = 0;
    int64_t t0 = agx_now_ns();
    for (long i = 0; i < N; i++) sink += agx_ticks();
    printf("agx_ticks()                 %6.1f ns\n", per_ns(t0, N));
    struct timespec ts;
    t0 = agx_now_ns();
    for (long i = 0; i < N; i++) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        sink += (uint64_t)ts.tv_nsec;
    }
    printf("clock_gettime(MONOTONIC)    %6.1f ns\n", per_ns(t0, N));
    agx_lock l;
    agx_lock_init(&l, "bench");
    t0 = agx_now_ns();
    for (long i = 0; i < N; i++) {
        agx_lock_try(&l);
        agx_lock_release(&l);
    }
    printf("agx_lock try+release        %6.1f ns\n", per_ns(t0, N));
    return (int)(sink & 0);
}
