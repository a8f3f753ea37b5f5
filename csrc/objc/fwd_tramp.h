/* fwd_tramp.h: the forwarder's register-passing trampoline (fwd_tramp.c), on
 * x86-64 (System V: Linux, macOS) and arm64 (AAPCS64: macOS, Linux).
 *
 * The general forwarder (forwarder.c) describes a method's signature with
 * libffi. Forwarding each call through a libffi closure and ffi_call costs
 * about 100 ns here, most of it spent classifying and copying the arguments
 * twice (decode in the closure, encode in ffi_call). The trampoline does not
 * look at the arguments at all: it saves every register that can carry an
 * argument (x86-64: rdi rsi rdx rcx r8 r9, rax (the vector count of variadic
 * calls), r10, xmm0-7; arm64: x0-x8 (x8: where a large struct return goes),
 * q0-q7), calls agx_fwd_enter (C: the hook's entry path, the mode's lock;
 * it names the original and how many bytes of stack arguments to pass on),
 * restores the registers, copies that many bytes from its caller's stack
 * arguments to its own outgoing ones, calls the original, saves every
 * register that can carry a return value (x86-64: rax rdx xmm0 xmm1, and the
 * x87 stack when the return is a long double; arm64: x0 x1 q0-q3), calls
 * agx_fwd_exit (C: the observer, the release), restores them and returns. So
 * the original gets exactly what the caller passed, and the caller exactly
 * what the original returned, whatever the signature: the ABI knowledge here
 * is which registers carry arguments and results and where stack arguments
 * start, not how each type is classified (libffi still describes and checks
 * the signature, and says how large its arguments are).
 *
 * The byte count to copy is an upper bound of the stack arguments (every
 * argument after self and _cmd, each rounded up to 8 bytes, plus 8 for one
 * aligned to 16): copying more than the caller passed reads the caller's own
 * frame and hands the original bytes it ignores. Signatures whose bound passes
 * AGX_FWD_TRAMP_MAX_STACK keep the libffi closure, as does everything once the
 * AGX_FWD_STUBS stubs are taken and every build on another architecture.
 *
 * A stub per hooked method (a table of AGX_FWD_STUBS in the text segment, no
 * code written at run time, so it works under macOS's hardened runtime) puts
 * its own address in a scratch register (x86-64 r11, arm64 x16) and jumps to
 * the shared body; agx_fwd_enter finds the method's forwarder by the stub's
 * index. Not for use outside csrc/objc. */
#ifndef AGX_FWD_TRAMP_H
#define AGX_FWD_TRAMP_H

#include <stdint.h>

#include "guard.h"

/* Only with the forwarder (libffi describes the signature; AGX_HAVE_FFI=0 builds
 * have neither); the standalone test defines no AGX_HAVE_FFI and gets it. */
#if (defined(__x86_64__) || defined(__aarch64__)) && !defined(AGX_FWD_NO_TRAMP) && \
    (!defined(AGX_HAVE_FFI) || AGX_HAVE_FFI)
#define AGX_FWD_TRAMP 1
#else
#define AGX_FWD_TRAMP 0
#endif

#define AGX_FWD_STUBS 1024            /* as many as the engine has forwarder slots */
#define AGX_FWD_TRAMP_MAX_STACK 1024  /* bytes of stack arguments a trampoline copies at most */
#if defined(__x86_64__) || defined(__ARM_FEATURE_BTI_DEFAULT)
#define AGX_FWD_STUB_SIZE 16 /* x86-64 (with endbr64 under CET); arm64 with a BTI landing pad */
#else
#define AGX_FWD_STUB_SIZE 8
#endif

/* One call's state, in the trampoline's frame (AGX_FWD_CALL_SIZE bytes; the
 * offsets are the assembly's, checked by static asserts in fwd_tramp.c). */
typedef struct agx_fwd_call {
    uint64_t ret[2];       /*  0: the original's integer return registers (rax rdx / x0 x1) */
    void *orig;            /* 16: set by agx_fwd_enter: the implementation to call */
    uint64_t stack_bytes;  /* 24: set by agx_fwd_enter: stack argument bytes to copy, a multiple of 16 */
    uint64_t x87;          /* 32: set by agx_fwd_enter: x87 registers the return uses (x86-64: 0 or 1) */
    void *fwd;             /* 40: the forwarder (C's) */
    void *self;            /* 48 */
    int in, kind;          /* 56 */
    agx_entry e;           /* 64 */
} agx_fwd_call;
#define AGX_FWD_CALL_SIZE 128

/* The C halves, called by the trampoline's body (forwarder.c). `stub` is the
 * address the stub put in its scratch register. */
void agx_fwd_enter(agx_fwd_call *c, uintptr_t stub, void *self) AGX_HIDDEN;
void agx_fwd_exit(agx_fwd_call *c) AGX_HIDDEN;

/* The stub table: stub i is at agx_fwd_stubs + i * AGX_FWD_STUB_SIZE. */
extern const char agx_fwd_stubs[] AGX_HIDDEN;

#endif
