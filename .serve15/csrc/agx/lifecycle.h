/* lifecycle.h: encoder lifecycle tracking and stream keys, driven by the hook
 * kinds of hook_table.h (the swizzle engine's observer).
 *
 *   command buffer made   it gets its queue's stream key (the queue's own
 *                         registered key, else the queue's address)
 *   encoder made          it gets its buffer's stream key, is retained (when
 *                         its class implements retain), and is tracked open
 *   end (endEncoding or   claimed before the original runs; untracked,
 *   deferredEndEncoding)  released, counted ended after it
 *   commit                encoders still open on the buffer, and not being
 *                         ended, are claimed and ended first (commit safety),
 *                         counted as forced ends; none is ended twice
 *   dealloc               a tracked encoder is forgotten (counted); runs on
 *                         the driver's completion path without a mode lock
 *
 * Lock order: lifecycle's mutex is a leaf (never held across a message send
 * or another lock), so the unlocked dealloc row can take it while any thread
 * holds a mode or region lock; see hook_table.h, "Lock order".
 *
 * In mode `off` nothing new is tracked and commit safety is off (off is
 * unprotected); an encoder tracked earlier is still released at its end.
 * Stream keys are recorded in every mode. */
#ifndef AGX_LIFECYCLE_H
#define AGX_LIFECYCLE_H

#include <stdint.h>

#include "objc_compat.h"

typedef struct agx_lifecycle_counts {
    uint64_t created;      /* encoders tracked from their factory */
    uint64_t ended;        /* tracked encoders that reached endEncoding (forced ones included) */
    uint64_t forced_ends;  /* ended by commit safety */
    uint64_t retained;     /* retains taken (the rest are tracked only) */
    uint64_t freed_open;   /* tracked encoders dealloc'd before their end */
    uint64_t untracked;    /* the open table was full */
    uint64_t abandoned;    /* open at an uninstall: forgotten, their retain kept */
    uint64_t open;         /* tracked now */
} agx_lifecycle_counts;

/* Route the swizzle engine's observer and stream resolver here. */
void agx_lifecycle_attach(void);
void agx_lifecycle_read(agx_lifecycle_counts *out);
void agx_lifecycle_reset_counts(void); /* all but `open` */
/* Track new encoders only while the whole hook set is on: an encoder whose
 * factory was hooked but whose end may not be (install or uninstall under
 * way) is never tracked, so commit safety never ends one twice. Turning it
 * off forgets open encoders without releasing them (their owners may still
 * call them: a bounded leak, never a use after free). */
void agx_lifecycle_set_tracking(int on);

#endif
