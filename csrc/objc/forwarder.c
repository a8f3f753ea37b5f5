/* forwarder.c: the general forwarder (see forwarder.h). A type encoding is
 * read into libffi types; one closure per hooked method runs the engine's
 * entry path (swizzle_hook.h) around an ffi_call of the original. */
#include "forwarder.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fwd_tramp.h"
#include "swizzle_hook.h"
#include "swizzle_shapes.h"

#if AGX_HAVE_FFI
#if defined(__APPLE__)
#include <ffi/ffi.h> /* the SDK's copy (/usr/lib/libffi.dylib) */
#else
#include <ffi.h>
#endif

/* At most this many arguments, self and _cmd included (Metal's longest
 * selectors take 11). */
#define AGX_FWD_MAX_ARGS 64

/* One signature: the description libffi calls with, the types it points to
 * (structs are built here and owned by their signature) and the closure. */
typedef struct agx_fwd {
    ffi_cif cif;
    ffi_type *ret;
    ffi_type *args[AGX_FWD_MAX_ARGS];
    int nargs;
    int ret_bits; /* 1: the observer sees the return's integer bits (objects from factories) */
    struct agx_hook_slot *slot; /* a hook's, or NULL for a redirect */
    void *(*redirect)(void *self); /* a redirect's: the object that gets the message instead */
    ffi_closure *closure;
    uint64_t stack_bytes; /* the trampoline's: stack argument bytes to pass on (an upper bound) */
    uint64_t x87;         /* the trampoline's: 1 when the return comes on the x87 stack */
    void **owned; /* the struct types and element lists built for this signature */
    size_t n_owned, cap_owned;
} agx_fwd;

static void *fwd_own(agx_fwd *g, size_t size) {
    if (g->n_owned == g->cap_owned) {
        size_t cap = g->cap_owned ? g->cap_owned * 2 : 8;
        void **o = realloc(g->owned, cap * sizeof *o);
        if (!o) return NULL;
        g->owned = o;
        g->cap_owned = cap;
    }
    void *p = calloc(1, size);
    if (p) g->owned[g->n_owned++] = p;
    return p;
}

static void fwd_free(agx_fwd *g) {
    for (size_t i = 0; i < g->n_owned; i++) free(g->owned[i]);
    free(g->owned);
    if (g->closure) ffi_closure_free(g->closure);
    free(g);
}

/* A growing list of struct members (NULL-terminated when done). */
typedef struct fwd_list {
    ffi_type **v;
    size_t n, cap;
} fwd_list;

#define AGX_FWD_MAX_MEMBERS 4096 /* scalar members of one struct, arrays expanded */

static int fwd_push(fwd_list *l, ffi_type *t) {
    if (l->n >= AGX_FWD_MAX_MEMBERS) return -1;
    if (l->n + 1 >= l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        ffi_type **v = realloc(l->v, cap * sizeof *v);
        if (!v) return -1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = t;
    l->v[l->n] = NULL;
    return 0;
}

static ffi_type *fwd_scalar(char c) {
    switch (c) {
    case 'c': return &ffi_type_sint8;
    case 'C': case 'B': return &ffi_type_uint8;
    case 's': return &ffi_type_sint16;
    case 'S': return &ffi_type_uint16;
    case 'i': return &ffi_type_sint32;
    case 'I': return &ffi_type_uint32;
    case 'l': return AGX_ENC_LONG_SIZE == 8 ? &ffi_type_sint64 : &ffi_type_sint32;
    case 'L': return AGX_ENC_LONG_SIZE == 8 ? &ffi_type_uint64 : &ffi_type_uint32;
    case 'q': return &ffi_type_sint64;
    case 'Q': return &ffi_type_uint64;
    case 'f': return &ffi_type_float;
    case 'd': return &ffi_type_double;
    case 'D': return &ffi_type_longdouble;
    case '@': case '#': case ':': case '*': case '^': return &ffi_type_pointer;
    default: return NULL;
    }
}

static int fwd_members(agx_fwd *g, fwd_list *out, const char **pp, int depth, const char **why);

/* One struct at *pp ('{'): a libffi struct type owned by g. */
static ffi_type *fwd_struct(agx_fwd *g, const char **pp, int depth, const char **why) {
    if (depth > AGX_TYPE_MAX_DEPTH) {
        *why = "structs nested deeper than " AGX_STR(AGX_TYPE_MAX_DEPTH);
        return NULL;
    }
    const char *p = *pp + 1;
    while (*p && *p != '=' && *p != '}') p++;
    if (*p != '=') {
        *why = "an opaque struct (the encoding has no fields, so its layout is unknown)";
        return NULL;
    }
    p++;
    fwd_list l = {0};
    while (*p && *p != '}') {
        if (*p == '"') { /* a field name */
            const char *q = strchr(p + 1, '"');
            if (!q) break;
            p = q + 1;
            continue;
        }
        if (fwd_members(g, &l, &p, depth, why) < 0) {
            free(l.v);
            return NULL;
        }
    }
    if (*p != '}') {
        free(l.v);
        *why = "a malformed struct";
        return NULL;
    }
    if (!l.n) {
        free(l.v);
        *why = "an empty struct";
        return NULL;
    }
    ffi_type *t = fwd_own(g, sizeof *t);
    ffi_type **elems = t ? fwd_own(g, (l.n + 1) * sizeof *elems) : NULL;
    if (!elems) {
        free(l.v);
        *why = "out of memory";
        return NULL;
    }
    memcpy(elems, l.v, (l.n + 1) * sizeof *elems);
    free(l.v);
    t->size = 0;
    t->alignment = 0;
    t->type = FFI_TYPE_STRUCT;
    t->elements = elems;
    *pp = p + 1;
    return t;
}

/* One member of a struct at *pp, appended to out: a scalar, a struct, or an
 * array (its element repeated: the layout and the classification C gives it). */
static int fwd_members(agx_fwd *g, fwd_list *out, const char **pp, int depth, const char **why) {
    const char *p = agx_skip_qualifiers(*pp);
    if (depth > AGX_TYPE_MAX_DEPTH) {
        *why = "types nested deeper than " AGX_STR(AGX_TYPE_MAX_DEPTH);
        return -1;
    }
    if (*p == '[') {
        char *end;
        unsigned long n = strtoul(p + 1, &end, 10);
        if (end == p + 1 || n > 4096) {
            *why = "an array with no or too large a count";
            return -1;
        }
        if (n == 0) {
            *why = "an array of zero elements";
            return -1;
        }
        fwd_list one = {0}; /* the element: one type, or several when it is an array itself */
        const char *q = end;
        if (fwd_members(g, &one, &q, depth + 1, why) < 0 || *q != ']') {
            free(one.v);
            if (!*why) *why = "a malformed array";
            return -1;
        }
        for (unsigned long i = 0; i < n; i++)
            for (size_t j = 0; j < one.n; j++)
                if (fwd_push(out, one.v[j]) < 0) {
                    free(one.v);
                    *why = "a struct of more than 4096 members, or out of memory";
                    return -1;
                }
        free(one.v);
        *pp = q + 1;
        return 0;
    }
    ffi_type *t = NULL;
    if (*p == '{') {
        t = fwd_struct(g, &p, depth + 1, why);
        if (!t) return -1;
    } else {
        if (*p == '(') { *why = "a union (libffi cannot pass one exactly)"; return -1; }
        if (*p == 'b') { *why = "a bit-field"; return -1; }
        if (*p == 'j') { *why = "a _Complex value"; return -1; }
        t = fwd_scalar(*p);
        if (!t) { *why = "an unknown type code"; return -1; }
        const char *next = agx_skip_type(p);
        if (!next) { *why = "a malformed type"; return -1; }
        p = next;
    }
    if (fwd_push(out, t) < 0) { *why = "out of memory"; return -1; }
    *pp = p;
    return 0;
}

/* One top-level type (the return or an argument). */
static ffi_type *fwd_top(agx_fwd *g, const char **pp, int is_return, const char **why) {
    const char *p = agx_skip_qualifiers(*pp);
    ffi_type *t;
    if (*p == 'v') {
        if (!is_return) { *why = "a void argument"; return NULL; }
        t = &ffi_type_void;
        p++;
    } else if (*p == '[') {
        *why = "an array argument (the encoding does not say how it is passed)";
        return NULL;
    } else if (*p == '{') {
        t = fwd_struct(g, &p, 1, why);
        if (!t) return NULL;
    } else {
        fwd_list one = {0};
        int rc = fwd_members(g, &one, &p, 0, why);
        t = rc == 0 ? one.v[0] : NULL;
        free(one.v);
        if (!t) return NULL;
    }
    *pp = agx_skip_offset(p);
    return t;
}

/* Parse `types` into g (not yet prepared); 0 or -1 with why. */
static int fwd_parse(agx_fwd *g, const char *types, char *desc, size_t desclen, const char **why) {
    if (!types || !*types) { *why = "no type encoding"; return -1; }
    const char *p = types;
    size_t dl = 0;
    if (desc && desclen) dl = (size_t)snprintf(desc, desclen, "ffi ");
    const char *at = agx_skip_qualifiers(p);
    g->ret = fwd_top(g, &p, 1, why);
    if (!g->ret) return -1;
    int rt = g->ret->type;
    g->ret_bits = rt == FFI_TYPE_POINTER || (rt >= FFI_TYPE_UINT8 && rt <= FFI_TYPE_SINT64);
    for (;;) {
        /* the description: each type without its frame offset */
        if (desc && dl < desclen) {
            const char *end = p;
            while (end > at && ((end[-1] >= '0' && end[-1] <= '9') || end[-1] == '-' || end[-1] == '+')) end--;
            dl += (size_t)snprintf(desc + dl, desclen - dl, "%.*s", (int)(end - at), at);
        }
        if (!*p) break;
        if (g->nargs == AGX_FWD_MAX_ARGS) { *why = "more than 64 arguments"; return -1; }
        at = agx_skip_qualifiers(p);
        ffi_type *t = fwd_top(g, &p, 0, why);
        if (!t) return -1;
        g->args[g->nargs++] = t;
    }
    if (g->nargs < 2 || g->args[0] != &ffi_type_pointer || g->args[1] != &ffi_type_pointer) {
        *why = "the first two arguments are not self and _cmd";
        return -1;
    }
    if (ffi_prep_cif(&g->cif, FFI_DEFAULT_ABI, (unsigned)g->nargs, g->ret, g->args) != FFI_OK) {
        *why = "libffi cannot prepare a call of this signature";
        return -1;
    }
    return 0;
}

/* The closure: the same entry and exit as every typed wrapper. */
static void fwd_call(ffi_cif *cif, void *ret, void **args, void *user) {
    agx_fwd *g = user;
    id self = *(id *)args[0];
    IMP orig;
    int kind;
    agx_entry e;
    int in = agx_hook_enter(g->slot, self, &orig, &kind, &e);
    if (kind) agx_hook_event(kind, AGX_SWZ_BEFORE, self, 0);
    ffi_call(cif, FFI_FN(orig), ret, args);
    if (kind) {
        uint64_t bits = 0;
        if (g->ret_bits) bits = g->ret->size == 8 ? *(uint64_t *)ret : (uint64_t) * (ffi_arg *)ret;
        agx_hook_event(kind, AGX_SWZ_AFTER, self, bits);
    }
    agx_hook_exit(in, &e);
}

/* A redirect: the same message, sent to redirect(self) (a wrapper layer). */
static void fwd_redirect(ffi_cif *cif, void *ret, void **args, void *user) {
    agx_fwd *g = user;
    id to = (id)g->redirect(*(void **)args[0]);
    SEL sel = *(SEL *)args[1];
    void *argv[AGX_FWD_MAX_ARGS];
    memcpy(argv, args, (size_t)g->nargs * sizeof *argv);
    argv[0] = &to;
    ffi_call(cif, FFI_FN(agx_objc_lookup(to, sel)), ret, argv);
}

#if AGX_FWD_TRAMP
/* The trampoline (fwd_tramp.h): stub i forwards through agx_fwd_by_stub[i]. */
static agx_fwd *_Atomic agx_fwd_by_stub[AGX_FWD_STUBS];
static _Atomic int agx_fwd_stubs_used;

/* Whether ty is returned on the x87 stack (x86-64 System V: a long double, or
 * a struct of 16 bytes whose only member, nested or not, is one long double). */
static int fwd_x87_return(const ffi_type *t) {
#if defined(__x86_64__) && !defined(_WIN32)
    while (t->type == FFI_TYPE_STRUCT && t->size == 16 && t->elements[0] && !t->elements[1]) t = t->elements[0];
    return t->type == FFI_TYPE_LONGDOUBLE && t->size == 16;
#else
    (void)t;
    return 0;
#endif
}

/* An upper bound of the bytes g's arguments can take on the stack, rounded up
 * to 16 (fwd_tramp.h): self and _cmd always travel in registers; every other
 * argument takes at most its size rounded up to 8, plus 8 of padding when it
 * is aligned to more than 8. */
static uint64_t fwd_stack_bound(const agx_fwd *g) {
    uint64_t n = 0;
    for (int i = 2; i < g->nargs; i++) {
        const ffi_type *t = g->args[i];
        n += (t->size + 7) & ~(uint64_t)7;
        if (t->alignment > 8) n += 8;
    }
    return (n + 15) & ~(uint64_t)15;
}

/* A stub for g, or NULL (then g gets a libffi closure). */
static IMP fwd_tramp_make(agx_fwd *g) {
    g->stack_bytes = fwd_stack_bound(g);
    if (g->stack_bytes > AGX_FWD_TRAMP_MAX_STACK) return NULL;
    g->x87 = (uint64_t)fwd_x87_return(g->ret);
    int i = atomic_fetch_add(&agx_fwd_stubs_used, 1);
    if (i >= AGX_FWD_STUBS) return NULL;
    /* published before the stub becomes anyone's implementation */
    atomic_store_explicit(&agx_fwd_by_stub[i], g, memory_order_release);
    return (IMP)(uintptr_t)(agx_fwd_stubs + (size_t)i * AGX_FWD_STUB_SIZE);
}

void agx_fwd_enter(agx_fwd_call *c, uintptr_t stub, void *self) {
    size_t i = (size_t)(stub - (uintptr_t)agx_fwd_stubs) / AGX_FWD_STUB_SIZE;
    agx_fwd *g = atomic_load_explicit(&agx_fwd_by_stub[i], memory_order_acquire);
    IMP orig;
    c->fwd = g;
    c->self = self;
    c->stack_bytes = g->stack_bytes;
    c->x87 = g->x87;
    c->in = agx_hook_enter(g->slot, (id)self, &orig, &c->kind, &c->e);
    c->orig = (void *)orig;
    if (c->kind) agx_hook_event(c->kind, AGX_SWZ_BEFORE, (id)self, 0);
}

void agx_fwd_exit(agx_fwd_call *c) {
    if (c->kind) {
        agx_fwd *g = c->fwd;
        uint64_t bits = 0;
        if (g->ret_bits) {
            bits = c->ret[0];
            if (g->ret->size < 8) bits &= (UINT64_C(1) << (8 * g->ret->size)) - 1;
        }
        agx_hook_event(c->kind, AGX_SWZ_AFTER, (id)c->self, bits);
    }
    agx_hook_exit(c->in, &c->e);
}
#endif

/* How hooked methods are forwarded, from AGXGUARD_FORWARDER (read at each
 * install, for comparing the two): 1 the trampoline where there is one (unset,
 * empty or "trampoline"), 0 libffi's closure ("libffi"), -1 another value. */
static int fwd_path(void) {
    const char *v = getenv("AGXGUARD_FORWARDER");
    if (!v || !*v || !strcmp(v, "trampoline")) return 1;
    return strcmp(v, "libffi") == 0 ? 0 : -1;
}

int agx_forwarder_available(void) { return 1; }

int agx_forwarder_check(const char *types, char *why, size_t whylen) {
    agx_fwd *g = calloc(1, sizeof *g);
    if (!g) { snprintf(why, whylen, "out of memory"); return -1; }
    const char *w = NULL;
    int rc = fwd_parse(g, types, NULL, 0, &w);
    if (rc < 0) snprintf(why, whylen, "%s", w ? w : "cannot be described");
    fwd_free(g);
    return rc;
}

static IMP fwd_make(struct agx_hook_slot *slot, void *(*redirect)(void *), const char *types, char *desc,
                    size_t desclen, char *why, size_t whylen) {
    agx_fwd *g = calloc(1, sizeof *g);
    if (!g) { snprintf(why, whylen, "out of memory"); return NULL; }
    const char *w = NULL;
    if (fwd_parse(g, types, desc, desclen, &w) < 0) {
        snprintf(why, whylen, "%s", w ? w : "cannot be described");
        fwd_free(g);
        return NULL;
    }
    void *code = NULL;
    g->slot = slot;
    g->redirect = redirect;
    int path = slot ? fwd_path() : 0;
    if (path < 0) {
        snprintf(why, whylen, "AGXGUARD_FORWARDER=%.40s is not one of trampoline, libffi (unset: trampoline)",
                 getenv("AGXGUARD_FORWARDER"));
        fwd_free(g);
        return NULL;
    }
#if AGX_FWD_TRAMP
    if (path == 1) {
        IMP stub = fwd_tramp_make(g);
        if (stub) return stub; /* g lives as long as the process, like the slot */
    }
#endif
    g->closure = ffi_closure_alloc(sizeof(ffi_closure), &code);
    if (!g->closure || ffi_prep_closure_loc(g->closure, &g->cif, slot ? fwd_call : fwd_redirect, g, code) != FFI_OK) {
        snprintf(why, whylen, "libffi could not make a closure");
        fwd_free(g);
        return NULL;
    }
    return (IMP)code; /* g lives as long as the process, like the slot */
}

IMP agx_forwarder_make(struct agx_hook_slot *slot, const char *types, char *desc, size_t desclen, char *why,
                       size_t whylen) {
    return fwd_make(slot, NULL, types, desc, desclen, why, whylen);
}

IMP agx_forwarder_make_redirect(void *(*redirect)(void *self), const char *types, char *why, size_t whylen) {
    return fwd_make(NULL, redirect, types, NULL, 0, why, whylen);
}

#else /* no libffi in this build */

int agx_forwarder_available(void) { return 0; }

int agx_forwarder_check(const char *types, char *why, size_t whylen) {
    (void)types;
    snprintf(why, whylen, "no typed wrapper, and this build has no general forwarder (built without libffi)");
    return -1;
}

IMP agx_forwarder_make(struct agx_hook_slot *slot, const char *types, char *desc, size_t desclen, char *why,
                       size_t whylen) {
    (void)slot, (void)desc, (void)desclen;
    agx_forwarder_check(types, why, whylen);
    return NULL;
}

IMP agx_forwarder_make_redirect(void *(*redirect)(void *self), const char *types, char *why, size_t whylen) {
    (void)redirect;
    agx_forwarder_check(types, why, whylen);
    return NULL;
}

#endif
