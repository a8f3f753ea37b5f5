/* acquire.h: how every agxguard wait blocks, for Python callers and for native
 * callers (driver hooks) alike. */
#ifndef AGX_ACQUIRE_H
#define AGX_ACQUIRE_H

#include "guard.h"

/* How long a Python waiter sleeps at most before it takes the GIL to run
 * signal handlers (so Ctrl-C works while it waits). */
#define AGX_SLICE_NS (20 * 1000000LL)

/* Take `l` for a caller that holds the GIL: one try with the GIL held; then a
 * wait with the GIL released, in slices, running Python's signal handlers
 * between slices (so Ctrl-C works) and warning once past the warn threshold.
 * Returns 0, or -1 with a Python exception set (LockTimeout, KeyboardInterrupt). */
int agx_acquire_py(agx_lock *l);

/* Take `l` for a native caller that cannot raise (a driver hook). If the
 * calling thread holds the GIL, it is released while waiting. A driver call
 * has no error to return and must not run unlocked, so the wait ends only with
 * the lock or with the process: past the timeout (either action: 'raise'
 * cannot raise here) it prints why and aborts; on Python's main thread it runs
 * the signal handlers between slices, and Ctrl-C (KeyboardInterrupt) ends the
 * process as SIGINT does. */
void agx_acquire_native(agx_lock *l);

/* Whether Python waiters queue for the heir seat (lock.h); on by default. Off
 * only to measure what the seat buys (agxguard._C._set_heir_seat). */
extern _Atomic int agx_heir_seat_on;
/* How long the heir spins (GIL released) before it sleeps, when a spinning slot
 * is free (lock.h: agx_spin_enter); 200 us by default. */
extern _Atomic int64_t agx_heir_spin_ns;

/* How a Python waiter waits for a lock (measuring: _C._set_region_wait):
 * WATCH: the heir watches the lock free with the GIL released and tries once it
 * has the GIL back; GRACE: the same, but a free sighting counts only when the
 * lock stays free for agx_grace_ns (the releaser did not take it straight back);
 * DIRECT: take the lock with the GIL released, then wait for the GIL. */
enum { AGX_WAIT_WATCH = 0, AGX_WAIT_GRACE = 1, AGX_WAIT_DIRECT = 2, AGX_WAIT_COUNT };
extern _Atomic int agx_region_wait;
extern _Atomic int64_t agx_grace_ns;
/* Whether the op lock's heir claims it after CLAIM_NS and CLAIM_PASSES (acquire.c; region
 * locks never claim); on by default. */
extern _Atomic int agx_claim_on;
/* Process-wide tallies of Python lock waits (measuring: _C._wait_counts). */
typedef struct agx_wait_counts {
    _Atomic uint64_t gil_trips;      /* the GIL taken back after seeing the lock free */
    _Atomic uint64_t gil_trips_lost; /* ... and the try then lost */
    _Atomic uint64_t grace_retaken;  /* free sightings the releaser took back within the grace */
} agx_wait_counts;
extern agx_wait_counts agx_wait_counts_now;

/* Take a throttle slot for a caller that holds the GIL; as agx_acquire_py. */
int agx_throttle_acquire_py(void);

#endif
