/* start_gate.h: release N threads at once (a one-shot barrier).
 *
 * macOS has no pthread_barrier_t, so the model runner and the race classes
 * use this instead: a mutex, a condvar and a count. Every thread that calls
 * agx_gate_wait blocks until `parties` threads have called it; then all go. */
#ifndef AGX_START_GATE_H
#define AGX_START_GATE_H

#include <pthread.h>

typedef struct agx_gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int waiting, parties;
} agx_gate;

static inline void agx_gate_init(agx_gate *g, int parties) {
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->waiting = 0;
    g->parties = parties;
}

static inline void agx_gate_wait(agx_gate *g) {
    pthread_mutex_lock(&g->mu);
    if (++g->waiting >= g->parties)
        pthread_cond_broadcast(&g->cv);
    else
        while (g->waiting < g->parties) pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
}

/* Call once every party has returned from agx_gate_wait. */
static inline void agx_gate_destroy(agx_gate *g) {
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
}

#endif
