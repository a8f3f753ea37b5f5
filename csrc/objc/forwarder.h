/* forwarder.h: the swizzle engine's general forwarder, for methods whose ABI
 * shape has no typed wrapper in swizzle_shapes.h.
 *
 * The method's type encoding (method_getTypeEncoding) is turned into a libffi
 * call description: scalars, pointers, objects, selectors, and structs by
 * value (nested, with arrays inside) of any size and field mix. On x86-64 and
 * arm64 a stub of the trampoline (fwd_tramp.h) becomes the method's
 * implementation: it passes every argument and return register through
 * untouched around the engine's entry path (swizzle_hook.h: count, the mode's
 * lock, the observer), so no argument is classified or copied per call (about
 * 14 ns over the unhooked call here instead of libffi's 100). Elsewhere, and
 * with AGXGUARD_FORWARDER=libffi, a libffi closure with that description is
 * the implementation: each call runs the same entry path, then calls the
 * original with the same arguments through ffi_call; libffi does the ABI work
 * (which register or stack slot each argument and the return use), as the
 * compiler does for the typed wrappers. AGXGUARD_FORWARDER (read at each
 * install): unset, empty or "trampoline", or "libffi"; any other value is
 * refused naming it.
 *
 * What it refuses, with the reason: unions, bit-fields, arrays passed as
 * arguments, opaque or empty structs, _Complex, unknown type codes, malformed
 * encodings, structs nested deeper than AGX_TYPE_MAX_DEPTH. A variadic method
 * cannot be told from its encoding (neither Apple's nor GCC's compiler marks
 * it), so it cannot be refused here: its declared arguments would be
 * forwarded and the variadic ones lost (the typed wrappers share this limit).
 *
 * Built only where libffi is (AGX_HAVE_FFI=1, set by setup.py); without it
 * every call refuses with "built without libffi". */
#ifndef AGX_FORWARDER_H
#define AGX_FORWARDER_H

#include <stddef.h>

#include "objc_compat.h"

struct agx_hook_slot;

/* Whether this build has the forwarder (libffi). */
int agx_forwarder_available(void);

/* Build a stub (or a closure) forwarding a method of encoding `types` through
 * `slot` (its entry path and its original). Returns its code pointer, to
 * become the method's implementation, and writes a description of the
 * signature ("ffi v@:@Q{?=QQ}": the encoding without frame offsets) into
 * desc; or NULL with why saying what cannot be described. The closure lives
 * as long as the process (a thread may still be running it after uninstall). */
IMP agx_forwarder_make(struct agx_hook_slot *slot, const char *types, char *desc, size_t desclen, char *why,
                       size_t whylen);

/* A closure for a wrapper layer (no hook, no lock): each call sends the same
 * message, with the same arguments, to redirect(self) (an object: a void *
 * so that capi.h, which has no Objective-C types, can hand it on) and
 * returns its result. NULL with why as above. Lives as long as the process. */
IMP agx_forwarder_make_redirect(void *(*redirect)(void *self), const char *types, char *why, size_t whylen);

/* Check only: 0 when the forwarder can describe `types`, else -1 with why. */
int agx_forwarder_check(const char *types, char *why, size_t whylen);

#endif
