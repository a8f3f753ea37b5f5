/* event.c: see event.h. */
#include "event.h"

#include "spin.h"

void agx_event_init(agx_event *e) {
    atomic_store(&e->state, 0);
    atomic_store(&e->sleepers, 0);
    agx_init_sync(&e->mu, &e->cv);
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

static agx_sleeper event_sleeper(agx_event *e) { return (agx_sleeper){&e->state, &e->sleepers, &e->mu, &e->cv}; }

int agx_event_wait_until(agx_event *e, int64_t deadline_ns, int64_t spin_ns) {
    if (agx_event_consume(e) || event_spin(e, deadline_ns, spin_ns)) return 1;
    agx_sleeper s = event_sleeper(e);
    return agx_sleep_until(&s, pred_event, e, deadline_ns);
}

void agx_event_set(agx_event *e) {
    atomic_store(&e->state, 1);
    agx_sleeper s = event_sleeper(e);
    agx_wake_one(&s, 0); /* the state is the word: a sleeper's wait returns */
}
