/* sem.h: a counting semaphore whose limit may change at run time (0 = no
 * limit): the throttle. Waiters sleep on a mutex and condvar. */
#ifndef AGX_SEM_H
#define AGX_SEM_H

#include "lock.h" /* agx_lock_counters */

typedef struct agx_sem {
    _Atomic int in_use;
    _Atomic int limit;
    _Atomic int waiters;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t n_acq, n_cont, n_timeout, wait_ns, max_wait_ns;
} agx_sem;

void agx_sem_init(agx_sem *s, int limit);
int agx_sem_try(agx_sem *s);
/* Block until a slot is taken (1) or deadline_ns (< 0: none) passes (0). */
int agx_sem_wait_until(agx_sem *s, int64_t deadline_ns);
void agx_sem_release(agx_sem *s);
void agx_sem_set_limit(agx_sem *s, int limit);
void agx_sem_note_wait(agx_sem *s, int64_t waited_ns);
void agx_sem_note_timeout(agx_sem *s);
void agx_sem_read(agx_sem *s, agx_lock_counters *out);
void agx_sem_reset_counters(agx_sem *s);
/* In a fork child: `kept` slots are still held by the surviving thread. */
void agx_sem_after_fork(agx_sem *s, int kept);

#endif
