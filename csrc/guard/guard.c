/* guard.c: lock domains, modes and the per-thread region stack (see guard.h). */
#include "guard.h"

#include <stdlib.h>
#include <string.h>

const char *const agx_mode_names[AGX_MODE_COUNT] = {"off", "op", "stream", "global"};
const char *const agx_domain_names[AGX_DOMAIN_COUNT] = {"global", "op", "stream", "object"};

#define STREAM_SLOTS 1024 /* power of two */
#define OBJECT_STRIPES 64 /* power of two */

typedef struct stream_slot {
    _Atomic int ready; /* 0 empty, 1 published (key and lock valid) */
    uint64_t key;
    agx_lock lock;
} stream_slot;

_Atomic int agx_mode_value;

/* The field order is the lock order of rule 2 (guard.h): stream slots come
 * before object stripes (the order is by address), so a hooked call on an
 * object with no stream, inside a region on a stream, waits up the order. */
static struct {
    agx_lock global, op;
    stream_slot streams[STREAM_SLOTS];
    agx_lock objects[OBJECT_STRIPES];
    _Atomic int n_streams;
    _Atomic uint64_t nesting_skips;
    pthread_mutex_t streams_mu; /* serializes inserts only */
    agx_sem throttle;
} G;

agx_lock *const agx_op_lock_p = &G.op;

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

agx_wait_config agx_wait;

/* Per-thread state. The whole module's TLS goes into glibc's static TLS once
 * any of it is initial-exec (clock.h, AGX_TLS_HOT), and only a few hundred
 * bytes are spare for dlopen'd objects: so the region stack (about 10 KB) is
 * behind a pointer, allocated on the thread's first region and freed at its
 * exit (region_key's destructor), and T itself is a few words. */
typedef struct thread_regions {
    int depth; /* Python regions */
    agx_held items[AGX_MAX_REGION_DEPTH];
} thread_regions;

static _Thread_local struct {
    thread_regions *r; /* NULL until the first region */
    int has_stream;
    uint64_t stream;
} T AGX_TLS_HOT;

/* The thread's entries: every hooked call reads them (guard.h, agx_entries). */
_Thread_local agx_thread_entries agx_thread_entries_tl AGX_TLS_HOT AGX_HIDDEN;
#define E agx_thread_entries_tl

static pthread_key_t region_key;
static pthread_once_t region_key_once = PTHREAD_ONCE_INIT;
static void regions_free(void *r) { free(r); }
static void region_key_make(void) { pthread_key_create(&region_key, regions_free); }

/* The calling thread's region stack, allocated on first use (NULL: out of memory). */
static thread_regions *regions(void) {
    if (T.r) return T.r;
    pthread_once(&region_key_once, region_key_make);
    thread_regions *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    pthread_setspecific(region_key, r);
    T.r = r;
    return r;
}

static void fork_prepare(void) { pthread_mutex_lock(&G.streams_mu); }
static void fork_parent(void) { pthread_mutex_unlock(&G.streams_mu); }
static void fork_child(void) {
    pthread_mutex_init(&G.streams_mu, NULL);
    agx_lock_after_fork(&G.global);
    agx_lock_after_fork(&G.op);
    for (int i = 0; i < OBJECT_STRIPES; i++) agx_lock_after_fork(&G.objects[i]);
    for (int i = 0; i < STREAM_SLOTS; i++)
        if (atomic_load(&G.streams[i].ready)) agx_lock_after_fork(&G.streams[i].lock);
    /* only the forking thread survives: its outermost region kept its slot */
    agx_sem_after_fork(&G.throttle, T.r && T.r->depth > 0 && T.r->items[0].throttled);
}

static void init_all(void) {
    agx_ticks_per_ns(); /* calibrate now (2 ms), not in the first spin */
    agx_lock_init(&G.global, "global");
    agx_lock_init(&G.op, "op");
    for (int i = 0; i < OBJECT_STRIPES; i++) agx_lock_init(&G.objects[i], "object");
    pthread_mutex_init(&G.streams_mu, NULL);
    agx_sem_init(&G.throttle, 0);
    atomic_store(&agx_mode_value, AGX_MODE_OFF);
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}

void agx_guard_init(void) { pthread_once(&init_once, init_all); }

int agx_mode_from_name(const char *name) {
    for (int i = 0; i < AGX_MODE_COUNT; i++)
        if (strcmp(name, agx_mode_names[i]) == 0) return i;
    return -1;
}

void agx_mode_set(int mode) { atomic_store(&agx_mode_value, mode); }

agx_lock *agx_global_lock(void) { return &G.global; }
agx_lock *agx_op_lock(void) { return &G.op; }
agx_sem *agx_throttle(void) { return &G.throttle; }

agx_lock *agx_object_lock(const void *object) {
    return &G.objects[agx_mix64((uint64_t)(uintptr_t)object) & (OBJECT_STRIPES - 1)];
}

agx_lock *agx_stream_lock(uint64_t key) {
    uint64_t h = agx_mix64(key);
    /* Lock-free lookup: slots are filled in probe order and never emptied. */
    for (unsigned i = 0; i < STREAM_SLOTS; i++) {
        stream_slot *s = &G.streams[(h + i) & (STREAM_SLOTS - 1)];
        if (!atomic_load_explicit(&s->ready, memory_order_acquire)) break;
        if (s->key == key) return &s->lock;
    }
    pthread_mutex_lock(&G.streams_mu);
    agx_lock *found = NULL;
    for (unsigned i = 0; i < STREAM_SLOTS; i++) {
        stream_slot *s = &G.streams[(h + i) & (STREAM_SLOTS - 1)];
        if (!atomic_load_explicit(&s->ready, memory_order_acquire)) {
            if (atomic_load(&G.n_streams) >= STREAM_SLOTS / 2) break; /* keep probes short */
            s->key = key;
            agx_lock_init(&s->lock, "stream");
            atomic_store_explicit(&s->ready, 1, memory_order_release);
            atomic_fetch_add(&G.n_streams, 1);
            found = &s->lock;
            break;
        }
        if (s->key == key) { found = &s->lock; break; }
    }
    pthread_mutex_unlock(&G.streams_mu);
    if (!found) found = &G.objects[h & (OBJECT_STRIPES - 1)];
    return found;
}

agx_lock *agx_lock_for(agx_site site, int has_stream, uint64_t stream_key, const void *object) {
    return agx_lock_for_mode(agx_mode_get(), site, has_stream, stream_key, object);
}

/* agx_lock_for_mode, inlined where the hooked calls enter (agx_entry_enter_native):
 * a call of the exported function goes through the PLT (-fPIC). */
static inline agx_lock *lock_for_mode(int mode, agx_site site, int has_stream, uint64_t stream_key,
                                      const void *object) {
    switch (mode) {
    case AGX_MODE_OP:
        return site == AGX_SITE_CALL ? &G.op : NULL;
    case AGX_MODE_STREAM:
        if (has_stream) return agx_stream_lock(stream_key);
        return object ? agx_object_lock(object) : agx_stream_lock(0);
    case AGX_MODE_GLOBAL:
        return &G.global;
    default:
        return NULL;
    }
}

agx_lock *agx_lock_for_mode(int mode, agx_site site, int has_stream, uint64_t stream_key, const void *object) {
    return lock_for_mode(mode, site, has_stream, stream_key, object);
}

int agx_entry_mode(void) { return agx_entry_mode_in(&E); }

int agx_entry_depth(void) { return E.entries; }

uint64_t agx_nesting_skips(void) { return atomic_load_explicit(&G.nesting_skips, memory_order_relaxed); }

static inline agx_admit admit(agx_thread_entries *t, agx_lock *want) {
    if (want == NULL) return AGX_ADMIT_NONE;
    /* nothing held, or up the order: a wait cannot close a cycle */
    if (t->locked == 0 || (uintptr_t)want > (uintptr_t)t->top) return AGX_ADMIT_WAIT;
    if (agx_lock_try(want)) return AGX_ADMIT_HELD; /* re-entry, or free right now */
    atomic_fetch_add_explicit(&G.nesting_skips, 1, memory_order_relaxed);
    return AGX_ADMIT_NONE;
}

static inline void push(agx_thread_entries *t, agx_entry *e, int mode, agx_lock *lock) {
    e->t = t;
    e->lock = lock;
    e->prev_top = t->top;
    t->entries++;
    if (lock == NULL) return;
    if (t->locked++ == 0) t->bound_mode = mode;
    if ((uintptr_t)lock > (uintptr_t)t->top) t->top = lock;
}

agx_admit agx_entry_admit(agx_thread_entries *t, agx_lock *want) { return admit(t, want); }

void agx_entry_push(agx_thread_entries *t, agx_entry *e, int mode, agx_lock *lock) { push(t, e, mode, lock); }

void agx_entry_pop(agx_entry *e) {
    agx_thread_entries *t = e->t;
    t->entries--;
    t->top = e->prev_top;
    if (e->lock == NULL) return;
    t->locked--;
    agx_lock_release(e->lock);
}

void agx_acquire_native(agx_lock *l); /* acquire.h; the C-only tests bring their own */

void agx_entry_enter_native(agx_thread_entries *t, agx_entry *e, int mode, agx_site site, int has_stream,
                            uint64_t key, const void *object) {
    agx_lock *l = lock_for_mode(mode, site, has_stream, key, object);
    switch (admit(t, l)) {
    case AGX_ADMIT_WAIT:
        if (!agx_lock_try(l)) agx_acquire_native(l); /* the uncontended case without the call */
        break;
    case AGX_ADMIT_HELD:
        break;
    default:
        l = NULL;
    }
    push(t, e, mode, l);
}

int agx_region_depth(void) { return T.r ? T.r->depth : 0; }

int agx_region_push(const agx_held *h) {
    thread_regions *r = regions();
    if (!r || r->depth >= AGX_MAX_REGION_DEPTH) return -1;
    r->items[r->depth++] = *h;
    return 0;
}

int agx_region_pop(agx_held *out) {
    thread_regions *r = T.r;
    if (!r || r->depth == 0) return -1;
    *out = r->items[--r->depth];
    return 0;
}

void agx_region_set_owner(const void *owner) {
    thread_regions *r = T.r;
    if (r && r->depth > 0) r->items[r->depth - 1].owner = owner;
}

const void *agx_region_owner(void) {
    thread_regions *r = T.r;
    return r && r->depth > 0 ? r->items[r->depth - 1].owner : NULL;
}

int agx_thread_stream(uint64_t *key) {
    if (T.has_stream) *key = T.stream;
    return T.has_stream;
}

void agx_thread_stream_set(int has, uint64_t key) {
    T.has_stream = has;
    T.stream = key;
}

static void add_counters(agx_lock_counters *sum, const agx_lock_counters *c) {
    sum->acquisitions += c->acquisitions;
    sum->reentries += c->reentries;
    sum->contentions += c->contentions;
    sum->timeouts += c->timeouts;
    sum->wait_ns += c->wait_ns;
    sum->hold_ns += c->hold_ns;
    sum->hold_samples += c->hold_samples;
    sum->handoffs += c->handoffs;
    if (c->max_wait_ns > sum->max_wait_ns) sum->max_wait_ns = c->max_wait_ns;
}

void agx_domain_read(agx_domain d, agx_domain_counters *out) {
    memset(out, 0, sizeof *out);
    agx_lock_counters c;
    switch (d) {
    case AGX_DOMAIN_GLOBAL:
        agx_lock_read(&G.global, &out->c);
        out->locks = 1;
        break;
    case AGX_DOMAIN_OP:
        agx_lock_read(&G.op, &out->c);
        out->locks = 1;
        break;
    case AGX_DOMAIN_STREAM:
        for (int i = 0; i < STREAM_SLOTS; i++)
            if (atomic_load_explicit(&G.streams[i].ready, memory_order_acquire)) {
                agx_lock_read(&G.streams[i].lock, &c);
                add_counters(&out->c, &c);
            }
        out->locks = (uint64_t)atomic_load(&G.n_streams);
        break;
    case AGX_DOMAIN_OBJECT:
        for (int i = 0; i < OBJECT_STRIPES; i++) {
            agx_lock_read(&G.objects[i], &c);
            add_counters(&out->c, &c);
        }
        out->locks = OBJECT_STRIPES;
        break;
    default:
        break;
    }
}

void agx_stats_reset(void) {
    agx_lock_reset_counters(&G.global);
    agx_lock_reset_counters(&G.op);
    for (int i = 0; i < OBJECT_STRIPES; i++) agx_lock_reset_counters(&G.objects[i]);
    for (int i = 0; i < STREAM_SLOTS; i++)
        if (atomic_load_explicit(&G.streams[i].ready, memory_order_acquire))
            agx_lock_reset_counters(&G.streams[i].lock);
    agx_sem_reset_counters(&G.throttle);
    atomic_store(&G.nesting_skips, 0);
}
