/* swizzle_shapes.h: the ABI shapes the swizzle engine can forward exactly.
 *
 * A shape is a return type and an argument list (after self and _cmd) over a
 * few canonical C types; each method's type encoding is reduced to one (see
 * swizzle.c). Every shape gets AGX_HOOK_SLOTS wrapper functions, one per
 * hooked (class, selector), each a real C function with the exact prototype,
 * so the compiler does the ABI work (registers, stack, by-value structs,
 * struct returns) and nothing is guessed.
 *
 * Canonical types (token -> C type):
 *   v   void (returns only)
 *   u64 any integer or pointer of at most 8 bytes (id, SEL, Class, char *, ...)
 *   f32 float     f64 double
 *   q2 q3 q4 q6   structs of 2/3/4/6 64-bit integers (NSRange, MTLSize/MTLOrigin,
 *                 -, MTLRegion)
 *   d2 d4         structs of 2/4 doubles (CGPoint/CGSize, MTLClearColor) */
#ifndef AGX_SWIZZLE_SHAPES_H
#define AGX_SWIZZLE_SHAPES_H

#include <stdint.h>

typedef void agx_t_v;
typedef uint64_t agx_t_u64;
typedef float agx_t_f32;
typedef double agx_t_f64;
typedef struct { uint64_t v[2]; } agx_t_q2;
typedef struct { uint64_t v[3]; } agx_t_q3;
typedef struct { uint64_t v[4]; } agx_t_q4;
typedef struct { uint64_t v[6]; } agx_t_q6;
typedef struct { double v[2]; } agx_t_d2;
typedef struct { double v[4]; } agx_t_d4;

/* X(name, RET, N, (ARG1,...,ARGN)): keep ARGS without spaces, the key string
 * "RET(ARGS)" is made from them. */
#define AGX_SHAPES(X)                                   \
    X(v_0, v, 0, ())                                    \
    X(u64_0, u64, 0, ())                                \
    X(f32_0, f32, 0, ())                                \
    X(f64_0, f64, 0, ())                                \
    X(q2_0, q2, 0, ())                                  \
    X(q3_0, q3, 0, ())                                  \
    X(q6_0, q6, 0, ())                                  \
    X(d2_0, d2, 0, ())                                  \
    X(d4_0, d4, 0, ())                                  \
    X(v_u, v, 1, (u64))                                 \
    X(u64_u, u64, 1, (u64))                             \
    X(q3_u, q3, 1, (u64))                               \
    X(q6_u, q6, 1, (u64))                               \
    X(v_f, v, 1, (f32))                                 \
    X(v_d, v, 1, (f64))                                 \
    X(f32_f, f32, 1, (f32))                             \
    X(f64_d, f64, 1, (f64))                             \
    X(v_q2, v, 1, (q2))                                 \
    X(v_q3, v, 1, (q3))                                 \
    X(v_q6, v, 1, (q6))                                 \
    X(v_d2, v, 1, (d2))                                 \
    X(v_d4, v, 1, (d4))                                 \
    X(v_q4, v, 1, (q4))                                 \
    X(v_uu, v, 2, (u64,u64))                            \
    X(u64_uu, u64, 2, (u64,u64))                        \
    X(v_uf, v, 2, (u64,f32))                            \
    X(v_ud, v, 2, (u64,f64))                            \
    X(f64_dd, f64, 2, (f64,f64))                        \
    X(v_q3q3, v, 2, (q3,q3))                            \
    X(v_uq2, v, 2, (u64,q2))                            \
    X(v_uuu, v, 3, (u64,u64,u64))                       \
    X(u64_uuu, u64, 3, (u64,u64,u64))                   \
    X(v_uq2u, v, 3, (u64,q2,u64))                       \
    X(v_q3q3u, v, 3, (q3,q3,u64))                       \
    X(v_uuq3, v, 3, (u64,u64,q3))                       \
    X(v_uuuu, v, 4, (u64,u64,u64,u64))                  \
    X(u64_uuuu, u64, 4, (u64,u64,u64,u64))              \
    X(v_q6uuu, v, 4, (q6,u64,u64,u64))                  \
    X(v_uuuuu, v, 5, (u64,u64,u64,u64,u64))             \
    X(v_uuuuuu, v, 6, (u64,u64,u64,u64,u64,u64))        \
    X(u64_uuuuuuuu, u64, 8, (u64,u64,u64,u64,u64,u64,u64,u64)) \
    X(v_uuuuuuuu, v, 8, (u64,u64,u64,u64,u64,u64,u64,u64)) \
    X(v_uuuq3q3uuuq3, v, 9, (u64,u64,u64,q3,q3,u64,u64,u64,q3)) \
    X(f64_dddddddddd, f64, 10, (f64,f64,f64,f64,f64,f64,f64,f64,f64,f64)) \
    X(f64_udfuq3dfu, f64, 8, (u64,f64,f32,u64,q3,f64,f32,u64))

/* Parameter lists by arity: declarations, types only, and the names. */
#define AGX_P0()
#define AGX_P1(a) , agx_t_##a a1
#define AGX_P2(a, b) AGX_P1(a), agx_t_##b a2
#define AGX_P3(a, b, c) AGX_P2(a, b), agx_t_##c a3
#define AGX_P4(a, b, c, d) AGX_P3(a, b, c), agx_t_##d a4
#define AGX_P5(a, b, c, d, e) AGX_P4(a, b, c, d), agx_t_##e a5
#define AGX_P6(a, b, c, d, e, f) AGX_P5(a, b, c, d, e), agx_t_##f a6
#define AGX_P7(a, b, c, d, e, f, g) AGX_P6(a, b, c, d, e, f), agx_t_##g a7
#define AGX_P8(a, b, c, d, e, f, g, h) AGX_P7(a, b, c, d, e, f, g), agx_t_##h a8
#define AGX_P9(a, b, c, d, e, f, g, h, i) AGX_P8(a, b, c, d, e, f, g, h), agx_t_##i a9
#define AGX_P10(a, b, c, d, e, f, g, h, i, j) AGX_P9(a, b, c, d, e, f, g, h, i), agx_t_##j a10

#define AGX_T0()
#define AGX_T1(a) , agx_t_##a
#define AGX_T2(a, b) AGX_T1(a), agx_t_##b
#define AGX_T3(a, b, c) AGX_T2(a, b), agx_t_##c
#define AGX_T4(a, b, c, d) AGX_T3(a, b, c), agx_t_##d
#define AGX_T5(a, b, c, d, e) AGX_T4(a, b, c, d), agx_t_##e
#define AGX_T6(a, b, c, d, e, f) AGX_T5(a, b, c, d, e), agx_t_##f
#define AGX_T7(a, b, c, d, e, f, g) AGX_T6(a, b, c, d, e, f), agx_t_##g
#define AGX_T8(a, b, c, d, e, f, g, h) AGX_T7(a, b, c, d, e, f, g), agx_t_##h
#define AGX_T9(a, b, c, d, e, f, g, h, i) AGX_T8(a, b, c, d, e, f, g, h), agx_t_##i
#define AGX_T10(a, b, c, d, e, f, g, h, i, j) AGX_T9(a, b, c, d, e, f, g, h, i), agx_t_##j

#define AGX_A0()
#define AGX_A1(a) , a1
#define AGX_A2(a, b) AGX_A1(a), a2
#define AGX_A3(a, b, c) AGX_A2(a, b), a3
#define AGX_A4(a, b, c, d) AGX_A3(a, b, c), a4
#define AGX_A5(a, b, c, d, e) AGX_A4(a, b, c, d), a5
#define AGX_A6(a, b, c, d, e, f) AGX_A5(a, b, c, d, e), a6
#define AGX_A7(a, b, c, d, e, f, g) AGX_A6(a, b, c, d, e, f), a7
#define AGX_A8(a, b, c, d, e, f, g, h) AGX_A7(a, b, c, d, e, f, g), a8
#define AGX_A9(a, b, c, d, e, f, g, h, i) AGX_A8(a, b, c, d, e, f, g, h), a9
#define AGX_A10(a, b, c, d, e, f, g, h, i, j) AGX_A9(a, b, c, d, e, f, g, h, i), a10

#define AGX_CAT_(a, b) a##b
#define AGX_CAT(a, b) AGX_CAT_(a, b)
#define AGX_STR_(x) #x
#define AGX_STR(x) AGX_STR_(x)

/* Wrapper slots per shape: how many (class, selector) pairs of one shape can
 * be hooked at once. */
#define AGX_HOOK_SLOTS 32
#define AGX_REPEAT_SLOTS(M, ...)                                                         \
    M(__VA_ARGS__, 0) M(__VA_ARGS__, 1) M(__VA_ARGS__, 2) M(__VA_ARGS__, 3)              \
    M(__VA_ARGS__, 4) M(__VA_ARGS__, 5) M(__VA_ARGS__, 6) M(__VA_ARGS__, 7)              \
    M(__VA_ARGS__, 8) M(__VA_ARGS__, 9) M(__VA_ARGS__, 10) M(__VA_ARGS__, 11)            \
    M(__VA_ARGS__, 12) M(__VA_ARGS__, 13) M(__VA_ARGS__, 14) M(__VA_ARGS__, 15)          \
    M(__VA_ARGS__, 16) M(__VA_ARGS__, 17) M(__VA_ARGS__, 18) M(__VA_ARGS__, 19)          \
    M(__VA_ARGS__, 20) M(__VA_ARGS__, 21) M(__VA_ARGS__, 22) M(__VA_ARGS__, 23)          \
    M(__VA_ARGS__, 24) M(__VA_ARGS__, 25) M(__VA_ARGS__, 26) M(__VA_ARGS__, 27)          \
    M(__VA_ARGS__, 28) M(__VA_ARGS__, 29) M(__VA_ARGS__, 30) M(__VA_ARGS__, 31)

#endif
