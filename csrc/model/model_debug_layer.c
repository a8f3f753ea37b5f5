/* model_debug_layer.c: the model's validation layer (see model_debug_layer.h).
 *
 * Ownership, as in the base model: a wrapper queue owns its base queue (its
 * release releases it), a wrapper command buffer owns its base buffer and
 * holds the wrapper encoders it made until it completes (commit), a wrapper
 * encoder is reference counted (retain/release/dealloc, as NSObject's) and
 * borrows its base encoder, which the base buffer holds. Wrappers are never
 * freed (counted dead instead), like the model's own objects, so a late call
 * from a racing thread never touches freed memory. */
#include "model_debug_layer.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver_model.h"
#include "model_capi.h"
#include "model_images.h"
#include "swizzle_shapes.h"

const char *const agx_model_debug_device_class = "MTLModelDebugDevice";
const char *const agx_model_debug_queue_class = "MTLModelDebugCommandQueue";
const char *const agx_model_debug_cmdbuf_class = "MTLModelDebugCommandBuffer";
const char *const agx_model_debug_compute_class = "MTLModelDebugComputeCommandEncoder";
const char *const agx_model_debug_blit_class = "MTLModelDebugBlitCommandEncoder";
static const char *const root_class_name = "MTLModelToolsObject";

enum { K_DEVICE = 0, K_QUEUE, K_BUFFER, K_ENCODER };
#define MAX_MADE 8
#define MAX_LAYER_CLASSES 16

typedef struct layer_ivars {
    id base;           /* first: the forwarders read it */
    id parent;         /* the wrapper that made this one */
    int kind;
    _Atomic int refs;  /* encoders */
    _Atomic int dead;
    int n_made;        /* buffers: wrapper encoders held until completion */
    id made[MAX_MADE];
} layer_ivars;

#define LV(obj) ((layer_ivars *)object_getIndexedIvars(obj))

/* ------------------------------------------------------------ forwarders */
/* One forwarder per swizzle-engine shape: the same selector, the same
 * arguments, sent to the wrapped object (which goes through its hooks). */

static inline id inner_of(id self) { return *(id *)object_getIndexedIvars(self); }

#define FWD_KIND_v V
#define FWD_KIND_u64 VAL
#define FWD_KIND_f32 VAL
#define FWD_KIND_f64 VAL
#define FWD_KIND_q2 VAL
#define FWD_KIND_q3 VAL
#define FWD_KIND_q4 VAL
#define FWD_KIND_q6 VAL
#define FWD_KIND_d2 VAL
#define FWD_KIND_d4 VAL

#define FWD_V(name, RTOK, N, ARGS)                                                        \
    static void fwd_##name(id self, SEL cmd AGX_CAT(AGX_P, N) ARGS) {                     \
        id b = inner_of(self);                                                            \
        ((void (*)(id, SEL AGX_CAT(AGX_T, N) ARGS))agx_objc_lookup(b, cmd))(b, cmd AGX_CAT(AGX_A, N) ARGS); \
    }
#define FWD_VAL(name, RTOK, N, ARGS)                                                      \
    static agx_t_##RTOK fwd_##name(id self, SEL cmd AGX_CAT(AGX_P, N) ARGS) {             \
        id b = inner_of(self);                                                            \
        return ((agx_t_##RTOK(*)(id, SEL AGX_CAT(AGX_T, N) ARGS))agx_objc_lookup(b, cmd))( \
            b, cmd AGX_CAT(AGX_A, N) ARGS);                                               \
    }
#define FWD_DEFINE(name, RTOK, N, ARGS) AGX_CAT(FWD_, FWD_KIND_##RTOK)(name, RTOK, N, ARGS)
AGX_SHAPES(FWD_DEFINE)

#define FWD_ROW(name, RTOK, N, ARGS) {AGX_STR(RTOK) AGX_STR(ARGS), (IMP)fwd_##name},
static const struct { const char *key; IMP imp; } forwarders[] = {AGX_SHAPES(FWD_ROW)};

IMP agx_model_forwarder(const char *types) {
    char why[160];
    const char *key = agx_model_capi->swizzle_shape_for(types, why, sizeof why);
    if (!key) return NULL;
    for (size_t i = 0; i < sizeof forwarders / sizeof forwarders[0]; i++)
        if (!strcmp(forwarders[i].key, key)) return forwarders[i].imp;
    return NULL;
}

/* A shape with no typed forwarder: the swizzle engine's general forwarder
 * (capi.h), redirecting each call to the inner object. */
static void *inner_of_object(void *self) { return inner_of((id)self); }
static IMP any_forwarder(const char *types) {
    IMP f = agx_model_forwarder(types);
    char why[160];
    return f ? f : (IMP)agx_model_capi->forwarder_make_redirect(inner_of_object, types, why, sizeof why);
}

static int named(SEL sel, const char *const *names) {
    for (; names && *names; names++)
        if (!strcmp(sel_getName(sel), *names)) return 1;
    return 0;
}

static int defines(Class cls, SEL sel) {
    unsigned n = 0;
    Method *ms = class_copyMethodList(cls, &n);
    int found = 0;
    for (unsigned i = 0; i < n && !found; i++) found = sel_isEqual(method_getName(ms[i]), sel);
    free(ms);
    return found;
}

int agx_model_add_forwarders(Class wrapper, Class base, const char *const *skip) {
    int added = 0;
    for (Class c = base; c && class_getSuperclass(c); c = class_getSuperclass(c)) {
        unsigned n = 0;
        Method *ms = class_copyMethodList(c, &n);
        for (unsigned i = 0; i < n; i++) {
            SEL sel = method_getName(ms[i]);
            if (named(sel, skip) || defines(wrapper, sel)) continue;
            const char *types = method_getTypeEncoding(ms[i]);
            IMP f = any_forwarder(types);
            if (!f) {
                fprintf(stderr, "AGXModel: -[%s %s] (%s) cannot be forwarded by %s\n", class_getName(c),
                        sel_getName(sel), types ? types : "?", class_getName(wrapper));
                continue;
            }
            added += class_addMethod(wrapper, sel, f, types) ? 1 : 0;
        }
        free(ms);
    }
    return added;
}

/* --------------------------------------------------------------- classes */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int enabled = -1; /* -1: the environment not read yet */
static Class root;
static struct { Class base, wrapper; int kind; } layer_classes[MAX_LAYER_CLASSES];
static _Atomic int n_layer_classes;
static id the_wrapper_device;

int agx_model_debug_layer_enabled(void) {
    int e = atomic_load(&enabled);
    if (e < 0) {
        const char *v = getenv("AGX_MODEL_DEBUG_LAYER");
        e = v && v[0] && strcmp(v, "0") != 0;
        int unread = -1;
        atomic_compare_exchange_strong(&enabled, &unread, e);
        e = atomic_load(&enabled);
    }
    return e;
}

void agx_model_set_debug_layer(int on) { atomic_store(&enabled, on ? 1 : 0); }

static Class wrapper_class_of(Class base) {
    int n = atomic_load(&n_layer_classes);
    for (int i = 0; i < n; i++)
        if (layer_classes[i].base == base) return layer_classes[i].wrapper;
    return Nil;
}

id agx_model_debug_base(id obj) {
    for (int depth = 0; obj && depth < 8; depth++) {
        Class c = object_getClass(obj);
        int wrapper = 0;
        int n = atomic_load(&n_layer_classes);
        for (int i = 0; i < n && !wrapper; i++) wrapper = layer_classes[i].wrapper == c;
        if (!wrapper) return obj;
        obj = LV(obj)->base;
    }
    return obj;
}

static id make_wrapper(Class cls, int kind, id base, id parent) {
    id w = class_createInstance(cls, sizeof(layer_ivars));
    memset(object_getIndexedIvars(w), 0, sizeof(layer_ivars));
    layer_ivars *v = LV(w);
    v->base = base;
    v->parent = parent;
    v->kind = kind;
    atomic_store(&v->refs, 1);
    agx_model_live_add(AGX_LIVE_DEBUG_WRAPPER, 1);
    return w;
}

static void mark_dead(id self) {
    int was = 0;
    if (atomic_compare_exchange_strong(&LV(self)->dead, &was, 1)) agx_model_live_add(AGX_LIVE_DEBUG_WRAPPER, -1);
}

static void send_void(id o, SEL s) { ((void (*)(id, SEL))agx_objc_lookup(o, s))(o, s); }
static int responds(id o, SEL s) { return o && class_getInstanceMethod(object_getClass(o), s) != NULL; }

static Class wrapper_class_for(Class base, int kind);

/* A factory's result, wrapped; an encoder stays held by the buffer that made it. */
static id wrap_result(id self, id result, int kind) {
    if (!result) return NULL;
    Class cls = wrapper_class_of(object_getClass(result)); /* made once: no lock after the first */
    if (!cls) {
        pthread_mutex_lock(&mu);
        cls = wrapper_class_for(object_getClass(result), kind);
        pthread_mutex_unlock(&mu);
    }
    if (!cls) return result;
    id w = make_wrapper(cls, kind, result, self);
    if (kind == K_ENCODER) {
        layer_ivars *v = LV(self);
        if (v->n_made < MAX_MADE) v->made[v->n_made++] = w;
    }
    return w;
}

/* Factories: the same selector on the base object, its result wrapped. */
static int kind_made_by(int kind, SEL cmd) {
    const char *s = sel_getName(cmd);
    switch (kind) {
    case K_DEVICE: return !strncmp(s, "newCommandQueue", 15) ? K_QUEUE : -1;
    case K_QUEUE: return !strncmp(s, "commandBuffer", 13) ? K_BUFFER : -1;
    case K_BUFFER: return strstr(s, "CommandEncoder") ? K_ENCODER : -1;
    }
    return -1;
}
static int result_kind(id self, SEL cmd) { return kind_made_by(LV(self)->kind, cmd); }
static id factory0(id self, SEL cmd) {
    id b = inner_of(self);
    id r = ((id(*)(id, SEL))agx_objc_lookup(b, cmd))(b, cmd);
    return wrap_result(self, r, result_kind(self, cmd));
}
static id factory1(id self, SEL cmd, uint64_t a) {
    id b = inner_of(self);
    id r = ((id(*)(id, SEL, uint64_t))agx_objc_lookup(b, cmd))(b, cmd, a);
    return wrap_result(self, r, result_kind(self, cmd));
}

static id w_baseObject(id self, SEL cmd) { (void)cmd; return LV(self)->base; }
static id w_parent(id self, SEL cmd) { (void)cmd; return LV(self)->parent; }

/* Queue and buffer: the owner's release releases the base object too. */
static void w_release_owner(id self, SEL cmd) {
    id b = LV(self)->base;
    if (responds(b, cmd)) send_void(b, cmd);
    mark_dead(self);
}

/* Buffer: commit, then (the model's GPU completes at commit) drop the
 * references it held to the encoders it made. */
static void w_commit(id self, SEL cmd) {
    send_void(inner_of(self), cmd);
    layer_ivars *v = LV(self);
    int n = v->n_made;
    v->n_made = 0;
    SEL rel = sel_registerName("release");
    for (int i = 0; i < n && i < MAX_MADE; i++) send_void(v->made[i], rel);
}

/* Encoders: reference counted, as NSObject's. */
static id w_retain(id self, SEL cmd) {
    (void)cmd;
    atomic_fetch_add(&LV(self)->refs, 1);
    return self;
}
static void w_release(id self, SEL cmd) {
    (void)cmd;
    if (atomic_fetch_sub(&LV(self)->refs, 1) == 1) send_void(self, sel_registerName("dealloc"));
}
static void w_dealloc(id self, SEL cmd) { (void)cmd; mark_dead(self); }

static void add(Class c, const char *sel, void *imp, const char *types) {
    class_addMethod(c, sel_registerName(sel), (IMP)imp, types);
}

static int make_root(void) {
    if (root) return 0;
    if (objc_getClass(root_class_name)) return -1; /* someone else's */
    root = agx_objc_new_root_class(root_class_name); /* isa slot and +initialize */
    if (!root) return -1;
    add(root, "baseObject", w_baseObject, "@@:");
    objc_registerClassPair(root);
    return 0;
}

static const char *name_for(Class base, int kind, char *buf, size_t n) {
    const char *b = class_getName(base);
    switch (kind) {
    case K_DEVICE: return agx_model_debug_device_class;
    case K_QUEUE: return agx_model_debug_queue_class;
    case K_BUFFER: return agx_model_debug_cmdbuf_class;
    }
    if (!strcmp(b, agx_model_compute_class)) return agx_model_debug_compute_class;
    if (!strcmp(b, agx_model_blit_class)) return agx_model_debug_blit_class;
    snprintf(buf, n, "MTLModelDebug_%s", b); /* an encoder class the layer has no name for */
    return buf;
}

/* The wrapper class of `base` (made on first use). Under mu. */
static Class wrapper_class_for(Class base, int kind) {
    Class have = wrapper_class_of(base);
    if (have || kind < 0) return have;
    if (make_root() < 0 || atomic_load(&n_layer_classes) == MAX_LAYER_CLASSES) return Nil;
    char buf[160];
    Class c = objc_allocateClassPair(root, name_for(base, kind, buf, sizeof buf), 0);
    if (!c) return Nil;
    /* this layer's own methods first (the forwarders skip what the wrapper
     * implements): factories, whose results get wrapped */
    unsigned n = 0;
    Method *ms = class_copyMethodList(base, &n);
    for (unsigned i = 0; i < n; i++) {
        SEL sel = method_getName(ms[i]);
        const char *types = method_getTypeEncoding(ms[i]);
        if (!types || types[0] != '@' || kind_made_by(kind, sel) < 0) continue;
        char why[160];
        const char *key = agx_model_capi->swizzle_shape_for(types, why, sizeof why);
        if (key && !strcmp(key, "u64()")) class_addMethod(c, sel, (IMP)factory0, types);
        else if (key && !strcmp(key, "u64(u64)")) class_addMethod(c, sel, (IMP)factory1, types);
    }
    free(ms);
    if (kind == K_QUEUE) {
        add(c, "device", w_parent, "@@:");
        add(c, "release", w_release_owner, "Vv@:");
    } else if (kind == K_BUFFER) {
        add(c, "commandQueue", w_parent, "@@:");
        add(c, "commit", w_commit, "v@:");
        add(c, "release", w_release_owner, "Vv@:");
    } else if (kind == K_ENCODER) {
        add(c, "retain", w_retain, "@@:");
        add(c, "release", w_release, "Vv@:");
        add(c, "dealloc", w_dealloc, "v@:");
    }
    static const char *const never[] = {"retain", "release", "dealloc", "autorelease", "initialize", NULL};
    agx_model_add_forwarders(c, base, never);
    objc_registerClassPair(c);
    int i = atomic_load(&n_layer_classes);
    layer_classes[i].base = base;
    layer_classes[i].wrapper = c;
    layer_classes[i].kind = kind;
    atomic_store(&n_layer_classes, i + 1);
    return c;
}

id agx_model_debug_wrap_device(id device) {
    if (!device || !agx_model_debug_layer_enabled()) return device;
    pthread_mutex_lock(&mu);
    if (!the_wrapper_device) {
        Class c = wrapper_class_for(object_getClass(device), K_DEVICE);
        if (c) the_wrapper_device = make_wrapper(c, K_DEVICE, device, NULL);
    }
    id w = the_wrapper_device;
    pthread_mutex_unlock(&mu);
    return w ? w : device;
}
