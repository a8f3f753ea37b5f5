/* event.h: an auto-reset event (a binary semaphore): set() makes it set, a
 * wait that sees it set clears it. Made for handing a result to one waiting
 * thread fast: the waiter first spins (up to spin_ns, while a spinning slot is
 * free: spin.h), then sleeps (futex on Linux, condvar elsewhere). The setter
 * makes a system call only when the waiter sleeps. */
#ifndef AGX_EVENT_H
#define AGX_EVENT_H

#include "clock.h"

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

#endif
