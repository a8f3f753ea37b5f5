/* fwd_tramp.c: the forwarder's trampoline (see fwd_tramp.h), as top-level
 * assembly for x86-64 and arm64, ELF and Mach-O. Nothing else lives here, so
 * the standalone test (csrc/tests/fwd_tramp_test.c) can link it with its own
 * agx_fwd_enter and agx_fwd_exit. */
#include "fwd_tramp.h"

#include <stddef.h>

#if AGX_FWD_TRAMP

_Static_assert(offsetof(agx_fwd_call, ret) == 0, "the trampoline stores the return registers at 0");
_Static_assert(offsetof(agx_fwd_call, orig) == 16, "the trampoline reads orig at 16");
_Static_assert(offsetof(agx_fwd_call, stack_bytes) == 24, "the trampoline reads stack_bytes at 24");
_Static_assert(offsetof(agx_fwd_call, x87) == 32, "the trampoline reads x87 at 32");
_Static_assert(sizeof(agx_fwd_call) <= AGX_FWD_CALL_SIZE, "the trampoline keeps 128 bytes for the call");
_Static_assert(AGX_FWD_STUBS == 1024, "the stub table below has 1024 stubs");

#if defined(__APPLE__)
#define SYM(x) "_" #x
#define GLOBAL_HIDDEN(x) ".globl " SYM(x) "\n.private_extern " SYM(x) "\n"
#define FUNC_TYPE(x) ""
#define FUNC_SIZE(x) ""
#else
#define SYM(x) #x
#define GLOBAL_HIDDEN(x) ".globl " SYM(x) "\n.hidden " SYM(x) "\n"
#if defined(__x86_64__)
#define FUNC_TYPE(x) ".type " SYM(x) ",@function\n"
#else
#define FUNC_TYPE(x) ".type " SYM(x) ",%function\n"
#endif
#define FUNC_SIZE(x) ".size " SYM(x) ", . - " SYM(x) "\n"
#endif

#if defined(__x86_64__)
#if defined(__CET__)
#define ENDBR "endbr64\n"
#else
#define ENDBR ""
#endif
/* Frame, from %rbp: the call (agx_fwd_call) at -128, the integer argument
 * registers at -192 (rdi rsi rdx rcx r8 r9 rax r10), xmm0-7 at -320; after the
 * call xmm0 and xmm1 go back to -320 and -304 and an x87 return to -288. */
__asm__(".text\n"
        ".p2align 4\n"
        GLOBAL_HIDDEN(agx_fwd_stubs)
        SYM(agx_fwd_stubs) ":\n"
        ".rept 1024\n"
        ENDBR
        "lea 0(%rip), %r11\n"
        "jmp " SYM(agx_fwd_body) "\n"
        ".p2align 4\n"
        ".endr\n"
        "\n"
        ".p2align 4\n"
        FUNC_TYPE(agx_fwd_body)
        SYM(agx_fwd_body) ":\n"
        ".cfi_startproc\n"
        "pushq %rbp\n"
        ".cfi_def_cfa_offset 16\n"
        ".cfi_offset %rbp, -16\n"
        "movq %rsp, %rbp\n"
        ".cfi_def_cfa_register %rbp\n"
        "subq $320, %rsp\n"
        "movq %rdi, -192(%rbp)\n"
        "movq %rsi, -184(%rbp)\n"
        "movq %rdx, -176(%rbp)\n"
        "movq %rcx, -168(%rbp)\n"
        "movq %r8, -160(%rbp)\n"
        "movq %r9, -152(%rbp)\n"
        "movq %rax, -144(%rbp)\n"
        "movq %r10, -136(%rbp)\n"
        "movups %xmm0, -320(%rbp)\n"
        "movups %xmm1, -304(%rbp)\n"
        "movups %xmm2, -288(%rbp)\n"
        "movups %xmm3, -272(%rbp)\n"
        "movups %xmm4, -256(%rbp)\n"
        "movups %xmm5, -240(%rbp)\n"
        "movups %xmm6, -224(%rbp)\n"
        "movups %xmm7, -208(%rbp)\n"
        /* agx_fwd_enter(call, stub, self) */
        "movq %rdi, %rdx\n"
        "movq %r11, %rsi\n"
        "leaq -128(%rbp), %rdi\n"
        "call " SYM(agx_fwd_enter) "\n"
        /* the stack arguments: stack_bytes (a multiple of 16) from the caller's, at 16(%rbp) */
        "movq -104(%rbp), %rcx\n"
        "subq %rcx, %rsp\n"
        "testq %rcx, %rcx\n"
        "jz 2f\n"
        "1:\n"
        "subq $8, %rcx\n" /* 8 bytes at a time, as callers store them: no failed store forwarding */
        "movq 16(%rbp,%rcx), %r11\n"
        "movq %r11, (%rsp,%rcx)\n"
        "jnz 1b\n"
        "2:\n"
        "movq -192(%rbp), %rdi\n"
        "movq -184(%rbp), %rsi\n"
        "movq -176(%rbp), %rdx\n"
        "movq -168(%rbp), %rcx\n"
        "movq -160(%rbp), %r8\n"
        "movq -152(%rbp), %r9\n"
        "movq -144(%rbp), %rax\n"
        "movq -136(%rbp), %r10\n"
        "movups -320(%rbp), %xmm0\n"
        "movups -304(%rbp), %xmm1\n"
        "movups -288(%rbp), %xmm2\n"
        "movups -272(%rbp), %xmm3\n"
        "movups -256(%rbp), %xmm4\n"
        "movups -240(%rbp), %xmm5\n"
        "movups -224(%rbp), %xmm6\n"
        "movups -208(%rbp), %xmm7\n"
        "call *-112(%rbp)\n"
        /* the results */
        "movq %rax, -128(%rbp)\n"
        "movq %rdx, -120(%rbp)\n"
        "movups %xmm0, -320(%rbp)\n"
        "movups %xmm1, -304(%rbp)\n"
        "cmpq $0, -96(%rbp)\n"
        "je 3f\n"
        "fstpt -288(%rbp)\n"
        "3:\n"
        /* agx_fwd_exit(call) */
        "leaq -128(%rbp), %rdi\n"
        "call " SYM(agx_fwd_exit) "\n"
        "cmpq $0, -96(%rbp)\n"
        "je 4f\n"
        "fldt -288(%rbp)\n"
        "4:\n"
        "movq -128(%rbp), %rax\n"
        "movq -120(%rbp), %rdx\n"
        "movups -320(%rbp), %xmm0\n"
        "movups -304(%rbp), %xmm1\n"
        "leave\n"
        ".cfi_def_cfa %rsp, 8\n"
        "ret\n"
        ".cfi_endproc\n"
        FUNC_SIZE(agx_fwd_body)
        ".text\n");

#elif defined(__aarch64__)
#if defined(__ARM_FEATURE_BTI_DEFAULT)
/* Built for branch target identification: an indirect call may only land on a
 * BTI instruction, and the object is marked as keeping that rule. */
#define BTI_C "hint #34\n"
#define STUB_ALIGN ".p2align 4\n"
#else
#define BTI_C ""
#define STUB_ALIGN ""
#endif
/* Frame, from x29: the call (agx_fwd_call) at -128, x0-x8 at -208, q0-q7 at
 * -336; after the call q0-q3 go back to -336..-304 (HFA returns use v0-v3). */
__asm__(".text\n"
        ".p2align 4\n"
        GLOBAL_HIDDEN(agx_fwd_stubs)
        SYM(agx_fwd_stubs) ":\n"
        ".rept 1024\n"
        BTI_C
        "adr x16, .\n"
        "b " SYM(agx_fwd_body) "\n"
        STUB_ALIGN
        ".endr\n"
        "\n"
        ".p2align 3\n"
        FUNC_TYPE(agx_fwd_body)
        SYM(agx_fwd_body) ":\n"
        ".cfi_startproc\n"
        "stp x29, x30, [sp, #-16]!\n"
        ".cfi_def_cfa_offset 16\n"
        ".cfi_offset x30, -8\n"
        ".cfi_offset x29, -16\n"
        "mov x29, sp\n"
        ".cfi_def_cfa x29, 16\n"
        "sub sp, sp, #336\n"
        "stp x0, x1, [x29, #-208]\n"
        "stp x2, x3, [x29, #-192]\n"
        "stp x4, x5, [x29, #-176]\n"
        "stp x6, x7, [x29, #-160]\n"
        "str x8, [x29, #-144]\n"
        "stp q0, q1, [x29, #-336]\n"
        "stp q2, q3, [x29, #-304]\n"
        "stp q4, q5, [x29, #-272]\n"
        "stp q6, q7, [x29, #-240]\n"
        /* agx_fwd_enter(call, stub, self) */
        "mov x2, x0\n"
        "mov x1, x16\n"
        "sub x0, x29, #128\n"
        "bl " SYM(agx_fwd_enter) "\n"
        /* the stack arguments: stack_bytes (a multiple of 16) from the caller's, at x29 + 16 */
        "ldur x9, [x29, #-104]\n"
        "sub sp, sp, x9\n"
        "cbz x9, 2f\n"
        "add x10, x29, #16\n"
        "mov x11, sp\n"
        "1:\n"
        "ldp x12, x13, [x10], #16\n"
        "stp x12, x13, [x11], #16\n"
        "subs x9, x9, #16\n"
        "b.ne 1b\n"
        "2:\n"
        "ldp x0, x1, [x29, #-208]\n"
        "ldp x2, x3, [x29, #-192]\n"
        "ldp x4, x5, [x29, #-176]\n"
        "ldp x6, x7, [x29, #-160]\n"
        "ldr x8, [x29, #-144]\n"
        "ldp q0, q1, [x29, #-336]\n"
        "ldp q2, q3, [x29, #-304]\n"
        "ldp q4, q5, [x29, #-272]\n"
        "ldp q6, q7, [x29, #-240]\n"
        "ldur x16, [x29, #-112]\n"
        "blr x16\n"
        /* the results */
        "stp x0, x1, [x29, #-128]\n"
        "stp q0, q1, [x29, #-336]\n"
        "stp q2, q3, [x29, #-304]\n"
        /* agx_fwd_exit(call) */
        "sub x0, x29, #128\n"
        "bl " SYM(agx_fwd_exit) "\n"
        "ldp x0, x1, [x29, #-128]\n"
        "ldp q0, q1, [x29, #-336]\n"
        "ldp q2, q3, [x29, #-304]\n"
        "mov sp, x29\n"
        "ldp x29, x30, [sp], #16\n"
        ".cfi_def_cfa sp, 0\n"
        ".cfi_restore x30\n"
        ".cfi_restore x29\n"
        "ret\n"
        ".cfi_endproc\n"
        FUNC_SIZE(agx_fwd_body)
        ".text\n");
#endif

#else
/* No trampoline on this architecture: the forwarder uses libffi closures. */
typedef int agx_fwd_tramp_unused;
#endif
