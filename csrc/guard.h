/* guard.h: the lock domains and the rule that maps (mode, call site, stream,
 * object) to a lock. Pure C: the driver hooks, the Python contexts and the
 * ThreadSanitizer stress test all go through this one rule.
 *
 *   mode     REGION site (guard())        CALL site (one driver call / torch op)
 *   off      none                         none
 *   op       none                         the process-wide op lock
 *   stream   lock of the stream           lock of the stream, else of the object
 *   global   the process-wide global lock the global lock (re-entrant with regions)
 *
 * The throttle (at most N outermost regions at once) is orthogonal to the mode. */
#ifndef AGX_GUARD_H
#define AGX_GUARD_H

#include "lock.h"

typedef enum { AGX_MODE_OFF = 0, AGX_MODE_OP, AGX_MODE_STREAM, AGX_MODE_GLOBAL, AGX_MODE_COUNT } agx_mode;
extern const char *const agx_mode_names[AGX_MODE_COUNT];

typedef enum { AGX_SITE_REGION = 0, AGX_SITE_CALL = 1 } agx_site;

typedef enum {
    AGX_DOMAIN_GLOBAL = 0,
    AGX_DOMAIN_OP,
    AGX_DOMAIN_STREAM,
    AGX_DOMAIN_OBJECT,
    AGX_DOMAIN_COUNT
} agx_domain;
extern const char *const agx_domain_names[AGX_DOMAIN_COUNT];

/* Idempotent; registers the fork handlers. */
void agx_guard_init(void);

/* -1 if `name` is not a mode. */
int agx_mode_from_name(const char *name);
int agx_mode_get(void);
void agx_mode_set(int mode);

agx_lock *agx_global_lock(void);
agx_lock *agx_op_lock(void);
/* One lock per key, created on first use and kept for the process. When the
 * table is full, keys share striped locks (more serialization, never less). */
agx_lock *agx_stream_lock(uint64_t key);
/* Striped by address: distinct objects may share a lock, never the reverse. */
agx_lock *agx_object_lock(const void *object);

/* The lock the current mode assigns to a site; NULL for none. `has_stream`
 * says whether `stream_key` is meaningful; `object` may be NULL. */
agx_lock *agx_lock_for(agx_site site, int has_stream, uint64_t stream_key, const void *object);
/* The same rule for a mode the caller already read (so a stream key it
 * resolved for that mode is used under that mode, even if the mode changes). */
agx_lock *agx_lock_for_mode(int mode, agx_site site, int has_stream, uint64_t stream_key, const void *object);

/* Throttle: at most `limit` outermost regions at once (0 = no limit). */
agx_sem *agx_throttle(void);

/* Per-thread stack of what each open region took, so that its exit releases
 * exactly that even if the mode changed in between. */
#define AGX_MAX_REGION_DEPTH 256
typedef struct agx_held {
    agx_lock *lock;       /* may be NULL */
    int throttled;        /* took a throttle slot */
} agx_held;
int agx_region_depth(void);
int agx_region_push(agx_lock *lock, int throttled); /* -1 when too deep */
int agx_region_pop(agx_held *out);                  /* -1 when empty */

/* The calling thread's current stream (set by use_stream()). */
int agx_thread_stream(uint64_t *key);  /* 1 and *key when set */
void agx_thread_stream_set(int has, uint64_t key);

/* Wait policy, read by whoever blocks (see acquire.c). 0 = off. */
typedef struct agx_wait_config {
    _Atomic int64_t warn_ns;
    _Atomic int64_t timeout_ns;
    _Atomic int timeout_aborts; /* abort() instead of raising */
} agx_wait_config;
extern agx_wait_config agx_wait;

typedef struct agx_domain_counters {
    agx_lock_counters c;
    uint64_t locks; /* how many locks the domain has created */
} agx_domain_counters;
void agx_domain_read(agx_domain d, agx_domain_counters *out);
void agx_stats_reset(void);

#endif
