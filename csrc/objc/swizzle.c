/* swizzle.c: the swizzle engine (see swizzle.h). Wrappers come from the shape
 * list in swizzle_shapes.h; a method's type encoding is reduced to a shape key
 * here, and a hook binds one free wrapper slot of that shape to the method. */
#include "swizzle.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acquire.h"
#include "guard.h"
#include "forwarder.h"
#include "swizzle_hook.h"
#include "swizzle_shapes.h"

/* ------------------------------------------------------------------ slots */
/* The slot and the entry/exit path every wrapper takes live in
 * swizzle_hook.h, shared with the general forwarder (forwarder.c). */

_Atomic uintptr_t agx_swizzle_observer_fn;

void agx_swizzle_set_observer(agx_swizzle_observer fn) {
    atomic_store_explicit(&agx_swizzle_observer_fn, (uintptr_t)fn, memory_order_release);
}

/* The bits of a return value the observer sees (object returns of factories). */
#define AGX_RBITS_u64(r) ((uint64_t)(r))
#define AGX_RBITS_f32(r) 0
#define AGX_RBITS_f64(r) 0
#define AGX_RBITS_q2(r) 0
#define AGX_RBITS_q3(r) 0
#define AGX_RBITS_q4(r) 0
#define AGX_RBITS_q6(r) 0
#define AGX_RBITS_d2(r) 0
#define AGX_RBITS_d4(r) 0

#define AGX_RK_v V
#define AGX_RK_u64 VAL
#define AGX_RK_f32 VAL
#define AGX_RK_f64 VAL
#define AGX_RK_q2 VAL
#define AGX_RK_q3 VAL
#define AGX_RK_q4 VAL
#define AGX_RK_q6 VAL
#define AGX_RK_d2 VAL
#define AGX_RK_d4 VAL

#define AGX_WRAP_V(name, RTOK, N, ARGS, k)                                                    \
    static void agx_w_##name##_##k(id self, SEL cmd AGX_CAT(AGX_P, N) ARGS) {                 \
        IMP o;                                                                                \
        int kind;                                                                             \
        agx_entry e;                                                                          \
        int in = agx_hook_enter(&agx_slots_##name[k], self, &o, &kind, &e);                   \
        if (kind) agx_hook_event(kind, AGX_SWZ_BEFORE, self, 0);                              \
        ((void (*)(id, SEL AGX_CAT(AGX_T, N) ARGS))o)(self, cmd AGX_CAT(AGX_A, N) ARGS);      \
        if (kind) agx_hook_event(kind, AGX_SWZ_AFTER, self, 0);                               \
        agx_hook_exit(in, &e);                                                                \
    }
#define AGX_WRAP_VAL(name, RTOK, N, ARGS, k)                                                  \
    static agx_t_##RTOK agx_w_##name##_##k(id self, SEL cmd AGX_CAT(AGX_P, N) ARGS) {         \
        IMP o;                                                                                \
        int kind;                                                                             \
        agx_entry e;                                                                          \
        int in = agx_hook_enter(&agx_slots_##name[k], self, &o, &kind, &e);                   \
        if (kind) agx_hook_event(kind, AGX_SWZ_BEFORE, self, 0);                              \
        agx_t_##RTOK r = ((agx_t_##RTOK(*)(id, SEL AGX_CAT(AGX_T, N) ARGS))o)(                \
            self, cmd AGX_CAT(AGX_A, N) ARGS);                                                \
        if (kind) agx_hook_event(kind, AGX_SWZ_AFTER, self, AGX_RBITS_##RTOK(r));             \
        agx_hook_exit(in, &e);                                                                \
        return r;                                                                             \
    }
#define AGX_WRAP_ONE(name, RTOK, N, ARGS, k) AGX_CAT(AGX_WRAP_, AGX_RK_##RTOK)(name, RTOK, N, ARGS, k)
#define AGX_WRAP_PTR(name, k) (IMP) agx_w_##name##_##k,

#define AGX_DEFINE_SHAPE_WRAPPERS(name, RTOK, N, ARGS)                   \
    static agx_hook_slot agx_slots_##name[AGX_HOOK_SLOTS];              \
    AGX_REPEAT_SLOTS(AGX_WRAP_ONE, name, RTOK, N, ARGS)                 \
    static const IMP agx_wrappers_##name[AGX_HOOK_SLOTS] = {AGX_REPEAT_SLOTS(AGX_WRAP_PTR, name)};
AGX_SHAPES(AGX_DEFINE_SHAPE_WRAPPERS)

/* ------------------------------------------------------------- probes */
/* Each shape also gets a probe method (records a digest of its arguments and
 * returns a value made from it) and a caller that checks both, bit for bit. */

static _Thread_local uint64_t agx_probe_seen AGX_TLS_HOT;

static inline uint64_t agx_mix(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h * 31 + n;
}
#define AGX_H(x) h = agx_mix(h, &(x), sizeof(x));

static agx_t_u64 agx_mk_u64(uint64_t s) { return s * 0x9E3779B97F4A7C15ull + 0x1234; }
static agx_t_f32 agx_mk_f32(uint64_t s) { return (float)(s % 100000) * 0.25f + 1.5f; }
static agx_t_f64 agx_mk_f64(uint64_t s) { return (double)(s % 1000000007) * 0.125 - 3.75; }
static agx_t_q2 agx_mk_q2(uint64_t s) { agx_t_q2 r; for (int i = 0; i < 2; i++) r.v[i] = agx_mk_u64(s + i); return r; }
static agx_t_q3 agx_mk_q3(uint64_t s) { agx_t_q3 r; for (int i = 0; i < 3; i++) r.v[i] = agx_mk_u64(s + i); return r; }
static agx_t_q4 agx_mk_q4(uint64_t s) { agx_t_q4 r; for (int i = 0; i < 4; i++) r.v[i] = agx_mk_u64(s + i); return r; }
static agx_t_q6 agx_mk_q6(uint64_t s) { agx_t_q6 r; for (int i = 0; i < 6; i++) r.v[i] = agx_mk_u64(s + i); return r; }
static agx_t_d2 agx_mk_d2(uint64_t s) { agx_t_d2 r; for (int i = 0; i < 2; i++) r.v[i] = agx_mk_f64(s + i); return r; }
static agx_t_d4 agx_mk_d4(uint64_t s) { agx_t_d4 r; for (int i = 0; i < 4; i++) r.v[i] = agx_mk_f64(s + i); return r; }

#define AGX_HA0()
#define AGX_HA1(a) AGX_H(a1)
#define AGX_HA2(a, b) AGX_HA1(a) AGX_H(a2)
#define AGX_HA3(a, b, c) AGX_HA2(a, b) AGX_H(a3)
#define AGX_HA4(a, b, c, d) AGX_HA3(a, b, c) AGX_H(a4)
#define AGX_HA5(a, b, c, d, e) AGX_HA4(a, b, c, d) AGX_H(a5)
#define AGX_HA6(a, b, c, d, e, f) AGX_HA5(a, b, c, d, e) AGX_H(a6)
#define AGX_HA7(a, b, c, d, e, f, g) AGX_HA6(a, b, c, d, e, f) AGX_H(a7)
#define AGX_HA8(a, b, c, d, e, f, g, h_) AGX_HA7(a, b, c, d, e, f, g) AGX_H(a8)
#define AGX_HA9(a, b, c, d, e, f, g, h_, i) AGX_HA8(a, b, c, d, e, f, g, h_) AGX_H(a9)
#define AGX_HA10(a, b, c, d, e, f, g, h_, i, j) AGX_HA9(a, b, c, d, e, f, g, h_, i) AGX_H(a10)

#define AGX_MK0()
#define AGX_MK1(a) agx_t_##a a1 = agx_mk_##a(101);
#define AGX_MK2(a, b) AGX_MK1(a) agx_t_##b a2 = agx_mk_##b(202);
#define AGX_MK3(a, b, c) AGX_MK2(a, b) agx_t_##c a3 = agx_mk_##c(303);
#define AGX_MK4(a, b, c, d) AGX_MK3(a, b, c) agx_t_##d a4 = agx_mk_##d(404);
#define AGX_MK5(a, b, c, d, e) AGX_MK4(a, b, c, d) agx_t_##e a5 = agx_mk_##e(505);
#define AGX_MK6(a, b, c, d, e, f) AGX_MK5(a, b, c, d, e) agx_t_##f a6 = agx_mk_##f(606);
#define AGX_MK7(a, b, c, d, e, f, g) AGX_MK6(a, b, c, d, e, f) agx_t_##g a7 = agx_mk_##g(707);
#define AGX_MK8(a, b, c, d, e, f, g, h_) AGX_MK7(a, b, c, d, e, f, g) agx_t_##h_ a8 = agx_mk_##h_(808);
#define AGX_MK9(a, b, c, d, e, f, g, h_, i) AGX_MK8(a, b, c, d, e, f, g, h_) agx_t_##i a9 = agx_mk_##i(909);
#define AGX_MK10(a, b, c, d, e, f, g, h_, i, j) AGX_MK9(a, b, c, d, e, f, g, h_, i) agx_t_##j a10 = agx_mk_##j(1010);

#define AGX_PROBE_V(name, RTOK, N, ARGS)                                                       \
    static void agx_probe_##name(id self, SEL cmd AGX_CAT(AGX_P, N) ARGS) {                   \
        uint64_t h = 14695981039346656037ull;                                                 \
        AGX_CAT(AGX_HA, N) ARGS agx_probe_seen = h;                                           \
    }                                                                                         \
    static int agx_probe_call_##name(IMP imp, id obj, SEL sel) {                              \
        AGX_CAT(AGX_MK, N) ARGS uint64_t h = 14695981039346656037ull;                         \
        AGX_CAT(AGX_HA, N) ARGS agx_probe_seen = 0;                                           \
        ((void (*)(id, SEL AGX_CAT(AGX_T, N) ARGS))imp)(obj, sel AGX_CAT(AGX_A, N) ARGS);     \
        return agx_probe_seen == h ? 0 : 1;                                                   \
    }
#define AGX_PROBE_VAL(name, RTOK, N, ARGS)                                                     \
    static agx_t_##RTOK agx_probe_##name(id self, SEL cmd AGX_CAT(AGX_P, N) ARGS) {           \
        uint64_t h = 14695981039346656037ull;                                                 \
        AGX_CAT(AGX_HA, N) ARGS agx_probe_seen = h;                                           \
        return agx_mk_##RTOK(h);                                                              \
    }                                                                                         \
    static int agx_probe_call_##name(IMP imp, id obj, SEL sel) {                              \
        AGX_CAT(AGX_MK, N) ARGS uint64_t h = 14695981039346656037ull;                         \
        AGX_CAT(AGX_HA, N) ARGS agx_probe_seen = 0;                                           \
        agx_t_##RTOK r = ((agx_t_##RTOK(*)(id, SEL AGX_CAT(AGX_T, N) ARGS))imp)(              \
            obj, sel AGX_CAT(AGX_A, N) ARGS);                                                 \
        agx_t_##RTOK want = agx_mk_##RTOK(h);                                                 \
        if (agx_probe_seen != h) return 1;                                                    \
        return memcmp(&r, &want, sizeof r) == 0 ? 0 : 2;                                      \
    }
#define AGX_DEFINE_PROBE(name, RTOK, N, ARGS) AGX_CAT(AGX_PROBE_, AGX_RK_##RTOK)(name, RTOK, N, ARGS)
AGX_SHAPES(AGX_DEFINE_PROBE)

/* Objective-C type encodings of the canonical types, for the probe methods. */
#define AGX_ENC_v "v"
#define AGX_ENC_u64 "Q"
#define AGX_ENC_f32 "f"
#define AGX_ENC_f64 "d"
#define AGX_ENC_q2 "{_NSRange=QQ}"
#define AGX_ENC_q3 "{MTLSize=QQQ}"
#define AGX_ENC_q4 "{AGXQuad=QQQQ}"
#define AGX_ENC_q6 "{MTLRegion={MTLOrigin=QQQ}{MTLSize=QQQ}}"
#define AGX_ENC_d2 "{CGPoint=dd}"
#define AGX_ENC_d4 "{MTLClearColor=dddd}"
#define AGX_E0() ""
#define AGX_E1(a) AGX_ENC_##a
#define AGX_E2(a, b) AGX_E1(a) AGX_ENC_##b
#define AGX_E3(a, b, c) AGX_E2(a, b) AGX_ENC_##c
#define AGX_E4(a, b, c, d) AGX_E3(a, b, c) AGX_ENC_##d
#define AGX_E5(a, b, c, d, e) AGX_E4(a, b, c, d) AGX_ENC_##e
#define AGX_E6(a, b, c, d, e, f) AGX_E5(a, b, c, d, e) AGX_ENC_##f
#define AGX_E7(a, b, c, d, e, f, g) AGX_E6(a, b, c, d, e, f) AGX_ENC_##g
#define AGX_E8(a, b, c, d, e, f, g, h) AGX_E7(a, b, c, d, e, f, g) AGX_ENC_##h
#define AGX_E9(a, b, c, d, e, f, g, h, i) AGX_E8(a, b, c, d, e, f, g, h) AGX_ENC_##i
#define AGX_E10(a, b, c, d, e, f, g, h, i, j) AGX_E9(a, b, c, d, e, f, g, h, i) AGX_ENC_##j

typedef struct agx_shape {
    const char *key;        /* "v(q3,q3)" */
    const char *name;       /* "v_q3q3" */
    const char *probe_types;
    agx_hook_slot *slots;
    const IMP *wrappers;
    IMP probe;
    int (*probe_call)(IMP, id, SEL);
} agx_shape;

#define AGX_SHAPE_ROW(name, RTOK, N, ARGS)                                                   \
    {AGX_STR(RTOK) AGX_STR(ARGS), #name, AGX_ENC_##RTOK "@:" AGX_CAT(AGX_E, N) ARGS,        \
     agx_slots_##name, agx_wrappers_##name, (IMP)agx_probe_##name, agx_probe_call_##name},
static const agx_shape agx_shapes[] = {AGX_SHAPES(AGX_SHAPE_ROW)};
#define AGX_NSHAPES (sizeof agx_shapes / sizeof agx_shapes[0])

/* ------------------------------------------------------ type encodings */

const char *agx_skip_offset(const char *p) {
    while (*p == '+' || *p == '-' || (*p >= '0' && *p <= '9')) p++;
    return p;
}

const char *agx_skip_qualifiers(const char *p) {
    while (*p && strchr("rnNoORVA", *p)) p++;
    return p;
}

/* Skips one complete type; NULL on malformed input. Iterative (a pointer chain is
 * a loop, an aggregate a bracket count), so no input can exhaust the stack. */
const char *agx_skip_type(const char *p) {
    p = agx_skip_qualifiers(p);
    while (*p == '^') p = agx_skip_qualifiers(p + 1); /* a pointer: skip what it points to */
    switch (*p) {
    case 0: return NULL;
    case '@':
        p++;
        if (*p == '?') return p + 1;
        if (*p == '"') { const char *q = strchr(p + 1, '"'); return q ? q + 1 : NULL; }
        return p;
    case 'b': p++; while (*p >= '0' && *p <= '9') p++; return p;
    case '{': case '(': case '[': {
        char open = *p, close = open == '{' ? '}' : open == '(' ? ')' : ']';
        int depth = 0;
        for (; *p; p++) {
            if (*p == open) depth++;
            else if (*p == close && --depth == 0) return p + 1;
        }
        return NULL;
    }
    default: return p + 1;
    }
}

/* Size of a scalar type code; 0 if not an integer/pointer scalar. */
static int agx_int_size(char c) {
    switch (c) {
    case 'c': case 'C': case 'B': return 1;
    case 's': case 'S': return 2;
    case 'i': case 'I': return 4;
    case 'l': case 'L': return AGX_ENC_LONG_SIZE;
    case 'q': case 'Q': case '*': case '#': case ':': case '^': case '@': return 8;
    default: return 0;
    }
}

/* Flattens struct fields: counts 64-bit integer words and doubles; anything
 * else makes *other nonzero. Returns the position after '}' or NULL. Structs
 * nested deeper than AGX_TYPE_MAX_DEPTH give NULL with *too_deep set (the
 * recursion is bounded whatever the input). */
static const char *agx_struct_fields(const char *p, int depth, int *words, int *doubles, int *other,
                                     int *too_deep) {
    /* p at '{' */
    if (depth > AGX_TYPE_MAX_DEPTH) {
        *too_deep = 1;
        return NULL;
    }
    p++;
    while (*p && *p != '=' && *p != '}') p++;
    if (*p != '=') return NULL; /* opaque struct: layout unknown */
    p++;
    while (*p && *p != '}') {
        if (*p == '"') { const char *q = strchr(p + 1, '"'); if (!q) return NULL; p = q + 1; continue; }
        p = agx_skip_qualifiers(p);
        if (*p == '{') {
            p = agx_struct_fields(p, depth + 1, words, doubles, other, too_deep);
            if (!p) return NULL;
            continue;
        }
        const char *next = agx_skip_type(p);
        if (!next) return NULL;
        if (*p == 'd') (*doubles)++;
        else if (agx_int_size(*p) == 8) (*words)++;
        else (*other)++;
        p = next;
    }
    return *p == '}' ? p + 1 : NULL;
}

/* One type -> canonical token, or NULL with *why set. */
static const char *agx_canonical(const char **pp, int is_return, int *narrow, const char **why) {
    const char *p = agx_skip_qualifiers(*pp);
    const char *next = agx_skip_type(p);
    if (!next) { *why = "malformed type encoding"; return NULL; }
    *narrow = 0;
    const char *tok = NULL;
    if (*p == 'v') {
        if (is_return) tok = "v"; else *why = "void argument";
    } else if (*p == 'f') {
        tok = "f32";
    } else if (*p == 'd') {
        tok = "f64";
    } else if (*p == '{') {
        int w = 0, d = 0, o = 0, too_deep = 0;
        if (!agx_struct_fields(p, 1, &w, &d, &o, &too_deep)) {
            *why = too_deep ? "structs nested deeper than " AGX_STR(AGX_TYPE_MAX_DEPTH) : "opaque or malformed struct";
            return NULL;
        }
        if (o == 0 && d == 0 && (w == 2 || w == 3 || w == 4 || w == 6))
            tok = w == 2 ? "q2" : w == 3 ? "q3" : w == 4 ? "q4" : "q6";
        else if (o == 0 && w == 0 && (d == 2 || d == 4))
            tok = d == 2 ? "d2" : "d4";
        else
            *why = "struct layout with no exact wrapper (only 2/3/4/6 x 64-bit integers or 2/4 doubles)";
    } else if (agx_int_size(*p)) {
        tok = "u64";
        *narrow = agx_int_size(*p) < 8;
    } else {
        *why = "type with no exact wrapper (long double, union, array, bit-field or unknown)";
    }
    *pp = agx_skip_offset(next);
    return tok;
}

/* Calling conventions the classifier knows. Only Apple's arm64 packs narrow
 * arguments on the stack (docs/apple-runtime.md); the others are listed so
 * that every rule can be tested on any machine. */
typedef struct agx_abi {
    const char *name;
    int narrow_stack_ok; /* stack slots are 8 bytes: widening a narrow argument is exact */
    int int_regs, fp_regs;
} agx_abi;
static const agx_abi agx_abis[] = {
    {"sysv-x86_64", 1, 6, 8},
    {"aapcs64", 1, 8, 8},
    {"apple-arm64", 0, 8, 8},
};
#if defined(__APPLE__) && defined(__aarch64__)
#define AGX_HOST_ABI 2
#elif defined(__aarch64__)
#define AGX_HOST_ABI 1
#else
#define AGX_HOST_ABI 0
#endif

const char *agx_swizzle_host_abi(void) { return agx_abis[AGX_HOST_ABI].name; }

const char *agx_swizzle_shape_for(const char *types, char *err, size_t errlen) {
    return agx_swizzle_shape_for_abi(types, NULL, err, errlen);
}

const char *agx_swizzle_shape_for_abi(const char *types, const char *abi_name, char *err, size_t errlen) {
    const agx_abi *abi = &agx_abis[AGX_HOST_ABI];
    if (abi_name) {
        abi = NULL;
        for (size_t i = 0; i < sizeof agx_abis / sizeof agx_abis[0]; i++)
            if (!strcmp(agx_abis[i].name, abi_name)) abi = &agx_abis[i];
        if (!abi) {
            snprintf(err, errlen, "unknown ABI '%.40s' (allowed: sysv-x86_64, aapcs64, apple-arm64)", abi_name);
            return NULL;
        }
    }
    char key[256];
    size_t len = 0;
    const char *why = NULL;
    int narrow = 0;
    const char *p = types;
    if (!p) { snprintf(err, errlen, "no type encoding"); return NULL; }
    const char *ret = agx_canonical(&p, 1, &narrow, &why);
    if (!ret) { snprintf(err, errlen, "return: %s", why); return NULL; }
    /* self and _cmd */
    p = agx_skip_qualifiers(p);
    if (*p != '@') { snprintf(err, errlen, "first argument is not an object"); return NULL; }
    p = agx_skip_offset(agx_skip_type(p));
    if (*p != ':') { snprintf(err, errlen, "second argument is not a selector"); return NULL; }
    p = agx_skip_offset(p + 1);
    len += snprintf(key + len, sizeof key - len, "%s(", ret);
    /* Registers used so far, as arm64 counts them (the only ABI with a narrow
     * rule): integers and pointers one each, a 16-byte struct two (or none
     * left: it goes on the stack whole), a larger struct a pointer, a
     * struct of doubles one FP register per member (or none left). */
    int nargs = 0, int_regs = 2, fp_regs = 0;
    while (*p) {
        const char *tok = agx_canonical(&p, 0, &narrow, &why);
        if (!tok) { snprintf(err, errlen, "argument %d: %s", nargs + 1, why); return NULL; }
        int is_f32 = !strcmp(tok, "f32");
        if (!abi->narrow_stack_ok && ((narrow && int_regs >= abi->int_regs) || (is_f32 && fp_regs >= abi->fp_regs))) {
            snprintf(err, errlen, "argument %d: a %s passed on the stack, which %s packs to its natural size",
                     nargs + 1, is_f32 ? "float" : "narrow integer", abi->name);
            return NULL;
        }
        if (!strcmp(tok, "u64")) int_regs++;
        else if (!strcmp(tok, "q2")) int_regs = int_regs + 2 <= abi->int_regs ? int_regs + 2 : abi->int_regs;
        else if (tok[0] == 'q') int_regs++;
        else if (is_f32 || !strcmp(tok, "f64")) fp_regs++;
        else if (tok[0] == 'd') {
            int n = tok[1] - '0';
            fp_regs = fp_regs + n <= abi->fp_regs ? fp_regs + n : abi->fp_regs;
        }
        len += snprintf(key + len, sizeof key - len, "%s%s", nargs ? "," : "", tok);
        if (len >= sizeof key - 8) { snprintf(err, errlen, "too many arguments"); return NULL; }
        nargs++;
    }
    snprintf(key + len, sizeof key - len, ")");
    for (size_t i = 0; i < AGX_NSHAPES; i++)
        if (!strcmp(agx_shapes[i].key, key)) return agx_shapes[i].key;
    snprintf(err, errlen, "no wrapper for shape %s", key);
    return NULL;
}

static const agx_shape *agx_shape_by_key(const char *key) {
    for (size_t i = 0; i < AGX_NSHAPES; i++)
        if (agx_shapes[i].key == key || !strcmp(agx_shapes[i].key, key)) return &agx_shapes[i];
    return NULL;
}

/* ------------------------------------------------------ install / remove */

static pthread_mutex_t agx_swz_mu = PTHREAD_MUTEX_INITIALIZER;

/* Slots of the general forwarder (forwarder.h): made one per hooked method
 * whose shape has no typed wrapper, never freed (a thread may be running
 * one's closure). Published with a release store of the count. */
#define AGX_FWD_SLOTS 1024
static agx_hook_slot *agx_fwd_slots[AGX_FWD_SLOTS];
static _Atomic size_t agx_fwd_n;
static _Atomic int agx_force_forwarder;

void agx_swizzle_force_forwarder(int on) { atomic_store(&agx_force_forwarder, on != 0); }

/* Every slot, typed ones first, then the forwarder's: i < agx_slot_total(). */
#define AGX_TYPED_SLOTS (AGX_NSHAPES * AGX_HOOK_SLOTS)
static size_t agx_slot_total(void) {
    return AGX_TYPED_SLOTS + atomic_load_explicit(&agx_fwd_n, memory_order_acquire);
}
static agx_hook_slot *agx_slot_at(size_t i) {
    if (i < AGX_TYPED_SLOTS) return &agx_shapes[i / AGX_HOOK_SLOTS].slots[i % AGX_HOOK_SLOTS];
    return agx_fwd_slots[i - AGX_TYPED_SLOTS];
}

static agx_hook_slot *agx_find_slot(Class cls, SEL sel) {
    for (size_t i = 0, n = agx_slot_total(); i < n; i++) {
        agx_hook_slot *s = agx_slot_at(i);
        if (s->used && s->cls == cls && sel_isEqual(s->sel, sel)) return s;
    }
    return NULL;
}

static int agx_class_defines(Class cls, SEL sel) {
    unsigned n = 0;
    Method *ms = class_copyMethodList(cls, &n);
    int found = 0;
    for (unsigned i = 0; i < n && !found; i++)
        if (sel_isEqual(method_getName(ms[i]), sel)) found = 1;
    free(ms);
    return found;
}

int agx_swizzle_install(const char *class_name, const char *selector, char *err, size_t errlen) {
    return agx_swizzle_install_kind(class_name, selector, 0, err, errlen);
}

int agx_swizzle_install_kind(const char *class_name, const char *selector, int kind, char *err, size_t errlen) {
    Class cls = objc_getClass(class_name);
    if (!cls) { snprintf(err, errlen, "no Objective-C class named %s", class_name); return AGX_SWZ_ERROR; }
    SEL sel = sel_registerName(selector);
    Method m = class_getInstanceMethod(cls, sel);
    if (!m) {
        snprintf(err, errlen, "-[%s %s]: the class has no such instance method", class_name, selector);
        return AGX_SWZ_ERROR;
    }
    int rc = AGX_SWZ_ERROR;
    agx_objc_prepare_dispatch(cls, sel);
    pthread_mutex_lock(&agx_swz_mu);
    agx_hook_slot *s = agx_find_slot(cls, sel);
    if (s) {
        atomic_store_explicit(&s->kind, kind, memory_order_relaxed);
        if (atomic_load(&s->active)) {
            rc = AGX_SWZ_ALREADY;
        } else {
            if (!s->added) {
                IMP cur = method_getImplementation(m);
                IMP w = s->wrapper;
                if (cur != w) atomic_store_explicit(&s->orig, (uintptr_t)cur, memory_order_release);
                atomic_store_explicit(&s->active, 1, memory_order_release);
                method_setImplementation(m, w);
            } else {
                atomic_store_explicit(&s->active, 1, memory_order_release);
            }
            rc = AGX_SWZ_INSTALLED;
        }
        goto out;
    }
    const char *types = method_getTypeEncoding(m);
    char why[160];
    const char *key = atomic_load(&agx_force_forwarder) ? NULL : agx_swizzle_shape_for(types, why, sizeof why);
    IMP wrapper = NULL;
    if (key) {
        /* the fast path: a typed wrapper of this shape */
        const agx_shape *sh = agx_shape_by_key(key);
        int k = 0;
        while (k < AGX_HOOK_SLOTS && sh->slots[k].used) k++;
        if (k == AGX_HOOK_SLOTS) {
            snprintf(err, errlen, "-[%s %s]: all %d wrapper slots of shape %s are in use",
                     class_name, selector, AGX_HOOK_SLOTS, key);
            goto out;
        }
        s = &sh->slots[k];
        s->shape = sh->key;
        wrapper = sh->wrappers[k];
    } else {
        /* the rest: the general forwarder, described from the encoding */
        size_t n = atomic_load_explicit(&agx_fwd_n, memory_order_relaxed);
        if (n == AGX_FWD_SLOTS) {
            snprintf(err, errlen, "-[%s %s]: all %d forwarder slots are in use", class_name, selector, AGX_FWD_SLOTS);
            goto out;
        }
        s = calloc(1, sizeof *s);
        char desc[256];
        wrapper = s ? agx_forwarder_make(s, types, desc, sizeof desc, why, sizeof why) : NULL;
        if (!wrapper) {
            snprintf(err, errlen,
                     "-[%s %s] has type encoding \"%s\", which the swizzle engine cannot forward exactly: %s",
                     class_name, selector, types ? types : "(none)", s ? why : "out of memory");
            free(s);
            goto out;
        }
        s->shape = strdup(desc);
        agx_fwd_slots[n] = s; /* counted below, once complete */
    }
    s->cls = cls;
    s->super = class_getSuperclass(cls);
    s->sel = sel;
    s->class_name = strdup(class_name);
    s->sel_name = strdup(selector);
    s->wrapper = wrapper;
    s->added = !agx_class_defines(cls, sel);
    atomic_store_explicit(&s->orig, (uintptr_t)method_getImplementation(m), memory_order_release);
    atomic_store_explicit(&s->calls, 0, memory_order_relaxed);
    atomic_store_explicit(&s->kind, kind, memory_order_relaxed);
    atomic_store_explicit(&s->active, 1, memory_order_release);
    s->used = 1;
    if (!key) atomic_store_explicit(&agx_fwd_n, atomic_load(&agx_fwd_n) + 1, memory_order_release);
    /* The slot is complete before any thread can reach the wrapper. */
    if (s->added)
        class_addMethod(cls, sel, wrapper, types);
    else
        method_setImplementation(m, wrapper);
    rc = AGX_SWZ_INSTALLED;
out:
    pthread_mutex_unlock(&agx_swz_mu);
    return rc;
}

int agx_swizzle_uninstall(const char *class_name, const char *selector, char *err, size_t errlen) {
    Class cls = objc_getClass(class_name);
    if (!cls) { snprintf(err, errlen, "no Objective-C class named %s", class_name); return -1; }
    SEL sel = selector ? sel_registerName(selector) : NULL;
    int n = 0;
    pthread_mutex_lock(&agx_swz_mu);
    for (size_t i = 0, total = agx_slot_total(); i < total; i++) {
        agx_hook_slot *s = agx_slot_at(i);
        if (!s->used || s->cls != cls || !atomic_load(&s->active)) continue;
        if (sel && !sel_isEqual(s->sel, sel)) continue;
        atomic_store_explicit(&s->active, 0, memory_order_release);
        if (!s->added) {
            /* Own method: the original implementation goes back exactly.
             * An added override stays but forwards to the superclass
             * untouched (the runtime cannot remove a method). */
            Method m = class_getInstanceMethod(cls, s->sel);
            method_setImplementation(m, (IMP)atomic_load(&s->orig));
        }
        n++;
    }
    pthread_mutex_unlock(&agx_swz_mu);
    return n;
}

int agx_swizzle_install_table(agx_hook_entry *entries, size_t n, char *err, size_t errlen) {
    int installed = 0;
    for (size_t i = 0; i < n; i++) {
        entries[i].result = agx_swizzle_install(entries[i].class_name, entries[i].selector, err, errlen);
        if (entries[i].result == AGX_SWZ_ERROR) return -1;
        if (entries[i].result == AGX_SWZ_INSTALLED) installed++;
    }
    return installed;
}

size_t agx_swizzle_hook_count(void) {
    size_t n = 0;
    for (size_t i = 0, total = agx_slot_total(); i < total; i++) n += agx_slot_at(i)->used != 0;
    return n;
}

int agx_swizzle_hook_info(size_t idx, agx_hook_info *out) {
    size_t n = 0;
    for (size_t i = 0, total = agx_slot_total(); i < total; i++) {
        agx_hook_slot *s = agx_slot_at(i);
        if (!s->used) continue;
        if (n++ != idx) continue;
        out->class_name = s->class_name;
        out->selector = s->sel_name;
        out->shape = s->shape;
        out->active = atomic_load(&s->active);
        out->added = s->added;
        out->calls = atomic_load_explicit(&s->calls, memory_order_relaxed);
        return 0;
    }
    return -1;
}

void agx_swizzle_reset_counts(void) {
    for (size_t i = 0, total = agx_slot_total(); i < total; i++)
        atomic_store_explicit(&agx_slot_at(i)->calls, 0, memory_order_relaxed);
}

/* -------------------------------------------------------------- streams */
/* The object-to-stream table: no fixed ceiling, entries removed when their
 * object is deallocated (lifecycle.c), O(1) expected lookups that take no lock.
 *
 * 64 shards (picked by the top bits of the address's hash), each an
 * open-addressing table (linear probing) that grows by doubling. Writers
 * (factories, dealloc, set_stream) take the shard's mutex. Readers (every
 * hooked call in `stream` mode) take nothing: they read the shard's sequence
 * number, probe, and read it again; a writer makes it odd while it restructures
 * the shard (a rehash in place, or publishing a doubled table), and a reader
 * that saw it change probes again. Inserting into or removing from a table
 * that stays in place needs no odd phase: an entry's key is written before its
 * object (release), a removed entry becomes a tombstone, and a reader sees the
 * entry either whole or not at all.
 *
 * A doubled table replaces the old one, which is kept (a reader may still be
 * probing it): the kept tables of a shard add up to less than its current one.
 * Tombstones are cleared by rehashing in place (under the odd phase), so a
 * table of steady size is never reallocated. When memory for a doubled table
 * cannot be had, the shard fills further (probes get longer); only a shard
 * with no free slot left ends the process with a message: an object without
 * its stream key would take a weaker lock, and protection is never weakened. */

#define AGX_ST_SHARD_BITS 6
#define AGX_ST_SHARDS (1u << AGX_ST_SHARD_BITS)
#define AGX_ST_MIN_CAP 64 /* slots of a shard's first table (power of two) */
#define AGX_ST_EMPTY ((uintptr_t)0)
#define AGX_ST_TOMB ((uintptr_t)1) /* no object lives at address 1 */

typedef struct agx_st_entry {
    _Atomic uintptr_t obj; /* AGX_ST_EMPTY, AGX_ST_TOMB or the object */
    _Atomic uint64_t key;
} agx_st_entry;

typedef struct agx_st_table {
    size_t mask; /* capacity - 1 */
    struct agx_st_table *retired; /* the table it replaced (kept for readers) */
    agx_st_entry e[];
} agx_st_table;

typedef struct agx_st_shard {
    _Atomic uint32_t seq;            /* odd while the shard is restructured */
    _Atomic(agx_st_table *) tab;     /* NULL until the first insert */
    pthread_mutex_t mu;              /* writers */
    size_t live, tombs;              /* under mu */
    uint64_t removed;                /* under mu: entries cleared at dealloc */
} __attribute__((aligned(64))) agx_st_shard;

static agx_st_shard agx_st[AGX_ST_SHARDS];
static _Atomic uint64_t agx_st_rehashes, agx_st_grows;
static pthread_once_t agx_st_once = PTHREAD_ONCE_INIT;
static _Atomic uintptr_t agx_resolver;

static void agx_st_fork_prepare(void) {
    for (unsigned i = 0; i < AGX_ST_SHARDS; i++) pthread_mutex_lock(&agx_st[i].mu);
}
static void agx_st_fork_parent(void) {
    for (unsigned i = 0; i < AGX_ST_SHARDS; i++) pthread_mutex_unlock(&agx_st[i].mu);
}
static void agx_st_fork_child(void) {
    for (unsigned i = 0; i < AGX_ST_SHARDS; i++) pthread_mutex_init(&agx_st[i].mu, NULL);
}
static void agx_st_init(void) {
    for (unsigned i = 0; i < AGX_ST_SHARDS; i++) pthread_mutex_init(&agx_st[i].mu, NULL);
    pthread_atfork(agx_st_fork_prepare, agx_st_fork_parent, agx_st_fork_child);
}

static inline uint64_t agx_st_hash(uintptr_t p) { return agx_mix64((uint64_t)p); }
static inline agx_st_shard *agx_st_shard_of(uint64_t h) { return &agx_st[h >> (64 - AGX_ST_SHARD_BITS)]; }

static void agx_st_fatal(const char *what, size_t cap) {
    fprintf(stderr,
            "agxguard: the stream table %s (a shard of %zu slots); stream mode cannot keep its "
            "protection without it, so the process ends here\n",
            what, cap);
    fflush(stderr);
    abort();
}

/* Writer, under mu: put (o, key) into t, which has a free slot. */
static void agx_st_place(agx_st_table *t, uintptr_t o, uint64_t key, uint64_t h) {
    for (size_t i = h & t->mask;; i = (i + 1) & t->mask) {
        if (atomic_load_explicit(&t->e[i].obj, memory_order_relaxed) == AGX_ST_EMPTY) {
            atomic_store_explicit(&t->e[i].key, key, memory_order_relaxed);
            atomic_store_explicit(&t->e[i].obj, o, memory_order_release);
            return;
        }
    }
}

/* Writer, under mu: rehash the shard into a table of `cap` slots (a new one
 * when it differs from the current, else in place). Returns 0, or -1 when a
 * new table (or the scratch copy) could not be allocated. */
static int agx_st_rebuild(agx_st_shard *sh, size_t cap) {
    agx_st_table *old = atomic_load_explicit(&sh->tab, memory_order_relaxed);
    size_t n = 0;
    agx_st_entry *live = NULL;
    if (old) {
        live = malloc((sh->live ? sh->live : 1) * sizeof *live);
        if (!live) return -1;
        for (size_t i = 0; i <= old->mask; i++) {
            uintptr_t o = atomic_load_explicit(&old->e[i].obj, memory_order_relaxed);
            if (o > AGX_ST_TOMB) {
                atomic_store_explicit(&live[n].obj, o, memory_order_relaxed);
                atomic_store_explicit(&live[n].key, atomic_load_explicit(&old->e[i].key, memory_order_relaxed),
                                      memory_order_relaxed);
                n++;
            }
        }
    }
    agx_st_table *t = old;
    int fresh = !old || old->mask + 1 != cap;
    if (fresh) {
        t = calloc(1, sizeof *t + cap * sizeof(agx_st_entry));
        if (!t) {
            free(live);
            return -1;
        }
        t->mask = cap - 1;
        t->retired = old;
    }
    /* readers that overlap this retry (a new table: they may have probed the
     * old one and missed a later change; in place: entries move) */
    atomic_fetch_add_explicit(&sh->seq, 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    if (!fresh)
        for (size_t i = 0; i <= t->mask; i++) atomic_store_explicit(&t->e[i].obj, AGX_ST_EMPTY, memory_order_relaxed);
    for (size_t j = 0; j < n; j++)
        agx_st_place(t, atomic_load_explicit(&live[j].obj, memory_order_relaxed),
                     atomic_load_explicit(&live[j].key, memory_order_relaxed),
                     agx_st_hash(atomic_load_explicit(&live[j].obj, memory_order_relaxed)));
    if (fresh) atomic_store_explicit(&sh->tab, t, memory_order_release);
    atomic_fetch_add_explicit(&sh->seq, 1, memory_order_release);
    sh->tombs = 0;
    free(live);
    atomic_fetch_add(fresh ? &agx_st_grows : &agx_st_rehashes, 1);
    return 0;
}

static int agx_st_lookup(uintptr_t o, uint64_t *key);

int agx_swizzle_set_stream(const void *object, uint64_t key) {
    uintptr_t o = (uintptr_t)object;
    if (o <= AGX_ST_TOMB) return -1; /* not an object */
    uint64_t had;
    if (agx_st_lookup(o, &had) && had == key) return 0; /* a pooled object back from its own queue: no write */
    pthread_once(&agx_st_once, agx_st_init);
    uint64_t h = agx_st_hash(o);
    agx_st_shard *sh = agx_st_shard_of(h);
    pthread_mutex_lock(&sh->mu);
    agx_st_table *t = atomic_load_explicit(&sh->tab, memory_order_relaxed);
    if (!t) {
        if (agx_st_rebuild(sh, AGX_ST_MIN_CAP) < 0) agx_st_fatal("could not be allocated", 0);
        t = atomic_load_explicit(&sh->tab, memory_order_relaxed);
    }
    size_t tomb = SIZE_MAX;
    for (size_t i = h & t->mask, n = 0; n <= t->mask; i = (i + 1) & t->mask, n++) {
        uintptr_t cur = atomic_load_explicit(&t->e[i].obj, memory_order_relaxed);
        if (cur == o) { /* known: a new key (an address reused by a new object) */
            atomic_store_explicit(&t->e[i].key, key, memory_order_relaxed);
            pthread_mutex_unlock(&sh->mu);
            return 0;
        }
        if (cur == AGX_ST_TOMB && tomb == SIZE_MAX) tomb = i;
        if (cur == AGX_ST_EMPTY) {
            if (tomb == SIZE_MAX) tomb = i;
            break;
        }
    }
    if (tomb == SIZE_MAX) agx_st_fatal("is full and could not grow", t->mask + 1); /* no free slot at all */
    if (atomic_load_explicit(&t->e[tomb].obj, memory_order_relaxed) == AGX_ST_TOMB) sh->tombs--;
    atomic_store_explicit(&t->e[tomb].key, key, memory_order_relaxed);
    atomic_store_explicit(&t->e[tomb].obj, o, memory_order_release);
    sh->live++;
    size_t cap = t->mask + 1;
    if ((sh->live + sh->tombs) * 4 > cap * 3) /* over 3/4 used: double when live > 1/2, else clear tombstones */
        agx_st_rebuild(sh, sh->live * 2 > cap ? cap * 2 : cap); /* on failure: fill further */
    pthread_mutex_unlock(&sh->mu);
    return 0;
}

void agx_swizzle_clear_stream(const void *object) {
    uintptr_t o = (uintptr_t)object;
    if (o <= AGX_ST_TOMB) return;
    uint64_t h = agx_st_hash(o);
    agx_st_shard *sh = agx_st_shard_of(h);
    if (!atomic_load_explicit(&sh->tab, memory_order_acquire)) return; /* nothing ever inserted here */
    pthread_mutex_lock(&sh->mu);
    agx_st_table *t = atomic_load_explicit(&sh->tab, memory_order_relaxed);
    for (size_t i = t ? h & t->mask : 0, n = 0; t && n <= t->mask; i = (i + 1) & t->mask, n++) {
        uintptr_t cur = atomic_load_explicit(&t->e[i].obj, memory_order_relaxed);
        if (cur == AGX_ST_EMPTY) break;
        if (cur == o) {
            atomic_store_explicit(&t->e[i].obj, AGX_ST_TOMB, memory_order_release);
            sh->live--;
            sh->tombs++;
            sh->removed++;
            break;
        }
    }
    pthread_mutex_unlock(&sh->mu);
}

static inline void agx_st_relax(unsigned spins) {
    if (spins < 64) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ volatile("yield");
#endif
    } else {
        sched_yield(); /* the writer may be descheduled: let it run */
    }
}

/* Reader: 1 and *key when the object has an entry. Takes no lock. */
static int agx_st_lookup(uintptr_t o, uint64_t *key) {
    uint64_t h = agx_st_hash(o);
    agx_st_shard *sh = agx_st_shard_of(h);
    for (unsigned spins = 0;; spins++) {
        uint32_t s1 = atomic_load_explicit(&sh->seq, memory_order_acquire);
        if (s1 & 1) {
            agx_st_relax(spins);
            continue;
        }
        agx_st_table *t = atomic_load_explicit(&sh->tab, memory_order_acquire);
        int found = 0;
        uint64_t k = 0;
        for (size_t i = t ? h & t->mask : 0, n = 0; t && n <= t->mask; i = (i + 1) & t->mask, n++) {
            uintptr_t cur = atomic_load_explicit(&t->e[i].obj, memory_order_acquire);
            if (cur == o) {
                k = atomic_load_explicit(&t->e[i].key, memory_order_relaxed);
                found = 1;
                break;
            }
            if (cur == AGX_ST_EMPTY) break;
        }
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&sh->seq, memory_order_relaxed) == s1) {
            if (found) *key = k;
            return found;
        }
        agx_st_relax(spins);
    }
}

int agx_swizzle_stream_entry(const void *object, uint64_t *key) { return agx_st_lookup((uintptr_t)object, key); }

int agx_swizzle_stream_of(const void *object, uint64_t *key) {
    if (agx_st_lookup((uintptr_t)object, key)) return 1;
    agx_stream_resolver fn = (agx_stream_resolver)atomic_load_explicit(&agx_resolver, memory_order_acquire);
    return fn ? fn(object, key) : 0;
}

void agx_swizzle_stream_table(agx_stream_table_info *out) {
    memset(out, 0, sizeof *out);
    pthread_once(&agx_st_once, agx_st_init);
    for (unsigned i = 0; i < AGX_ST_SHARDS; i++) {
        pthread_mutex_lock(&agx_st[i].mu);
        agx_st_table *t = atomic_load_explicit(&agx_st[i].tab, memory_order_relaxed);
        out->entries += agx_st[i].live;
        out->tombstones += agx_st[i].tombs;
        out->removed += agx_st[i].removed;
        if (t) out->capacity += t->mask + 1;
        for (; t; t = t->retired) out->bytes += sizeof *t + (t->mask + 1) * sizeof(agx_st_entry);
        pthread_mutex_unlock(&agx_st[i].mu);
    }
    out->grows = atomic_load(&agx_st_grows);
    out->rehashes = atomic_load(&agx_st_rehashes);
}

void agx_swizzle_set_stream_resolver(agx_stream_resolver fn) {
    atomic_store_explicit(&agx_resolver, (uintptr_t)fn, memory_order_release);
}

/* --------------------------------------------------------------- probes */

static Class agx_probe_cls;
static id agx_probe_obj;
static SEL agx_probe_sels[AGX_NSHAPES];
static char agx_probe_names[AGX_NSHAPES][48];

Class agx_swizzle_probe_class(void) {
    pthread_mutex_lock(&agx_swz_mu);
    if (!agx_probe_cls) {
        Class c = objc_getClass("AGXShapeProbe");
        if (!c) {
            c = agx_objc_new_root_class("AGXShapeProbe");
            if (!c) {
                pthread_mutex_unlock(&agx_swz_mu);
                return Nil;
            }
            for (size_t i = 0; i < AGX_NSHAPES; i++) {
                snprintf(agx_probe_names[i], sizeof agx_probe_names[i], "probe_%s", agx_shapes[i].name);
                agx_probe_sels[i] = sel_registerName(agx_probe_names[i]);
                class_addMethod(c, agx_probe_sels[i], agx_shapes[i].probe, agx_shapes[i].probe_types);
            }
            objc_registerClassPair(c);
        }
        agx_probe_obj = class_createInstance(c, 0);
        agx_probe_cls = c;
    }
    pthread_mutex_unlock(&agx_swz_mu);
    return agx_probe_cls;
}

size_t agx_swizzle_shape_count(void) { return AGX_NSHAPES; }
const char *agx_swizzle_shape_key(size_t i) { return i < AGX_NSHAPES ? agx_shapes[i].key : NULL; }

const char *agx_swizzle_probe_selector(size_t i) {
    if (i >= AGX_NSHAPES) return NULL;
    agx_swizzle_probe_class();
    return agx_probe_names[i];
}

int agx_swizzle_probe_call(size_t i, char *err, size_t errlen) {
    if (i >= AGX_NSHAPES) { snprintf(err, errlen, "no shape %zu", i); return -1; }
    agx_swizzle_probe_class();
    IMP imp = agx_objc_lookup(agx_probe_obj, agx_probe_sels[i]);
    int r = agx_shapes[i].probe_call(imp, agx_probe_obj, agx_probe_sels[i]);
    if (r == 1) { snprintf(err, errlen, "shape %s: arguments arrived changed", agx_shapes[i].key); return -1; }
    if (r == 2) { snprintf(err, errlen, "shape %s: return value came back changed", agx_shapes[i].key); return -1; }
    return 0;
}
