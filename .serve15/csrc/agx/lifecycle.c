/* lifecycle.c: see lifecycle.h. The open table is small (one entry per
 * encoder open right now) and guarded by its own mutex, a leaf: never held
 * across a message send or while taking another lock, so it adds no lock
 * order to the mode's locks, and the completion path (dealloc, unlocked)
 * can take it while any thread holds a mode lock. */
#include "lifecycle.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "guard.h"
#include "hook_table.h"
#include "swizzle.h"

#define AGX_MAX_OPEN 1024

typedef struct open_encoder {
    id encoder;
    id buffer;
    int retained;
    int ending; /* an end (the caller's or commit safety's) is under way: nobody else ends it */
} open_encoder;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static open_encoder open_set[AGX_MAX_OPEN];
static int n_open;
static int tracking; /* under mu: the whole hook set is installed */
static _Atomic uint64_t c_created, c_ended, c_forced, c_retained, c_freed_open, c_untracked, c_abandoned;
static SEL s_retain, s_release, s_end, s_queue;

static void sels(void) {
    if (s_queue) return;
    s_retain = sel_registerName("retain");
    s_release = sel_registerName("release");
    s_end = sel_registerName("endEncoding");
    s_queue = sel_registerName("commandQueue");
}

static int implements(id obj, SEL sel) { return class_getInstanceMethod(object_getClass(obj), sel) != NULL; }

static int find_open(id enc) {
    for (int i = 0; i < n_open; i++)
        if (open_set[i].encoder == enc) return i;
    return -1;
}

/* Removes `enc` from the open set; 1 and *retained if it was there. */
static int take_open(id enc, int *retained) {
    pthread_mutex_lock(&mu);
    int i = find_open(enc);
    if (i >= 0) {
        *retained = open_set[i].retained;
        open_set[i] = open_set[--n_open];
    }
    pthread_mutex_unlock(&mu);
    return i >= 0;
}

/* An end of `enc` starts: it is claimed, so commit safety will not end it too. */
static void claim_end(id enc) {
    pthread_mutex_lock(&mu);
    int i = find_open(enc);
    if (i >= 0) open_set[i].ending = 1;
    pthread_mutex_unlock(&mu);
}

/* The stream of a queue: its registered key, else its address (registered
 * now, so that the queue's own hooked calls use the same lock). */
static uint64_t queue_key(id queue) {
    uint64_t key;
    if (agx_swizzle_stream_of(queue, &key)) return key;
    key = (uint64_t)(uintptr_t)queue;
    agx_swizzle_set_stream(queue, key);
    return key;
}

/* A command buffer made before the hooks: ask it for its queue. */
static int resolve_stream(const void *object, uint64_t *key) {
    id obj = (id)object;
    sels();
    if (!obj || !implements(obj, s_queue)) return 0;
    id q = ((id(*)(id, SEL))agx_objc_lookup(obj, s_queue))(obj, s_queue);
    if (!q) return 0;
    *key = queue_key(q);
    return 1;
}

static void encoder_stream(id buffer, id enc) {
    uint64_t key;
    if (agx_swizzle_stream_of(buffer, &key)) agx_swizzle_set_stream(enc, key);
}

static void encoder_made(id buffer, id enc) {
    pthread_mutex_lock(&mu);
    if (!tracking) { /* installing or uninstalling: its end might not be hooked */
        pthread_mutex_unlock(&mu);
        return;
    }
    for (int i = 0; i < n_open; i++)
        if (open_set[i].encoder == enc) { /* a wrapping factory (MPSCommandBuffer) saw it first */
            pthread_mutex_unlock(&mu);
            return;
        }
    if (n_open == AGX_MAX_OPEN) {
        pthread_mutex_unlock(&mu);
        atomic_fetch_add(&c_untracked, 1);
        return;
    }
    int retain = implements(enc, s_retain) && implements(enc, s_release);
    open_set[n_open++] = (open_encoder){enc, buffer, retain, 0};
    pthread_mutex_unlock(&mu);
    if (retain) {
        ((id(*)(id, SEL))agx_objc_lookup(enc, s_retain))(enc, s_retain);
        atomic_fetch_add(&c_retained, 1);
    }
    atomic_fetch_add(&c_created, 1);
}

static void encoder_ended(id enc) {
    int retained = 0;
    if (!take_open(enc, &retained)) return;
    atomic_fetch_add(&c_ended, 1);
    if (retained) ((void (*)(id, SEL))agx_objc_lookup(enc, s_release))(enc, s_release);
}

/* Commit safety: end what is still open on `buffer` before it commits.
 * Only encoders whose end has not been seen (by any END_ENCODER row) are
 * in the set, and each is claimed before the message, so no encoder is
 * ended twice: not by a caller's end under way, not by a second commit. */
static void before_commit(id buffer) {
    id ends[AGX_MAX_OPEN];
    int n = 0;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < n_open; i++)
        if (open_set[i].buffer == buffer && !open_set[i].ending) {
            open_set[i].ending = 1;
            ends[n++] = open_set[i].encoder;
        }
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < n; i++) {
        atomic_fetch_add(&c_forced, 1);
        /* A message, so it runs through the endEncoding hook (re-entrant
         * lock), whose AFTER untracks and releases it ... */
        ((void (*)(id, SEL))agx_objc_lookup(ends[i], s_end))(ends[i], s_end);
        /* ... unless the class's endEncoding was not hooked: do it here. */
        encoder_ended(ends[i]);
    }
}

static void observe(int kind, int phase, id self, uint64_t ret) {
    int off = agx_mode_get() == AGX_MODE_OFF;
    switch (kind) {
    case AGX_KIND_MAKE_BUFFER:
        /* stream keys in every mode: they protect nothing by themselves */
        if (phase == AGX_SWZ_AFTER && ret) agx_swizzle_set_stream((const void *)(uintptr_t)ret, queue_key(self));
        break;
    case AGX_KIND_MAKE_ENCODER:
        if (phase != AGX_SWZ_AFTER || !ret) break;
        encoder_stream(self, (id)(uintptr_t)ret);
        if (!off) encoder_made(self, (id)(uintptr_t)ret);
        break;
    case AGX_KIND_END_ENCODER:
        if (phase == AGX_SWZ_BEFORE) claim_end(self);
        else encoder_ended(self);
        break;
    case AGX_KIND_COMMIT:
        if (phase == AGX_SWZ_BEFORE && !off) before_commit(self);
        break;
    case AGX_KIND_DEALLOC: { /* unlocked (completion path): lifecycle's mutex only */
        int retained;
        if (phase == AGX_SWZ_BEFORE) agx_swizzle_clear_stream(self); /* before the address can be reused */
        if (phase == AGX_SWZ_BEFORE && take_open(self, &retained)) atomic_fetch_add(&c_freed_open, 1);
        break;
    }
    }
}

void agx_lifecycle_attach(void) {
    sels();
    agx_swizzle_set_observer(observe);
    agx_swizzle_set_stream_resolver(resolve_stream);
}

void agx_lifecycle_read(agx_lifecycle_counts *o) {
    o->created = atomic_load(&c_created);
    o->ended = atomic_load(&c_ended);
    o->forced_ends = atomic_load(&c_forced);
    o->retained = atomic_load(&c_retained);
    o->freed_open = atomic_load(&c_freed_open);
    o->untracked = atomic_load(&c_untracked);
    o->abandoned = atomic_load(&c_abandoned);
    pthread_mutex_lock(&mu);
    o->open = (uint64_t)n_open;
    pthread_mutex_unlock(&mu);
}

void agx_lifecycle_reset_counts(void) {
    atomic_store(&c_created, 0);
    atomic_store(&c_ended, 0);
    atomic_store(&c_forced, 0);
    atomic_store(&c_retained, 0);
    atomic_store(&c_freed_open, 0);
    atomic_store(&c_untracked, 0);
    atomic_store(&c_abandoned, 0);
}

void agx_lifecycle_set_tracking(int on) {
    pthread_mutex_lock(&mu);
    tracking = on;
    if (!on) {
        atomic_fetch_add(&c_abandoned, (uint64_t)n_open);
        n_open = 0;
    }
    pthread_mutex_unlock(&mu);
}
