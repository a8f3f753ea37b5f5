/* fwd_tramp_test.c: the forwarder's trampoline (csrc/objc/fwd_tramp.c) alone,
 * without Objective-C or libffi, so that it also runs for arm64 under
 * qemu-user (tests/test_forwarder.py builds it natively, and with zig cc for
 * aarch64-linux when zig and qemu-aarch64 are there).
 *
 * Each case is a function with an exact C prototype; the test calls it
 * directly and through a stub of the trampoline, and compares the digest of
 * the arguments the function saw and the bits it returned. This file's
 * agx_fwd_enter and agx_fwd_exit stand in for the forwarder's: they overwrite
 * every argument and return register the ABI lets a callee change, so a
 * register the trampoline fails to save or restore changes the result.
 *
 *   cc -O2 -Icsrc/objc -Icsrc/guard -Icsrc/sync csrc/tests/fwd_tramp_test.c csrc/objc/fwd_tramp.c
 * Exit status 0 and "fwd_tramp_test: N cases ok" when every case matches. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fwd_tramp.h"

#if !AGX_FWD_TRAMP
int main(void) {
    puts("fwd_tramp_test: no trampoline on this architecture");
    return 0;
}
#else

/* ---- the stand-ins for forwarder.c's halves */
typedef struct {
    void *fn;
    uint64_t stack_bytes, x87;
} tcase;
static tcase cases[AGX_FWD_STUBS];
static unsigned long enters, exits;
static uint64_t last_ret0;

static void clobber(void) {
#if defined(__x86_64__)
    __asm__ volatile("mov $0x5a5a5a5a5a5a5a5a, %%rax\n mov %%rax, %%rdi\n mov %%rax, %%rsi\n mov %%rax, %%rdx\n"
                     "mov %%rax, %%rcx\n mov %%rax, %%r8\n mov %%rax, %%r9\n mov %%rax, %%r10\n mov %%rax, %%r11\n"
                     "movq %%rax, %%xmm0\n pshufd $0, %%xmm0, %%xmm0\n movaps %%xmm0, %%xmm1\n movaps %%xmm0, %%xmm2\n"
                     "movaps %%xmm0, %%xmm3\n movaps %%xmm0, %%xmm4\n movaps %%xmm0, %%xmm5\n movaps %%xmm0, %%xmm6\n"
                     "movaps %%xmm0, %%xmm7\n"
                     /* all 8 x87 registers: a value left on the x87 stack (not saved) is overwritten */
                     "fldz\n fldz\n fldz\n fldz\n fldz\n fldz\n fldz\n fldz\n"
                     "fstp %%st(0)\n fstp %%st(0)\n fstp %%st(0)\n fstp %%st(0)\n"
                     "fstp %%st(0)\n fstp %%st(0)\n fstp %%st(0)\n fstp %%st(0)\n"
                     ::: "rax", "rdi", "rsi", "rdx", "rcx", "r8", "r9", "r10", "r11", "xmm0", "xmm1", "xmm2", "xmm3",
                     "xmm4", "xmm5", "xmm6", "xmm7", "memory");
#else
    __asm__ volatile("mov x0, #0x5a5a\n mov x1, x0\n mov x2, x0\n mov x3, x0\n mov x4, x0\n mov x5, x0\n"
                     "mov x6, x0\n mov x7, x0\n mov x8, x0\n mov x9, x0\n mov x16, x0\n mov x17, x0\n"
                     "movi v0.16b, #0x5a\n movi v1.16b, #0x5a\n movi v2.16b, #0x5a\n movi v3.16b, #0x5a\n"
                     "movi v4.16b, #0x5a\n movi v5.16b, #0x5a\n movi v6.16b, #0x5a\n movi v7.16b, #0x5a\n"
                     ::: "x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9", "x16", "x17", "v0", "v1", "v2",
                     "v3", "v4", "v5", "v6", "v7", "memory");
#endif
}

void agx_fwd_enter(agx_fwd_call *c, uintptr_t stub, void *self) {
    size_t i = (size_t)(stub - (uintptr_t)agx_fwd_stubs) / AGX_FWD_STUB_SIZE;
    (void)self;
    c->orig = cases[i].fn;
    c->stack_bytes = cases[i].stack_bytes;
    c->x87 = cases[i].x87;
    enters++;
    clobber();
}

void agx_fwd_exit(agx_fwd_call *c) {
    last_ret0 = c->ret[0];
    exits++;
    clobber();
}

/* the forwarder's bound (forwarder.c, fwd_stack_bound): sizes and alignments
 * of the arguments after self and _cmd */
static uint64_t bound(int n, const size_t *size, const size_t *align) {
    uint64_t b = 0;
    for (int i = 0; i < n; i++) b += ((size[i] + 7) & ~(size_t)7) + (align[i] > 8 ? 8 : 0);
    return (b + 15) & ~(uint64_t)15;
}

static int next_stub = 0;
static void *stub_for(void *fn, uint64_t stack_bytes, uint64_t x87) {
    int i = next_stub;
    next_stub = (next_stub * 7 + 5) % AGX_FWD_STUBS; /* spread over the table: 0, 5, 40, 285, ... */
    cases[i] = (tcase){fn, stack_bytes, x87};
    return (void *)(uintptr_t)(agx_fwd_stubs + (size_t)i * AGX_FWD_STUB_SIZE);
}

/* ---- the digest the called function records */
static uint64_t seen;
static void mix(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) seen = (seen ^ b[i]) * 1099511628211ull;
    seen = seen * 31 + n;
}
#define H(x) mix(&(x), sizeof(x))

typedef struct { double a; int64_t b; } s16;                 /* SSE + INTEGER */
typedef struct { int64_t a, b, c; } s24;                     /* memory */
typedef struct { double a, b, c, d; } s32;                   /* an HFA on arm64, memory on x86-64 */
typedef struct { float a, b, c, d; } f4;                     /* HFA; two SSE eightbytes */
typedef struct { struct { char c; double d; } in; short s; int32_t i[3]; } s48n; /* nested, padding */
typedef struct { int64_t v[8]; } s64;
typedef struct { float x; int32_t y; } s8;
typedef struct { uint64_t a, b; } q2;                        /* two INTEGER eightbytes: rax:rdx, x0:x1 */

/* struct fields hashed one by one (never padding) */
static void h16(s16 v) { H(v.a); H(v.b); }
static void h48(s48n v) { H(v.in.c); H(v.in.d); H(v.s); H(v.i); }

typedef struct { void *self; void *cmd; } hdr;
#define SELF (void *)0x1234, (void *)0x5678

static uint64_t f_ints(void *s, void *c, uint64_t a, uint64_t b, uint64_t d, uint64_t e, uint64_t f, uint64_t g,
                       uint64_t h, uint64_t i, uint64_t j, uint64_t k) {
    H(s); H(c); H(a); H(b); H(d); H(e); H(f); H(g); H(h); H(i); H(j); H(k);
    return seen ^ 0x77;
}
static double f_mix(void *s, void *c, double a, int8_t b, float d, int16_t e, double f, uint32_t g, double h,
                    float i, double j, double k, double l, double m, double n, float o, int64_t p, double q) {
    H(s); H(c); H(a); H(b); H(d); H(e); H(f); H(g); H(h); H(i); H(j); H(k); H(l); H(m); H(n); H(o); H(p); H(q);
    return (double)(seen % 1000003) * 0.5;
}
static float f_narrow(void *s, void *c, char a, short b, float d, unsigned char e, int f, float g) {
    H(s); H(c); H(a); H(b); H(d); H(e); H(f); H(g);
    return (float)(seen % 4099) + 0.25f;
}
static s16 f_s16(void *s, void *c, s16 a, s8 b, s16 d) {
    H(s); H(c); h16(a); H(b.x); H(b.y); h16(d);
    return (s16){(double)(seen % 977), (int64_t)seen};
}
static s24 f_s24(void *s, void *c, s24 a, uint64_t b, s24 d) {
    H(s); H(c); H(a); H(b); H(d);
    return (s24){(int64_t)seen, 3, -(int64_t)seen};
}
static s32 f_s32(void *s, void *c, s32 a, double b, s32 d, f4 e) {
    H(s); H(c); H(a); H(b); H(d); H(e);
    return (s32){1.5, (double)(seen % 1009), -2.0, 0.125};
}
static f4 f_f4(void *s, void *c, f4 a, f4 b, f4 d) {
    H(s); H(c); H(a); H(b); H(d);
    return (f4){1.f, (float)(seen % 101), 3.f, -4.f};
}
static s48n f_s48(void *s, void *c, s48n a, uint64_t b, uint64_t d, uint64_t e, uint64_t f, uint64_t g, s48n h) {
    H(s); H(c); h48(a); H(b); H(d); H(e); H(f); H(g); h48(h);
    s48n r;
    memset(&r, 0, sizeof r);
    r.in.c = 7;
    r.in.d = (double)(seen % 31);
    r.i[2] = (int32_t)seen;
    return r;
}
static void f_s64(void *s, void *c, s64 a, double b, s64 d, float e) {
    H(s); H(c); H(a); H(b); H(d); H(e);
}
static long double f_ld(void *s, void *c, long double a, double b, long double d) {
    H(s); H(c); mix(&a, 10); H(b); mix(&d, 10);
    return (long double)(seen % 65521) / 3.0L;
}
static q2 f_q2(void *s, void *c, q2 a, uint64_t b, q2 d) {
    H(s); H(c); H(a); H(b); H(d);
    return (q2){seen, ~seen};
}
static uint8_t f_u8(void *s, void *c, uint8_t a) {
    H(s); H(c); H(a);
    return (uint8_t)(seen | 1);
}

/* Unwinding through the trampoline (its CFI), where glibc's unwinder is: a
 * backtrace from inside the original must reach the function that called the
 * stub (an exception thrown by the original crosses the same frames). */
#if defined(__GLIBC__)
#include <unwind.h>
static int unwind_found;
__attribute__((noinline)) uint64_t unwind_caller(uint64_t (*fn)(void *, void *, uint64_t));
static _Unwind_Reason_Code unwind_step(struct _Unwind_Context *ctx, void *arg) {
    (void)arg;
    if (_Unwind_FindEnclosingFunction((void *)_Unwind_GetIP(ctx)) == (void *)unwind_caller) unwind_found = 1;
    return _URC_NO_REASON;
}
static uint64_t f_unwind(void *s, void *c, uint64_t a) {
    (void)s, (void)c;
    _Unwind_Backtrace(unwind_step, NULL);
    return a + 1;
}
__attribute__((noinline)) uint64_t unwind_caller(uint64_t (*fn)(void *, void *, uint64_t)) {
    uint64_t r = fn(SELF, 41);
    __asm__ volatile("" ::: "memory"); /* not a tail call: this frame stays */
    return r;
}
#endif

static int failures, ncases;
static void check(const char *name, uint64_t seen_direct, uint64_t seen_tramp, const void *r1, const void *r2,
                  size_t rn) {
    ncases++;
    if (seen_direct != seen_tramp || (rn && memcmp(r1, r2, rn))) {
        printf("FAIL %s: arguments %s, return %s\n", name, seen_direct == seen_tramp ? "same" : "differ",
               rn && memcmp(r1, r2, rn) ? "differs" : "same");
        failures++;
    }
}

#define SZ(...) (size_t[]){__VA_ARGS__}

/* Call `fn` of type T with ARGS directly and through a stub; compare. */
#define CASE(name, T, fn, x87, rbytes, nargs, sizes, aligns, ...)                                     \
    do {                                                                                              \
        T direct = fn, via = (T)stub_for((void *)fn, bound(nargs, sizes, aligns), x87);               \
        for (int rep = 0; rep < 12; rep++) { /* 12 > the x87 stack's 8: an unbalanced one overflows */ \
            seen = 0;                                                                                 \
            __typeof__(direct(SELF, __VA_ARGS__)) r1 = direct(SELF, __VA_ARGS__);                     \
            uint64_t s1 = seen;                                                                       \
            seen = 0;                                                                                 \
            __typeof__(direct(SELF, __VA_ARGS__)) r2 = via(SELF, __VA_ARGS__);                        \
            check(name, s1, seen, &r1, &r2, rbytes);                                                  \
        }                                                                                             \
    } while (0)

#define VCASE(name, T, fn, nargs, sizes, aligns, ...)                            \
    do {                                                                         \
        T direct = fn, via = (T)stub_for((void *)fn, bound(nargs, sizes, aligns), 0); \
        seen = 0;                                                                \
        direct(SELF, __VA_ARGS__);                                               \
        uint64_t s1 = seen;                                                      \
        seen = 0;                                                                \
        via(SELF, __VA_ARGS__);                                                  \
        check(name, s1, seen, NULL, NULL, 0);                                    \
    } while (0)

int main(void) {
    int x87 = 0;
#if defined(__x86_64__)
    x87 = 1; /* long double comes back in st0 */
#endif
    s16 a16 = {-2.5, 0x0102030405060708LL}, b16 = {1e300, -7};
    s8 a8 = {3.25f, -9};
    s24 a24 = {1, -2, 3}, b24 = {0x7fffffffffffffffLL, 0, -1};
    s32 a32 = {1.0, -2.0, 3.5, 1e-300}, b32 = {4, 5, 6, 7};
    f4 fa = {1.5f, -2.5f, 3.5f, 4.5f}, fb = {0.1f, 0.2f, 0.3f, 0.4f}, fc = {-1, -2, -3, -4};
    s48n a48, b48;
    memset(&a48, 0, sizeof a48);
    memset(&b48, 0, sizeof b48);
    a48.in.c = 'x', a48.in.d = 2.75, a48.s = -3, a48.i[0] = 1, a48.i[1] = 2, a48.i[2] = 3;
    b48.in.c = 'y', b48.in.d = -1e10, b48.s = 30000, b48.i[0] = -1, b48.i[1] = -2, b48.i[2] = -3;
    s64 a64, b64;
    for (int i = 0; i < 8; i++) a64.v[i] = i * 0x1111111111LL, b64.v[i] = -i - 1;

    typedef uint64_t (*T_ints)(void *, void *, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                               uint64_t, uint64_t, uint64_t);
    CASE("10 integers (stack arguments)", T_ints, f_ints, 0, 8, 10, SZ(8, 8, 8, 8, 8, 8, 8, 8, 8, 8),
         SZ(8, 8, 8, 8, 8, 8, 8, 8, 8, 8), 1, 2, 3, 4, 5, 6, 7, 8, 0xfffffffffffffffeULL, 10);
    typedef double (*T_mix)(void *, void *, double, int8_t, float, int16_t, double, uint32_t, double, float, double,
                            double, double, double, double, float, int64_t, double);
    CASE("16 mixed, 12 floating (stack arguments)", T_mix, f_mix, 0, 8, 16,
         SZ(8, 1, 4, 2, 8, 4, 8, 4, 8, 8, 8, 8, 8, 4, 8, 8), SZ(8, 1, 4, 2, 8, 4, 8, 4, 8, 8, 8, 8, 8, 4, 8, 8),
         1.5, -3, 2.5f, -300, 1e-200, 4000000000u, -0.0, 7.25f, 9.5, 10.5, 11.5, 12.5, 13.5, 14.5f, -99, 15.5);
    typedef float (*T_narrow)(void *, void *, char, short, float, unsigned char, int, float);
    CASE("narrow char/short/float", T_narrow, f_narrow, 0, 4, 6, SZ(1, 2, 4, 1, 4, 4), SZ(1, 2, 4, 1, 4, 4), -5, -300,
         0.5f, 250, -70000, 3.5f);
    typedef s16 (*T_s16)(void *, void *, s16, s8, s16);
    CASE("16/8-byte structs, 16-byte return", T_s16, f_s16, 0, sizeof(s16), 3, SZ(16, 8, 16), SZ(8, 4, 8), a16, a8,
         b16);
    typedef s24 (*T_s24)(void *, void *, s24, uint64_t, s24);
    CASE("24-byte structs, memory return", T_s24, f_s24, 0, sizeof(s24), 3, SZ(24, 8, 24), SZ(8, 8, 8), a24, 42,
         b24);
    typedef s32 (*T_s32)(void *, void *, s32, double, s32, f4);
    CASE("32-byte structs and HFA, 32-byte return", T_s32, f_s32, 0, sizeof(s32), 4, SZ(32, 8, 32, 16),
         SZ(8, 8, 8, 4), a32, 0.5, b32, fa);
    typedef f4 (*T_f4)(void *, void *, f4, f4, f4);
    CASE("float HFAs, HFA return", T_f4, f_f4, 0, sizeof(f4), 3, SZ(16, 16, 16), SZ(4, 4, 4), fa, fb, fc);
    typedef s48n (*T_s48)(void *, void *, s48n, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, s48n);
    CASE("48-byte nested structs around 5 integers", T_s48, f_s48, 0, 0, 7, SZ(48, 8, 8, 8, 8, 8, 48),
         SZ(8, 8, 8, 8, 8, 8, 8), a48, 1, 2, 3, 4, 5, b48);
    typedef void (*T_s64)(void *, void *, s64, double, s64, float);
    VCASE("64-byte structs", T_s64, f_s64, 4, SZ(64, 8, 64, 4), SZ(8, 8, 8, 4), a64, 2.0, b64, 1.5f);
    typedef long double (*T_ld)(void *, void *, long double, double, long double);
    CASE("long double", T_ld, f_ld, x87, 10, 3, SZ(sizeof(long double), 8, sizeof(long double)),
         SZ(_Alignof(long double), 8, _Alignof(long double)), 1.25L, -3.5, 1e-4000L);
    typedef q2 (*T_q2)(void *, void *, q2, uint64_t, q2);
    CASE("NSRange-like q2 arguments and return", T_q2, f_q2, 0, sizeof(q2), 3, SZ(16, 8, 16), SZ(8, 8, 8),
         ((q2){5, 6}), 7, ((q2){0x8000000000000000ULL, 9}));
    typedef uint8_t (*T_u8)(void *, void *, uint8_t);
    CASE("uint8_t return", T_u8, f_u8, 0, 1, 1, SZ(1), SZ(1), 200);

#if defined(__GLIBC__)
    unwind_found = 0;
    if (unwind_caller(f_unwind) != 42 || !unwind_found) {
        printf("FAIL unwinding: a backtrace from the original %s the stub's caller\n",
               unwind_found ? "reached" : "did not reach");
        failures++;
    }
    unwind_found = 0;
    uint64_t (*via_unwind)(void *, void *, uint64_t) = (uint64_t(*)(void *, void *, uint64_t))stub_for((void *)f_unwind, 16, 0);
    ncases++;
    if (unwind_caller(via_unwind) != 42 || !unwind_found) {
        printf("FAIL unwinding through the trampoline: the backtrace %s the stub's caller\n",
               unwind_found ? "reached" : "did not reach");
        failures++;
    }
#endif
    if (enters != exits || enters == 0) {
        printf("FAIL: %lu enters, %lu exits\n", enters, exits);
        failures++;
    }
    if (failures) {
        printf("fwd_tramp_test: %d of %d cases failed\n", failures, ncases);
        return 1;
    }
    printf("fwd_tramp_test: %d cases ok (%lu calls through the trampoline)\n", ncases, enters);
    return 0;
}
#endif
