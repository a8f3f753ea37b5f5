/* swizzle.h: a table-driven swizzle engine for any Objective-C class.
 *
 * guard(class, selector) replaces the method's implementation with a wrapper
 * of the method's ABI shape (read from its type encoding). Each wrapped call
 * takes the lock the current agxguard mode assigns to a driver call
 * (agx_lock_for(AGX_SITE_CALL, ...)), counts itself, calls the original, and
 * releases. The original is kept per (class, selector), so one selector hooked
 * on two classes calls the right original and subclasses that inherit a
 * hooked method go through it too. Hooking a class that only inherits the
 * method adds an override on that class which forwards to the superclass's
 * current implementation. */
#ifndef AGX_SWIZZLE_H
#define AGX_SWIZZLE_H

#include <stddef.h>
#include <stdint.h>

#include "objc_compat.h"

/* Methods whose shape has no typed wrapper go through the general forwarder
 * (forwarder.h, libffi): the same locking, exact arguments and return. */

/* Results of agx_swizzle_install. */
enum { AGX_SWZ_INSTALLED = 1, AGX_SWZ_ALREADY = 0, AGX_SWZ_ERROR = -1 };

/* Hook (class_name, selector). Returns AGX_SWZ_INSTALLED, AGX_SWZ_ALREADY (a
 * no-op), or AGX_SWZ_ERROR with a message naming the class, the selector and
 * (for an unsupported shape) its type encoding in err. Safe while other
 * threads call the method. */
int agx_swizzle_install(const char *class_name, const char *selector, char *err, size_t errlen);

/* As agx_swizzle_install, and tag the hook with `kind` (0: a plain locked
 * call). For a nonzero kind the wrapper reports the call to the observer
 * inside the lock: AGX_SWZ_BEFORE ahead of the original, AGX_SWZ_AFTER after
 * it with the return value's bits (integer/pointer returns; else 0). A
 * re-install sets the kind again. */
int agx_swizzle_install_kind(const char *class_name, const char *selector, int kind, char *err, size_t errlen);
enum { AGX_SWZ_BEFORE = 0, AGX_SWZ_AFTER = 1 };
/* Or'ed into `kind`: the wrapper counts the call and reports it to the
 * observer (with the flag cleared) but takes no mode lock, for methods on
 * the driver's completion path (see hook_table.h, "Lock order"). */
#define AGX_SWZ_NO_LOCK 0x10000
typedef void (*agx_swizzle_observer)(int kind, int phase, id self, uint64_t ret);
void agx_swizzle_set_observer(agx_swizzle_observer fn);

/* Unhook one selector, or every hooked selector of the class when selector is
 * NULL. Returns how many hooks were removed, or -1 with err set when the class
 * does not exist. */
int agx_swizzle_uninstall(const char *class_name, const char *selector, char *err, size_t errlen);

/* The fishhook-shaped form: install every entry of a table. */
typedef struct agx_hook_entry {
    const char *class_name;
    const char *selector;
    int result; /* out: as agx_swizzle_install */
} agx_hook_entry;
int agx_swizzle_install_table(agx_hook_entry *entries, size_t n, char *err, size_t errlen);

/* The shape key ("v(q3,q3)") for a method type encoding, or NULL with err set
 * (why it cannot be forwarded exactly). */
const char *agx_swizzle_shape_for(const char *types, char *err, size_t errlen);
/* The same for a named calling convention ("sysv-x86_64", "aapcs64",
 * "apple-arm64"; NULL: this build's), so that each ABI's rules can be tested
 * on any machine. Only the host's shapes have wrappers. */
const char *agx_swizzle_shape_for_abi(const char *types, const char *abi, char *err, size_t errlen);
const char *agx_swizzle_host_abi(void);

/* Streams: the lock key a receiver's calls use in `stream` mode. A receiver
 * with no registered key (and none from the resolver) uses its object lock.
 * The table has no fixed size (see swizzle.c); set_stream returns -1 only for
 * an address that cannot be an object (0, 1), and ends the process if memory
 * runs out with a shard full (a missing key would weaken stream mode). */
int agx_swizzle_set_stream(const void *object, uint64_t key);
/* Forget the object's key: called when it is deallocated (lifecycle.c). */
void agx_swizzle_clear_stream(const void *object);
int agx_swizzle_stream_of(const void *object, uint64_t *key);
/* The table's entry alone (no resolver, which would message the object). */
int agx_swizzle_stream_entry(const void *object, uint64_t *key);
typedef struct agx_stream_table_info {
    uint64_t entries, tombstones, capacity, bytes, removed, grows, rehashes;
} agx_stream_table_info;
void agx_swizzle_stream_table(agx_stream_table_info *out);
typedef int (*agx_stream_resolver)(const void *object, uint64_t *key);
/* Consulted when a receiver has no registered key (issue 4: encoder -> queue). */
void agx_swizzle_set_stream_resolver(agx_stream_resolver fn);

/* Installed hooks, for stats. */
typedef struct agx_hook_info {
    const char *class_name;
    const char *selector;
    const char *shape;
    int active;      /* currently hooked */
    int added;       /* override added on a class that inherited the method */
    uint64_t calls;  /* hooked calls since install or reset */
} agx_hook_info;
size_t agx_swizzle_hook_count(void);           /* slots ever bound */
int agx_swizzle_hook_info(size_t i, agx_hook_info *out);
void agx_swizzle_reset_counts(void);

/* Tests and benchmarks: while on, new hooks use the general forwarder even
 * where a typed wrapper exists (to compare the two on one method). */
void agx_swizzle_force_forwarder(int on);

/* Shape self-check (tests): for each shape, a probe method of that shape on
 * class AGXShapeProbe is called directly and through the engine's wrapper;
 * arguments and return values must match bit for bit. */
size_t agx_swizzle_shape_count(void);
const char *agx_swizzle_shape_key(size_t i);
const char *agx_swizzle_probe_selector(size_t i); /* on class AGXShapeProbe */
/* Returns 0 when the probe forwarded exactly, -1 with err when not. */
int agx_swizzle_probe_call(size_t i, char *err, size_t errlen);
Class agx_swizzle_probe_class(void);

#endif
