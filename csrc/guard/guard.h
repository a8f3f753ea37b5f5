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
#include "sem.h"

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
/* The mode (agx_mode); read it with agx_mode_get(). */
extern _Atomic int agx_mode_value;
/* A 64-bit finalizer (murmur3's): spreads addresses and keys over table
 * slots; the lock stripes and the stream table both hash with it. */
static inline uint64_t agx_mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static inline int agx_mode_get(void) { return atomic_load_explicit(&agx_mode_value, memory_order_relaxed); }
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

/* ---- the nesting rule (README, "Modes"): no deadlock whatever the mode does.
 *
 * An entry is anything that may take a lock of the mode: a region (guard()), a
 * call site (a torch op, a hooked driver call), a native region (model_runner).
 * 1. A thread reads the mode only while it holds no lock that an entry took;
 *    from its first such lock until it holds none again, every nested entry
 *    uses that mode (the thread is bound to it), whatever set_mode does. So a
 *    thread only ever holds and waits for locks of one mode's domains: global
 *    {the global lock}, op {the op lock}, stream {stream locks, object stripes}.
 * 2. Within those domains, locks are ordered (their addresses: stream slots
 *    before object stripes, see guard.c). A nested entry waits for a lock only
 *    if the thread already holds it (re-entry) or it comes after every lock
 *    the thread holds; otherwise it takes it if it is free right now, else it
 *    runs under the locks the thread holds (counted: agx_nesting_skips). Waits
 *    therefore always go up the order, and no cycle of waits can form.
 * 3. The throttle is taken only by an entry that opens the thread's first
 *    entry and holds no agxguard lock: throttle slots come before every lock. */
/* The calling thread's entries (one per thread; agx_entries() finds it, one
 * thread-local lookup, so a hooked call looks it up once). */
typedef struct agx_thread_entries {
    int entries;    /* open entries of every kind */
    int locked;     /* of those, entries that took a lock */
    int bound_mode; /* the mode of those locks (valid while locked > 0) */
    agx_lock *top;  /* the highest lock they hold (NULL: none) */
} agx_thread_entries;
/* Inline: one initial-exec TLS address (clock.h, AGX_TLS_HOT), no call. */
extern _Thread_local agx_thread_entries agx_thread_entries_tl AGX_TLS_HOT AGX_HIDDEN;
static inline agx_thread_entries *agx_entries(void) { return &agx_thread_entries_tl; }

typedef struct agx_entry {
    agx_thread_entries *t; /* its thread's */
    agx_lock *lock;        /* what this entry took; NULL: none */
    agx_lock *prev_top;    /* the thread's highest held lock before it */
} agx_entry;

/* The mode a new entry of the thread runs under (rule 1). */
static inline int agx_entry_mode_in(const agx_thread_entries *t) {
    return t->locked > 0 ? t->bound_mode : agx_mode_get();
}
int agx_entry_mode(void); /* the same for the calling thread */
/* What an entry may do with `want` (the lock its mode assigns), rule 2. */
typedef enum { AGX_ADMIT_NONE = 0, AGX_ADMIT_HELD, AGX_ADMIT_WAIT } agx_admit;
/* AGX_ADMIT_HELD: the caller holds `want` now (free, or re-entered);
 * AGX_ADMIT_WAIT: the caller may block on it, then holds it;
 * AGX_ADMIT_NONE: nothing to take (want NULL, or a skip, counted). */
agx_admit agx_entry_admit(agx_thread_entries *t, agx_lock *want);
/* Record an entry of thread t that now holds `lock` (may be NULL) under `mode`. */
void agx_entry_push(agx_thread_entries *t, agx_entry *e, int mode, agx_lock *lock);
/* Undo agx_entry_push: release what it took. LIFO per thread. */
void agx_entry_pop(agx_entry *e) AGX_HIDDEN; /* hidden: every hooked call's exit, no PLT */
/* agx_entry_push(t, e, mode, NULL) and agx_entry_pop of such an entry, inline:
 * what every hooked call does in mode off (no lock), without two calls. */
static inline void agx_entry_push_unlocked(agx_thread_entries *t, agx_entry *e) {
    e->t = t;
    e->lock = NULL;
    e->prev_top = t->top;
    t->entries++;
}
static inline void agx_entry_pop_any(agx_entry *e) {
    if (e->lock) {
        agx_entry_pop(e);
        return;
    }
    e->t->entries--;
    e->t->top = e->prev_top;
}
/* How many entries the calling thread has open (0: the next is outermost). */
int agx_entry_depth(void);
/* Nested entries that ran under their thread's locks instead of a lock they
 * could not wait for (rule 2); process-wide. */
uint64_t agx_nesting_skips(void);

/* A whole native entry (hooked call, native region) of thread t under `mode`
 * (from agx_entry_mode_in(t)): the lock of the site, admitted, waited for the
 * native way (acquire.h), pushed. */
void agx_entry_enter_native(agx_thread_entries *t, agx_entry *e, int mode, agx_site site, int has_stream,
                            uint64_t key, const void *object) AGX_HIDDEN; /* hidden: no PLT */

/* The op mode's lock (guard.c), for the inline entry below. */
extern agx_lock *const agx_op_lock_p AGX_HIDDEN;

/* A hooked call's op-mode entry, inline, for the common case: the thread's
 * first locked entry (rule 2: an entry that holds no lock may wait for any)
 * finding the op lock free. It does what agx_entry_enter_native(t, e,
 * AGX_MODE_OP, AGX_SITE_CALL, ...) does then, without the call, and returns 1;
 * otherwise it does nothing and returns 0 (the caller takes the general path). */
static inline int agx_entry_try_op_call(agx_thread_entries *t, agx_entry *e) {
    if (t->locked != 0) return 0;
    agx_lock *l = agx_op_lock_p;
    if (!agx_lock_try(l)) return 0;
    e->t = t;
    e->lock = l;
    e->prev_top = t->top;
    t->entries++;
    t->locked = 1;
    t->bound_mode = AGX_MODE_OP;
    if ((uintptr_t)l > (uintptr_t)t->top) t->top = l;
    return 1;
}

/* Per-thread stack of what each open region took, so that its exit releases
 * exactly that even if the mode changed in between. */
#define AGX_MAX_REGION_DEPTH 256
typedef struct agx_held {
    agx_entry entry;
    int throttled;        /* took a throttle slot */
    const void *owner;    /* who entered it (agx_region_set_owner); identity only */
} agx_held;
int agx_region_depth(void);
int agx_region_push(const agx_held *h); /* -1 when too deep */
int agx_region_pop(agx_held *out);      /* -1 when empty (or out of memory on push) */
/* The innermost open region's owner: set just after a push, read before a pop. */
void agx_region_set_owner(const void *owner);
const void *agx_region_owner(void); /* NULL when no region is open */

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
