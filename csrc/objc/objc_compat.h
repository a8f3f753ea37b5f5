/* objc_compat.h: the only place where Apple's and GCC's GNU Objective-C
 * runtimes differ for agxguard. Everything else in csrc/objc uses the runtime's
 * public C API plus the few macros below. */
#ifndef AGX_OBJC_COMPAT_H
#define AGX_OBJC_COMPAT_H

#include <objc/runtime.h>
#include <stddef.h>

#if defined(__APPLE__)
#include <objc/message.h>
/* Apple has objc_msgSend, but calling it through a cast per call site is what
 * the IMP lookup below does anyway; one lookup path keeps both runtimes alike. */
#define AGX_OBJC_RUNTIME_NAME "apple"
static inline IMP agx_objc_lookup(id receiver, SEL sel) {
    return class_getMethodImplementation(object_getClass(receiver), sel);
}
/* `long` is encoded as 'l' with size 4 on Apple (LP64 uses 'q' for long). */
#define AGX_ENC_LONG_SIZE 4
#else
#include <objc/message.h>
#define AGX_OBJC_RUNTIME_NAME "gnu"
/* GNU libobjc has no objc_msgSend: look the IMP up and call it. */
static inline IMP agx_objc_lookup(id receiver, SEL sel) { return objc_msg_lookup(receiver, sel); }
/* GNU encodes C `long` as 'l' with the C size. */
#define AGX_ENC_LONG_SIZE ((int)sizeof(long))
#endif

/* Before changing a method's implementation on a class that may never have
 * been messaged: GCC's runtime builds a class's dispatch table on its first
 * message, and a method_setImplementation before that was seen to reach
 * another such class's table too (two classes sharing a selector and an
 * IMP, each hooked before its first message, both dispatched to the second
 * hook). Looking the method up installs the table first. Apple's runtime
 * needs nothing (and a lookup there would send +initialize). */
#if defined(__APPLE__)
static inline void agx_objc_prepare_dispatch(Class cls, SEL sel) { (void)cls, (void)sel; }
#else
static inline void agx_objc_prepare_dispatch(Class cls, SEL sel) { (void)class_getMethodImplementation(cls, sel); }
#endif

/* Arguments past the register file: Apple arm64 packs narrow stack arguments
 * to their natural size, so a wrapper that widens them to 64 bits would read
 * the wrong bytes; x86-64 SysV and AAPCS64 on Linux use 8-byte stack slots.
 * The classifier's ABI table (swizzle.c, agx_abis) holds the rule per ABI. */

/* A root class needs its own `isa` slot so that per-instance storage
 * (object_getIndexedIvars) starts after it on both runtimes. */
static inline int agx_objc_add_isa_ivar(Class root) {
    return class_addIvar(root, "isa", sizeof(Class), sizeof(Class) == 8 ? 3 : 2, "#") ? 0 : -1;
}

static inline void agx_objc_initialize_nothing(id cls, SEL cmd) { (void)cls; (void)cmd; }

/* A new root class (not yet registered), ready for both runtimes: its isa
 * slot, and a +initialize that does nothing. Apple's runtime sends
 * +initialize to every class on its first message or IMP lookup
 * (class_getMethodImplementation included); a root class that does not
 * answer it is an unrecognized selector, i.e. a crash on first use. GCC's
 * runtime looks +initialize up and skips it when absent, so only Apple needs
 * it; both get it (docs/apple-runtime.md). Nil if the name is taken. */
static inline Class agx_objc_new_root_class(const char *name) {
    Class c = objc_allocateClassPair(Nil, name, 0);
    if (!c) return Nil;
    if (agx_objc_add_isa_ivar(c) < 0 ||
        !class_addMethod(object_getClass((id)c), sel_registerName("initialize"), (IMP)agx_objc_initialize_nothing,
                         "v@:")) {
        objc_disposeClassPair(c);
        return Nil;
    }
    return c;
}

#endif
