/* swizzle_hook.h: inside the swizzle engine. One hooked (class, selector) is
 * a slot; every wrapper, the typed ones (swizzle.c, from swizzle_shapes.h)
 * and the general forwarder's closures (forwarder.c), runs the same entry
 * and exit path around the original: agx_hook_enter / agx_hook_exit. Not
 * for use outside csrc/objc. */
#ifndef AGX_SWIZZLE_HOOK_H
#define AGX_SWIZZLE_HOOK_H

#include <stdatomic.h>
#include <stdint.h>

#include "acquire.h"
#include "guard.h"
#include "objc_compat.h"
#include "swizzle.h"

typedef struct agx_hook_slot {
    int used;                 /* bound to (cls, sel) for the process's life */
    Class cls;
    Class super;              /* for added overrides */
    SEL sel;
    const char *class_name;   /* owned copies */
    const char *sel_name;
    const char *shape;        /* a typed shape's key, or the forwarder's description */
    IMP wrapper;              /* what the method's implementation is while hooked */
    int added;                /* the class only inherited the method */
    _Atomic int kind;         /* 0: plain; else reported to the observer */
    _Atomic uintptr_t orig;   /* the original IMP (own methods) */
    _Atomic int active;
    _Atomic uint64_t calls;
} agx_hook_slot;

/* How deep structs may nest in a type encoding (Metal's are 2 or 3 deep); deeper
 * input is refused with a clear error instead of recursing without bound. */
#define AGX_TYPE_MAX_DEPTH 64 /* agxguard.swizzle.TYPE_ENCODING_MAX_DEPTH */

/* Type-encoding scanners (swizzle.c): past a frame offset ("16", "-8"), past
 * qualifiers (r n N o O R V A), past one complete type (NULL when malformed;
 * iterative, so no input exhausts the stack). */
const char *agx_skip_offset(const char *p);
const char *agx_skip_qualifiers(const char *p);
const char *agx_skip_type(const char *p);

/* The observer (agx_swizzle_set_observer), an agx_swizzle_observer. */
extern _Atomic uintptr_t agx_swizzle_observer_fn;

/* Lock (or not) and count one call; *orig gets the implementation to call,
 * *kind the hook's kind (0 when inactive or plain). Returns 1 when it opened
 * an entry (guard.h: the nesting rule) that agx_hook_exit closes. Not-active
 * slots forward untouched: a thread that looked the wrapper up just before
 * uninstall still runs the original. */
static inline int agx_hook_enter(agx_hook_slot *s, id self, IMP *orig, int *kind, agx_entry *e) {
    *kind = 0;
    /* `active` first: its release store at install comes after the slot's
     * plain fields, so this acquire orders the reads below after them (a
     * thread can reach the wrapper through the runtime's method table, which
     * is no C11 synchronization, e.g. the driver's completion thread while
     * install is still under way). */
    int active = atomic_load_explicit(&s->active, memory_order_acquire);
    if (s->added)
        *orig = class_getMethodImplementation(s->super, s->sel);
    else
        *orig = (IMP)atomic_load_explicit(&s->orig, memory_order_acquire);
    if (!active) return 0;
    int k = atomic_load_explicit(&s->kind, memory_order_relaxed);
    *kind = k & ~AGX_SWZ_NO_LOCK;
    atomic_fetch_add_explicit(&s->calls, 1, memory_order_relaxed);
    if (k & AGX_SWZ_NO_LOCK) return 0; /* the completion path: never waits for a mode lock */
    agx_thread_entries *t = agx_entries();
    int mode = agx_entry_mode_in(t);
    if (mode == AGX_MODE_OFF) { /* no lock: the entry only counts (guard.h, the nesting rule) */
        agx_entry_push_unlocked(t, e);
        return 1;
    }
    if (mode == AGX_MODE_OP && agx_entry_try_op_call(t, e)) return 1; /* uncontended op: no call */
    uint64_t key = 0;
    int has = mode == AGX_MODE_STREAM && agx_swizzle_stream_of(self, &key); /* only stream mode uses it */
    agx_entry_enter_native(t, e, mode, AGX_SITE_CALL, has, key, (const void *)self);
    return 1;
}

static inline void agx_hook_exit(int entered, agx_entry *e) {
    if (entered) agx_entry_pop_any(e);
}

static inline void agx_hook_event(int kind, int phase, id self, uint64_t ret) {
    agx_swizzle_observer fn =
        (agx_swizzle_observer)atomic_load_explicit(&agx_swizzle_observer_fn, memory_order_acquire);
    if (fn) fn(kind, phase, self, ret);
}

#endif
