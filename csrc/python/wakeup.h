/* wakeup.h: waiting on an agx_event from Python code's threads (wakeup.c):
 * with the GIL released, spinning first, taking the GIL back through the gate
 * that orders waiters (see wakeup.c), and running signal handlers between
 * slices of AGX_SLICE_NS. Used by _C.Wakeup and _C.RequestQueue. */
#ifndef AGX_WAKEUP_H
#define AGX_WAKEUP_H

#include <Python.h>

#include "event.h"

/* The caller holds the GIL. Wait until e is set (then clear it, return 1),
 * deadline_ns passes (agx_now_ns clock, < 0: none; return 0), or a signal
 * handler raises (return -1, exception set). spin_ns: spin this long first. */
AGX_HIDDEN int agx_wakeup_wait(agx_event *e, int64_t deadline_ns, int64_t spin_ns);

/* The same, and first run released(arg) once with the GIL released (and the
 * gate left, so the next waiter can run Python meanwhile): the request queue's
 * callers copy their request into the batch's staging buffer there. */
AGX_HIDDEN int agx_wakeup_wait_then(agx_event *e, int64_t deadline_ns, int64_t spin_ns, void (*released)(void *),
                                    void *arg);

#endif
