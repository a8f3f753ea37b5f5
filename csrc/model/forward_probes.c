/* forward_probes.c: test classes for the swizzle engine's general forwarder
 * (csrc/objc/forwarder.h), and their Python bindings (in agxguard._model).
 *
 * AGXForwardProbe has one method per signature below: structs by value of
 * 8 to 64 bytes (integer and floating fields mixed, nested, an array inside),
 * float-only structs (what arm64 passes in FP registers), more than 8 integer
 * and more than 8 floating-point arguments (the rest go on the stack), narrow
 * integers among wide ones, float/double mixes, the Metal selectors' shapes
 * that have no typed wrapper (issue 13), and struct returns of every size.
 * Each method hashes its arguments field by field (never padding) into a
 * per-thread digest, bumps a shared counter with a read-yield-write race, and
 * returns a value made from the digest. Each caller is compiled with the exact
 * prototype, so the compiler (not libffi) decides how the call is passed:
 * a hooked call must deliver the same digest and return the same bits.
 *
 * AGXForwardRefuse has methods the forwarder must refuse (a union, a
 * bit-field, an array argument, an opaque struct, _Complex, an unknown type
 * code). AGXForwardBench{Typed,Ffi,Libffi,Plain} share one cheap method of a
 * shape that has a typed wrapper, for benchmarks/forwarder.py (Ffi: the
 * forwarder's trampoline, Libffi: its libffi closure). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "model_capi.h"
#include "model_module.h"
#include "objc_compat.h"
#include "start_gate.h"

/* ------------------------------------------------------------- the types */

typedef int8_t fp_i8;
typedef uint8_t fp_u8;
typedef int16_t fp_i16;
typedef uint16_t fp_u16;
typedef int32_t fp_i32;
typedef uint32_t fp_u32;
typedef int64_t fp_i64;
typedef uint64_t fp_u64;
typedef float fp_f32;
typedef double fp_f64;
typedef bool fp_bo;
typedef void *fp_ptr;
typedef struct { int32_t i; float f; } fp_s8;                                       /* 8 bytes */
typedef struct { double d; uint64_t q; } fp_s16;                                    /* 16 */
typedef struct { float f; double d; int32_t i; } fp_s24;                            /* 24, padded */
typedef struct { fp_s16 a; float f; int32_t i; uint64_t q; } fp_s32;                /* 32, nested */
typedef struct { uint64_t loc, len; } fp_q2;                                        /* NSRange */
typedef struct { double d; float f; int32_t i; uint64_t q; fp_q2 r; double e; } fp_s48; /* 48 */
typedef struct { fp_s16 a, b; fp_s24 c; uint64_t q; } fp_s64;                       /* 64 */
typedef struct { uint64_t x, y, z; } fp_q3;                                         /* MTLOrigin */
typedef struct { fp_q3 origin, size; } fp_q6;                                       /* MTLRegion */
typedef struct { float v[2]; } fp_f2;
typedef struct { float v[4]; } fp_f4; /* encoded with an array inside */
typedef struct { double v[3]; } fp_d3;
typedef struct { double v[4]; } fp_d4;
typedef long double fp_ld;                /* x86-64: the x87 stack for a return, memory as an argument */
typedef struct { long double x; } fp_sld; /* x86-64: returned on the x87 stack too */

_Static_assert(sizeof(fp_s8) == 8 && sizeof(fp_s16) == 16 && sizeof(fp_s24) == 24 && sizeof(fp_s32) == 32 &&
                   sizeof(fp_s48) == 48 && sizeof(fp_s64) == 64,
               "the struct sizes the tests name");

#define ENC_i8 "c"
#define ENC_u8 "C"
#define ENC_i16 "s"
#define ENC_u16 "S"
#define ENC_i32 "i"
#define ENC_u32 "I"
#define ENC_i64 "q"
#define ENC_u64 "Q"
#define ENC_f32 "f"
#define ENC_f64 "d"
#define ENC_bo "B"
#define ENC_ptr "^v"
#define ENC_s8 "{FPS8=if}"
#define ENC_s16 "{FPS16=dQ}"
#define ENC_s24 "{FPS24=fdi}"
#define ENC_s32 "{FPS32={FPS16=dQ}fiQ}"
#define ENC_q2 "{?=QQ}"
#define ENC_s48 "{FPS48=dfiQ{_NSRange=QQ}d}"
#define ENC_s64 "{FPS64={FPS16=dQ}{FPS16=dQ}{FPS24=fdi}Q}"
#define ENC_q3 "{MTLOrigin=QQQ}"
#define ENC_q6 "{MTLRegion={MTLOrigin=QQQ}{MTLSize=QQQ}}"
#define ENC_f2 "{FPF2=ff}"
#define ENC_f4 "{FPF4=[4f]}"
#define ENC_d3 "{FPD3=ddd}"
#define ENC_d4 "{FPD4=dddd}"
#define ENC_ld "D"
#define ENC_sld "{FPLD=D}"
#define ENC_v "v"

/* Values from a seed, and a field-by-field hash (FNV-1a over each field's bytes). */
static uint64_t mixb(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h * 31 + n;
}
static uint64_t sx(uint64_t s) { return s * 0x9E3779B97F4A7C15ull + 0x5bd1e995u; }

#define FP_SCALAR(T, EXPR)                                                     \
    static fp_##T mk_##T(uint64_t s) { return (fp_##T)(EXPR); }                \
    static uint64_t hs_##T(uint64_t h, fp_##T v) { return mixb(h, &v, sizeof v); }
FP_SCALAR(i8, (int8_t)(sx(s) >> 7))
FP_SCALAR(u8, (uint8_t)(sx(s) >> 9) | 0x80)
FP_SCALAR(i16, (int16_t)(sx(s) >> 11))
FP_SCALAR(u16, (uint16_t)(sx(s) >> 13) | 0x8000)
FP_SCALAR(i32, (int32_t)(sx(s) >> 17))
FP_SCALAR(u32, (uint32_t)(sx(s) >> 19) | 0x80000000u)
FP_SCALAR(i64, (int64_t)sx(s))
FP_SCALAR(u64, sx(s))
FP_SCALAR(f32, (float)(sx(s) % 100003) * 0.25f - 7.5f)
FP_SCALAR(f64, (double)(sx(s) % 1000000007) * 0.125 - 3.75)
FP_SCALAR(bo, (sx(s) >> 5) & 1)
FP_SCALAR(ptr, (void *)(uintptr_t)(sx(s) & ~(uint64_t)7))

/* long double: only its value's bytes (x86-64's 80-bit format leaves 6 of its 16 bytes unused) */
#if defined(__x86_64__) || defined(__i386__)
#define FP_LD_BYTES 10
#else
#define FP_LD_BYTES sizeof(long double)
#endif
static fp_ld mk_ld(uint64_t s) { return (fp_ld)(sx(s) % 1000000007) / 3.0L - 11.25L; }
static uint64_t hs_ld(uint64_t h, fp_ld v) { return mixb(h, &v, FP_LD_BYTES); }

#define F(T, field, k) r.field = mk_##T(s + k);
#define H(T, field) h = hs_##T(h, v.field);
static fp_s8 mk_s8(uint64_t s) { fp_s8 r; F(i32, i, 1) F(f32, f, 2) return r; }
static uint64_t hs_s8(uint64_t h, fp_s8 v) { H(i32, i) H(f32, f) return h; }
static fp_s16 mk_s16(uint64_t s) { fp_s16 r; F(f64, d, 1) F(u64, q, 2) return r; }
static uint64_t hs_s16(uint64_t h, fp_s16 v) { H(f64, d) H(u64, q) return h; }
static fp_s24 mk_s24(uint64_t s) { fp_s24 r; F(f32, f, 1) F(f64, d, 2) F(i32, i, 3) return r; }
static uint64_t hs_s24(uint64_t h, fp_s24 v) { H(f32, f) H(f64, d) H(i32, i) return h; }
static fp_s32 mk_s32(uint64_t s) { fp_s32 r; F(s16, a, 1) F(f32, f, 3) F(i32, i, 4) F(u64, q, 5) return r; }
static uint64_t hs_s32(uint64_t h, fp_s32 v) { H(s16, a) H(f32, f) H(i32, i) H(u64, q) return h; }
static fp_q2 mk_q2(uint64_t s) { fp_q2 r; F(u64, loc, 1) F(u64, len, 2) return r; }
static uint64_t hs_q2(uint64_t h, fp_q2 v) { H(u64, loc) H(u64, len) return h; }
static fp_s48 mk_s48(uint64_t s) {
    fp_s48 r;
    F(f64, d, 1) F(f32, f, 2) F(i32, i, 3) F(u64, q, 4) F(q2, r, 5) F(f64, e, 7) return r;
}
static uint64_t hs_s48(uint64_t h, fp_s48 v) { H(f64, d) H(f32, f) H(i32, i) H(u64, q) H(q2, r) H(f64, e) return h; }
static fp_s64 mk_s64(uint64_t s) { fp_s64 r; F(s16, a, 1) F(s16, b, 3) F(s24, c, 5) F(u64, q, 8) return r; }
static uint64_t hs_s64(uint64_t h, fp_s64 v) { H(s16, a) H(s16, b) H(s24, c) H(u64, q) return h; }
static fp_q3 mk_q3(uint64_t s) { fp_q3 r; F(u64, x, 1) F(u64, y, 2) F(u64, z, 3) return r; }
static uint64_t hs_q3(uint64_t h, fp_q3 v) { H(u64, x) H(u64, y) H(u64, z) return h; }
static fp_q6 mk_q6(uint64_t s) { fp_q6 r; F(q3, origin, 1) F(q3, size, 4) return r; }
static uint64_t hs_q6(uint64_t h, fp_q6 v) { H(q3, origin) H(q3, size) return h; }
static fp_f2 mk_f2(uint64_t s) { fp_f2 r; F(f32, v[0], 1) F(f32, v[1], 2) return r; }
static uint64_t hs_f2(uint64_t h, fp_f2 v) { H(f32, v[0]) H(f32, v[1]) return h; }
static fp_f4 mk_f4(uint64_t s) { fp_f4 r; F(f32, v[0], 1) F(f32, v[1], 2) F(f32, v[2], 3) F(f32, v[3], 4) return r; }
static uint64_t hs_f4(uint64_t h, fp_f4 v) { H(f32, v[0]) H(f32, v[1]) H(f32, v[2]) H(f32, v[3]) return h; }
static fp_d3 mk_d3(uint64_t s) { fp_d3 r; F(f64, v[0], 1) F(f64, v[1], 2) F(f64, v[2], 3) return r; }
static uint64_t hs_d3(uint64_t h, fp_d3 v) { H(f64, v[0]) H(f64, v[1]) H(f64, v[2]) return h; }
static fp_d4 mk_d4(uint64_t s) { fp_d4 r; F(f64, v[0], 1) F(f64, v[1], 2) F(f64, v[2], 3) F(f64, v[3], 4) return r; }
static uint64_t hs_d4(uint64_t h, fp_d4 v) { H(f64, v[0]) H(f64, v[1]) H(f64, v[2]) H(f64, v[3]) return h; }
static fp_sld mk_sld(uint64_t s) { fp_sld r; F(ld, x, 1) return r; }
static uint64_t hs_sld(uint64_t h, fp_sld v) { H(ld, x) return h; }
#undef F
#undef H

/* ------------------------------------------------------------ the probes */

/* X(name, RET, ARGS...): the method's selector is "name" followed by one ':'
 * per argument. */
#define FP_PROBES(X)                                                                                        \
    /* Metal's shapes with no typed wrapper (issue 13) */                                                     \
    X(setBuffersOffsetsWithRange, v, ptr, ptr, q2)                                                            \
    X(setBuffersOffsetsStridesWithRange, v, ptr, ptr, ptr, q2)                                                \
    X(setSamplerStateLodClamps, v, ptr, f32, f32, u64)                                                        \
    X(copyFromBufferToTexture, v, ptr, u64, u64, u64, q3, ptr, u64, u64, q3)                                 \
    X(copyFromTextureToBuffer, v, ptr, u64, u64, q3, q3, ptr, u64, u64, u64)                                 \
    X(copyIndirectCommandBuffer, v, ptr, q2, ptr, u64)                                                        \
    X(getTextureAccessCounters, v, ptr, q6, u64, u64, bo, ptr, u64)                                           \
    X(resetTextureAccessCounters, v, ptr, q6, u64, u64)                                                       \
    /* structs by value, 8 to 64 bytes, as arguments and returns */                                          \
    X(s8Echo, s8, s8, i32)                                                                                    \
    X(s16Echo, s16, s16, s8)                                                                                  \
    X(s24Echo, s24, s24, f32)                                                                                 \
    X(s32Echo, s32, s32, u64)                                                                                 \
    X(s48Echo, s48, s48, f64)                                                                                 \
    X(s64Echo, s64, s64, s64)                                                                                 \
    X(q3Make, q3, u64)                                                                                        \
    X(q6Echo, q6, q6, q2)                                                                                     \
    /* float-only structs (FP registers on arm64, SSE on x86-64) */                                           \
    X(f2Echo, f2, f2, f32)                                                                                    \
    X(f4Echo, f4, f4, f2)                                                                                     \
    X(d3Echo, d3, d3, d4)                                                                                     \
    X(d4Echo, d4, f64, d3)                                                                                    \
    /* past the registers: 10 integers, 12 floating point, then structs on the stack */                     \
    X(tenIntegers, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64)                                     \
    X(twelveFloats, f64, f64, f32, f64, f32, f64, f32, f64, f32, f64, f32, f64, f64)                          \
    X(structsOnTheStack, s48, u64, u64, u64, u64, u64, u64, u64, u64, s24, f64, f64, f64, f64, f64, f64, f64, \
      f64, f64, s16)                                                                                          \
    /* narrow integers among wide ones, spilling to the stack */                                             \
    X(narrowMix, i32, i8, u64, i16, f32, bo, i32, f64, u8, u16, i8, u64, i16, u8, u16, u32)                  \
    X(narrowReturn, i8, i8, u16, i16)                                                                         \
    X(shortReturn, u16, u16, i8)                                                                              \
    X(floatDoubleMix, f32, f32, f64, f32, f64, f32, f64, f32, f64, f32, f64, i64)                           \
    /* long double returns and arguments (x86-64: the x87 stack, and memory) */                              \
    X(longDoubleMix, ld, ld, f64, ld, u64)                                                                    \
    X(longDoubleStruct, sld, sld, f32)

/* An index-carrying FOR_EACH, up to 20 arguments. */
#define FP_N_(_1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, _13, _14, _15, _16, _17, _18, _19, _20, N, ...) N
#define FP_N(...) FP_N_(__VA_ARGS__, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
#define FP_CAT_(a, b) a##b
#define FP_CAT(a, b) FP_CAT_(a, b)
#define FP_EACH(M, ...) FP_CAT(FP_E, FP_N(__VA_ARGS__))(M, __VA_ARGS__)
#define FP_E1(M, a) M(1, a)
#define FP_E2(M, a, ...) M(2, a) FP_E1(M, __VA_ARGS__)
#define FP_E3(M, a, ...) M(3, a) FP_E2(M, __VA_ARGS__)
#define FP_E4(M, a, ...) M(4, a) FP_E3(M, __VA_ARGS__)
#define FP_E5(M, a, ...) M(5, a) FP_E4(M, __VA_ARGS__)
#define FP_E6(M, a, ...) M(6, a) FP_E5(M, __VA_ARGS__)
#define FP_E7(M, a, ...) M(7, a) FP_E6(M, __VA_ARGS__)
#define FP_E8(M, a, ...) M(8, a) FP_E7(M, __VA_ARGS__)
#define FP_E9(M, a, ...) M(9, a) FP_E8(M, __VA_ARGS__)
#define FP_E10(M, a, ...) M(10, a) FP_E9(M, __VA_ARGS__)
#define FP_E11(M, a, ...) M(11, a) FP_E10(M, __VA_ARGS__)
#define FP_E12(M, a, ...) M(12, a) FP_E11(M, __VA_ARGS__)
#define FP_E13(M, a, ...) M(13, a) FP_E12(M, __VA_ARGS__)
#define FP_E14(M, a, ...) M(14, a) FP_E13(M, __VA_ARGS__)
#define FP_E15(M, a, ...) M(15, a) FP_E14(M, __VA_ARGS__)
#define FP_E16(M, a, ...) M(16, a) FP_E15(M, __VA_ARGS__)
#define FP_E17(M, a, ...) M(17, a) FP_E16(M, __VA_ARGS__)
#define FP_E18(M, a, ...) M(18, a) FP_E17(M, __VA_ARGS__)
#define FP_E19(M, a, ...) M(19, a) FP_E18(M, __VA_ARGS__)
#define FP_E20(M, a, ...) M(20, a) FP_E19(M, __VA_ARGS__)
/* (the index counts down; it only has to be distinct per argument: the
 * order of the arguments is kept) */
#define FP_PARAM(i, T) , fp_##T a##i
#define FP_TYPE(i, T) , fp_##T
#define FP_NAME(i, T) , a##i
#define FP_HASH(i, T) h = hs_##T(h, a##i);
#define FP_MAKE(i, T) fp_##T a##i = mk_##T((uint64_t)(i) * 7919u + 13u);
#define FP_ENC(i, T) ENC_##T
#define FP_COLON(i, T) ":"

static _Thread_local uint64_t fp_seen;
static volatile uint64_t fp_counter; /* bumped racily by every probe method */

static void fp_bump(void) {
    uint64_t v = fp_counter;
    sched_yield(); /* widens the window between the read and the write */
    fp_counter = v + 1;
}

#define FP_DEFINE(name, RET, ...)                                                                         \
    static FP_RTYPE_##RET fp_m_##name(id self, SEL cmd FP_EACH(FP_PARAM, __VA_ARGS__)) {                   \
        (void)self, (void)cmd;                                                                             \
        uint64_t h = 14695981039346656037ull;                                                              \
        FP_EACH(FP_HASH, __VA_ARGS__)                                                                      \
        fp_seen = h;                                                                                       \
        fp_bump();                                                                                         \
        FP_RETURN_##RET(h);                                                                                \
    }                                                                                                      \
    static int fp_c_##name(IMP imp, id obj, SEL sel) {                                                     \
        FP_EACH(FP_MAKE, __VA_ARGS__)                                                                      \
        uint64_t h = 14695981039346656037ull;                                                              \
        FP_EACH(FP_HASH, __VA_ARGS__)                                                                      \
        fp_seen = 0;                                                                                       \
        FP_CALL_##RET(imp, obj, sel, __VA_ARGS__);                                                         \
        if (fp_seen != h) return 1;                                                                        \
        FP_CHECK_##RET(h);                                                                                 \
        return 0;                                                                                          \
    }

/* Per return type: the C type, the return statement, the call and its check. */
#define FP_RTYPE_v void
#define FP_RETURN_v(h) return
#define FP_CALL_v(imp, obj, sel, ...) \
    ((void (*)(id, SEL FP_EACH(FP_TYPE, __VA_ARGS__)))imp)(obj, sel FP_EACH(FP_NAME, __VA_ARGS__))
#define FP_CHECK_v(h) (void)0
#define FP_RTYPE_s8 fp_s8
#define FP_RTYPE_s16 fp_s16
#define FP_RTYPE_s24 fp_s24
#define FP_RTYPE_s32 fp_s32
#define FP_RTYPE_s48 fp_s48
#define FP_RTYPE_s64 fp_s64
#define FP_RTYPE_q3 fp_q3
#define FP_RTYPE_q6 fp_q6
#define FP_RTYPE_f2 fp_f2
#define FP_RTYPE_f4 fp_f4
#define FP_RTYPE_d3 fp_d3
#define FP_RTYPE_d4 fp_d4
#define FP_RTYPE_u64 fp_u64
#define FP_RTYPE_f64 fp_f64
#define FP_RTYPE_f32 fp_f32
#define FP_RTYPE_i32 fp_i32
#define FP_RTYPE_i8 fp_i8
#define FP_RTYPE_u16 fp_u16
#define FP_RTYPE_ld fp_ld
#define FP_RTYPE_sld fp_sld
/* value returns share one pattern: the callee returns mk_T(digest); the
 * caller compares the returned value's field hash with the expected one */
#define FP_RETURN_s8(h) return mk_s8(h)
#define FP_RETURN_s16(h) return mk_s16(h)
#define FP_RETURN_s24(h) return mk_s24(h)
#define FP_RETURN_s32(h) return mk_s32(h)
#define FP_RETURN_s48(h) return mk_s48(h)
#define FP_RETURN_s64(h) return mk_s64(h)
#define FP_RETURN_q3(h) return mk_q3(h)
#define FP_RETURN_q6(h) return mk_q6(h)
#define FP_RETURN_f2(h) return mk_f2(h)
#define FP_RETURN_f4(h) return mk_f4(h)
#define FP_RETURN_d3(h) return mk_d3(h)
#define FP_RETURN_d4(h) return mk_d4(h)
#define FP_RETURN_u64(h) return mk_u64(h)
#define FP_RETURN_f64(h) return mk_f64(h)
#define FP_RETURN_f32(h) return mk_f32(h)
#define FP_RETURN_i32(h) return mk_i32(h)
#define FP_RETURN_i8(h) return mk_i8(h)
#define FP_RETURN_u16(h) return mk_u16(h)
#define FP_RETURN_ld(h) return mk_ld(h)
#define FP_RETURN_sld(h) return mk_sld(h)
#define FP_CALL_VAL(T, imp, obj, sel, ...)                                                                 \
    fp_##T r = ((fp_##T(*)(id, SEL FP_EACH(FP_TYPE, __VA_ARGS__)))imp)(obj, sel FP_EACH(FP_NAME, __VA_ARGS__))
#define FP_CHECK_VAL(T, h)                                                                                 \
    if (hs_##T(0, r) != hs_##T(0, mk_##T(h))) return 2
#define FP_CALL_s8(...) FP_CALL_VAL(s8, __VA_ARGS__)
#define FP_CALL_s16(...) FP_CALL_VAL(s16, __VA_ARGS__)
#define FP_CALL_s24(...) FP_CALL_VAL(s24, __VA_ARGS__)
#define FP_CALL_s32(...) FP_CALL_VAL(s32, __VA_ARGS__)
#define FP_CALL_s48(...) FP_CALL_VAL(s48, __VA_ARGS__)
#define FP_CALL_s64(...) FP_CALL_VAL(s64, __VA_ARGS__)
#define FP_CALL_q3(...) FP_CALL_VAL(q3, __VA_ARGS__)
#define FP_CALL_q6(...) FP_CALL_VAL(q6, __VA_ARGS__)
#define FP_CALL_f2(...) FP_CALL_VAL(f2, __VA_ARGS__)
#define FP_CALL_f4(...) FP_CALL_VAL(f4, __VA_ARGS__)
#define FP_CALL_d3(...) FP_CALL_VAL(d3, __VA_ARGS__)
#define FP_CALL_d4(...) FP_CALL_VAL(d4, __VA_ARGS__)
#define FP_CALL_u64(...) FP_CALL_VAL(u64, __VA_ARGS__)
#define FP_CALL_f64(...) FP_CALL_VAL(f64, __VA_ARGS__)
#define FP_CALL_f32(...) FP_CALL_VAL(f32, __VA_ARGS__)
#define FP_CALL_i32(...) FP_CALL_VAL(i32, __VA_ARGS__)
#define FP_CALL_i8(...) FP_CALL_VAL(i8, __VA_ARGS__)
#define FP_CALL_u16(...) FP_CALL_VAL(u16, __VA_ARGS__)
#define FP_CALL_ld(...) FP_CALL_VAL(ld, __VA_ARGS__)
#define FP_CALL_sld(...) FP_CALL_VAL(sld, __VA_ARGS__)
#define FP_CHECK_s8(h) FP_CHECK_VAL(s8, h)
#define FP_CHECK_s16(h) FP_CHECK_VAL(s16, h)
#define FP_CHECK_s24(h) FP_CHECK_VAL(s24, h)
#define FP_CHECK_s32(h) FP_CHECK_VAL(s32, h)
#define FP_CHECK_s48(h) FP_CHECK_VAL(s48, h)
#define FP_CHECK_s64(h) FP_CHECK_VAL(s64, h)
#define FP_CHECK_q3(h) FP_CHECK_VAL(q3, h)
#define FP_CHECK_q6(h) FP_CHECK_VAL(q6, h)
#define FP_CHECK_f2(h) FP_CHECK_VAL(f2, h)
#define FP_CHECK_f4(h) FP_CHECK_VAL(f4, h)
#define FP_CHECK_d3(h) FP_CHECK_VAL(d3, h)
#define FP_CHECK_d4(h) FP_CHECK_VAL(d4, h)
#define FP_CHECK_u64(h) FP_CHECK_VAL(u64, h)
#define FP_CHECK_f64(h) FP_CHECK_VAL(f64, h)
#define FP_CHECK_f32(h) FP_CHECK_VAL(f32, h)
#define FP_CHECK_i32(h) FP_CHECK_VAL(i32, h)
#define FP_CHECK_i8(h) FP_CHECK_VAL(i8, h)
#define FP_CHECK_u16(h) FP_CHECK_VAL(u16, h)
#define FP_CHECK_ld(h) FP_CHECK_VAL(ld, h)
#define FP_CHECK_sld(h) FP_CHECK_VAL(sld, h)

FP_PROBES(FP_DEFINE)

typedef struct fp_probe {
    const char *selector; /* the name and one ':' per argument */
    const char *types;    /* the encoding, without frame offsets */
    IMP method;
    int (*call)(IMP, id, SEL);
    SEL sel;
} fp_probe;

#define FP_ROW(name, RET, ...)                                                                     \
    {#name FP_EACH(FP_COLON, __VA_ARGS__), ENC_##RET "@:" FP_EACH(FP_ENC, __VA_ARGS__), (IMP)fp_m_##name, \
     fp_c_##name, NULL},
static fp_probe fp_probes[] = {FP_PROBES(FP_ROW)};
#define FP_NPROBES (sizeof fp_probes / sizeof fp_probes[0])

/* -------------------------------------------------- the refused methods */

static void fp_nothing(id self, SEL cmd) { (void)self, (void)cmd; }

static const struct { const char *selector, *types, *why; } fp_refused[] = {
    {"takeUnion:", "v@:(FPUnion=if)", "a union"},
    {"takeBitField:", "v@:{FPBits=b3b5}", "a bit-field"},
    {"takeArray:", "v@:[4i]", "an array argument"},
    {"takeOpaque:", "v@:{FPOpaque}", "an opaque struct"},
    {"takeComplex:", "v@:jd", "a _Complex value"},
    {"takeUnknown:", "v@:Y", "an unknown type code"},
    {"returnUnion", "(FPUnion=if)@:", "a union"},
};
#define FP_NREFUSED (sizeof fp_refused / sizeof fp_refused[0])

/* --------------------------------------------------------- the classes */

static pthread_mutex_t fp_mu = PTHREAD_MUTEX_INITIALIZER;
static Class fp_cls;
static id fp_obj;

static void fp_bench_method(id self, SEL cmd, uint64_t a, uint64_t b) {
    (void)self, (void)cmd;
    fp_seen += a ^ b;
}
/* The copyFromBuffer:...toTexture:... shape, which has no typed wrapper. */
static void fp_bench_copy(id self, SEL cmd, id buf, uint64_t off, uint64_t row, uint64_t image, fp_q3 size, id tex,
                          uint64_t slice, uint64_t level, fp_q3 origin) {
    (void)self, (void)cmd, (void)buf, (void)tex;
    fp_seen += off ^ row ^ image ^ size.x ^ slice ^ level ^ origin.z;
}
#define FP_BENCH_COPY "benchCopy:sourceOffset:sourceBytesPerRow:sourceBytesPerImage:sourceSize:toTexture:" \
                      "destinationSlice:destinationLevel:destinationOrigin:"
static const char *const fp_bench_classes[] = {"AGXForwardBenchPlain", "AGXForwardBenchTyped", "AGXForwardBenchFfi",
                                               "AGXForwardBenchLibffi"};

/* Make (once) the probe, refusal and benchmark classes; 0, or -1 with a Python error. */
static int fp_classes(void) {
    pthread_mutex_lock(&fp_mu);
    int rc = 0;
    if (!fp_cls) {
        Class c = agx_objc_new_root_class("AGXForwardProbe");
        Class r = agx_objc_new_root_class("AGXForwardRefuse");
        if (!c || !r) {
            rc = -1;
            goto out;
        }
        for (size_t i = 0; i < FP_NPROBES; i++) {
            fp_probe *p = &fp_probes[i];
            p->sel = sel_registerName(p->selector);
            class_addMethod(c, p->sel, p->method, p->types);
        }
        for (size_t i = 0; i < FP_NREFUSED; i++)
            class_addMethod(r, sel_registerName(fp_refused[i].selector), (IMP)fp_nothing, fp_refused[i].types);
        objc_registerClassPair(c);
        objc_registerClassPair(r);
        for (size_t i = 0; i < sizeof fp_bench_classes / sizeof fp_bench_classes[0]; i++) {
            Class b = agx_objc_new_root_class(fp_bench_classes[i]);
            if (!b) {
                rc = -1;
                goto out;
            }
            class_addMethod(b, sel_registerName("bench:with:"), (IMP)fp_bench_method, "v@:QQ");
            class_addMethod(b, sel_registerName(FP_BENCH_COPY), (IMP)fp_bench_copy,
                            "v@:@QQQ{MTLSize=QQQ}@QQ{MTLOrigin=QQQ}");
            objc_registerClassPair(b);
        }
        fp_obj = class_createInstance(c, 0);
        fp_cls = c;
    }
out:
    pthread_mutex_unlock(&fp_mu);
    if (rc < 0) PyErr_SetString(PyExc_RuntimeError, "the runtime refused a forward probe class (name taken?)");
    return rc;
}

/* Call probe i through the method table (hooked or not): 0, 1 (arguments
 * arrived changed) or 2 (the return came back changed). */
static int fp_call(size_t i) {
    fp_probe *p = &fp_probes[i];
    return p->call(agx_objc_lookup(fp_obj, p->sel), fp_obj, p->sel);
}

/* ------------------------------------------------------------ bindings */

static PyObject *py_forward_probes(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    if (fp_classes() < 0) return NULL;
    PyObject *out = PyList_New((Py_ssize_t)FP_NPROBES);
    for (size_t i = 0; out && i < FP_NPROBES; i++) {
        PyObject *t = Py_BuildValue("(ss)", fp_probes[i].selector, fp_probes[i].types);
        if (!t) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    return out;
}

static int fp_index(PyObject *args, const char *fmt, Py_ssize_t *i) {
    if (fp_classes() < 0) return -1;
    if (*i < 0 || (size_t)*i >= FP_NPROBES) {
        PyErr_Format(PyExc_ValueError, "%s: probe index %zd out of range 0..%zu", fmt, *i, FP_NPROBES - 1);
        return -1;
    }
    return 0;
}

static PyObject *py_forward_probe_call(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "n:forward_probe_call", &i) || fp_index(args, "forward_probe_call", &i) < 0)
        return NULL;
    int r = fp_call((size_t)i);
    if (r == 1) return PyUnicode_FromFormat("%s: the arguments arrived changed", fp_probes[i].selector);
    if (r == 2) return PyUnicode_FromFormat("%s: the return value came back changed", fp_probes[i].selector);
    Py_RETURN_NONE;
}

typedef struct fp_job {
    size_t probe;
    int iterations;
    agx_gate *start;
    _Atomic int mismatches;
} fp_job;

static void *fp_thread(void *arg) {
    fp_job *j = arg;
    agx_gate_wait(j->start);
    for (int k = 0; k < j->iterations; k++)
        if (fp_call(j->probe)) atomic_fetch_add(&j->mismatches, 1);
    return NULL;
}

static PyObject *py_forward_probe_race(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t i;
    int threads, iterations;
    if (!PyArg_ParseTuple(args, "nii:forward_probe_race", &i, &threads, &iterations) ||
        fp_index(args, "forward_probe_race", &i) < 0)
        return NULL;
    if (threads < 1 || threads > 64) {
        PyErr_Format(PyExc_ValueError, "forward_probe_race: threads=%d, allowed 1..64", threads);
        return NULL;
    }
    if (iterations < 1) {
        PyErr_Format(PyExc_ValueError, "forward_probe_race: iterations=%d, must be >= 1", iterations);
        return NULL;
    }
    pthread_t ts[64];
    agx_gate start;
    fp_job job = {(size_t)i, iterations, &start, 0};
    uint64_t before, after;
    int made = 0;
    Py_BEGIN_ALLOW_THREADS
    agx_gate_init(&start, threads);
    before = fp_counter;
    for (; made < threads; made++)
        if (pthread_create(&ts[made], NULL, fp_thread, &job) != 0) break;
    if (made < threads) /* release the gate for the threads that started */
        for (int k = made; k < threads; k++) agx_gate_wait(&start);
    for (int t = 0; t < made; t++) pthread_join(ts[t], NULL);
    agx_gate_destroy(&start);
    after = fp_counter;
    Py_END_ALLOW_THREADS
    if (made < threads) {
        PyErr_Format(PyExc_RuntimeError, "forward_probe_race: only %d of %d threads started", made, threads);
        return NULL;
    }
    return Py_BuildValue("(Ki)", (unsigned long long)(after - before), atomic_load(&job.mismatches));
}

static PyObject *py_forward_refused(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    if (fp_classes() < 0) return NULL;
    PyObject *out = PyList_New((Py_ssize_t)FP_NREFUSED);
    for (size_t i = 0; out && i < FP_NREFUSED; i++) {
        PyObject *t = Py_BuildValue("(sss)", fp_refused[i].selector, fp_refused[i].types, fp_refused[i].why);
        if (!t) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    return out;
}

static PyObject *py_forward_force(PyObject *self, PyObject *args) {
    (void)self;
    int on;
    if (!PyArg_ParseTuple(args, "p:swizzle_force_forwarder", &on)) return NULL;
    agx_model_capi->swizzle_force_forwarder(on);
    Py_RETURN_NONE;
}

static PyObject *py_forward_bench(PyObject *self, PyObject *args) {
    (void)self;
    const char *cls_name, *method = "bench:with:";
    long long calls;
    if (!PyArg_ParseTuple(args, "sL|s:forward_bench", &cls_name, &calls, &method)) return NULL;
    int copy = !strcmp(method, FP_BENCH_COPY);
    if (!copy && strcmp(method, "bench:with:") != 0) {
        PyErr_Format(PyExc_ValueError, "forward_bench: method %s is not one of bench:with:, %s", method,
                     FP_BENCH_COPY);
        return NULL;
    }
    if (fp_classes() < 0) return NULL;
    Class c = objc_getClass(cls_name);
    int known = 0;
    for (size_t i = 0; i < sizeof fp_bench_classes / sizeof fp_bench_classes[0]; i++)
        known |= c && !strcmp(cls_name, fp_bench_classes[i]);
    if (!known) {
        PyErr_Format(PyExc_ValueError, "forward_bench: class %s is not one of AGXForwardBenchPlain, "
                                       "AGXForwardBenchTyped, AGXForwardBenchFfi, AGXForwardBenchLibffi",
                     cls_name);
        return NULL;
    }
    if (calls < 1) {
        PyErr_Format(PyExc_ValueError, "forward_bench: calls=%lld, must be >= 1", calls);
        return NULL;
    }
    id obj = class_createInstance(c, 0);
    SEL sel = sel_registerName(method);
    struct timespec t0, t1;
    Py_BEGIN_ALLOW_THREADS
    IMP imp = agx_objc_lookup(obj, sel);
    if (copy) {
        void (*fn)(id, SEL, id, uint64_t, uint64_t, uint64_t, fp_q3, id, uint64_t, uint64_t, fp_q3) =
            (void (*)(id, SEL, id, uint64_t, uint64_t, uint64_t, fp_q3, id, uint64_t, uint64_t, fp_q3))imp;
        fp_q3 size = {4, 4, 1}, origin = {0, 0, 0};
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long long k = 0; k < calls; k++) fn(obj, sel, obj, (uint64_t)k, 64, 256, size, obj, 0, 0, origin);
        clock_gettime(CLOCK_MONOTONIC, &t1);
    } else {
        void (*fn)(id, SEL, uint64_t, uint64_t) = (void (*)(id, SEL, uint64_t, uint64_t))imp;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long long k = 0; k < calls; k++) fn(obj, sel, (uint64_t)k, 7);
        clock_gettime(CLOCK_MONOTONIC, &t1);
    }
    Py_END_ALLOW_THREADS
    double ns = (double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec);
    return PyFloat_FromDouble(ns / (double)calls);
}

/* The first n bytes of the code of -[class selector] as the class now
 * dispatches it (tests/test_forwarder.py recognizes the forwarder's stubs). */
static PyObject *py_forward_imp_code(PyObject *self, PyObject *args) {
    (void)self;
    const char *cls_name, *selector;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "ssn:forward_imp_code", &cls_name, &selector, &n)) return NULL;
    if (n < 1 || n > 64) {
        PyErr_Format(PyExc_ValueError, "forward_imp_code: n=%zd, must be 1..64", n);
        return NULL;
    }
    if (fp_classes() < 0) return NULL;
    Class c = objc_getClass(cls_name);
    Method m = c ? class_getInstanceMethod(c, sel_registerName(selector)) : NULL;
    if (!m) {
        PyErr_Format(PyExc_ValueError, "forward_imp_code: no instance method -[%s %s]", cls_name, selector);
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)(uintptr_t)method_getImplementation(m), n);
}

static PyMethodDef fp_methods[] = {
    {"forward_imp_code", py_forward_imp_code, METH_VARARGS,
     "forward_imp_code(class_name, selector, n) -> the first n (1..64) bytes of the method's implementation."},
    {"forward_probes", py_forward_probes, METH_NOARGS,
     "forward_probes() -> [(selector, type_encoding)] of class AGXForwardProbe (the forwarder's test signatures)."},
    {"forward_probe_call", py_forward_probe_call, METH_VARARGS,
     "forward_probe_call(i) -> None when probe i's arguments and return arrived bit for bit, else what changed."},
    {"forward_probe_race", py_forward_probe_race, METH_VARARGS,
     "forward_probe_race(i, threads, iterations) -> (counter updates seen, calls that arrived changed).\n"
     "Each call bumps one shared counter with a read-yield-write race."},
    {"forward_refused", py_forward_refused, METH_NOARGS,
     "forward_refused() -> [(selector, type_encoding, reason)]: methods of AGXForwardRefuse the forwarder refuses."},
    {"swizzle_force_forwarder", py_forward_force, METH_VARARGS,
     "swizzle_force_forwarder(on): new hooks use the general forwarder even where a typed wrapper exists."},
    {"forward_bench", py_forward_bench, METH_VARARGS,
     "forward_bench(class_name, calls, method='bench:with:') -> ns per call from C of -[class bench:with:]\n"
     "(v(u64,u64), a typed shape) or of -[class benchCopy:sourceOffset:...destinationOrigin:] (the shape of\n"
     "copyFromBuffer:...toTexture:..., which has none)."},
    {NULL, NULL, 0, NULL},
};

int agx_forward_probes_add_to_module(PyObject *m) { return PyModule_AddFunctions(m, fp_methods); }
