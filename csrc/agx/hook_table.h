/* hook_table.h: the AGX hook set as data, and installing it on the classes
 * that discovery found.
 *
 * One row per (class role, selector): the encoder, command-buffer and blit
 * selectors the seed fix guarded, plus the lifecycle points (encoder
 * factories, endEncoding, commit, dealloc). Installing applies every row to
 * every class discovery found for its role; a class that does not implement a
 * selector is skipped with the reason, never fatal. The same table serves
 * Metal and the driver model.
 *
 * Ends: every selector that ends an encoder (endEncoding, deferredEndEncoding)
 * is an END_ENCODER row on every encoder role (compute, blit, render,
 * parallel render, resource state, acceleration structure), and every
 * factory of those roles is a MAKE_ENCODER row, so lifecycle sees each end of each encoder it
 * tracks; an encoder from a factory the table does not hook is never
 * tracked, hence never ended by commit safety.
 *
 * Lock order (the rule every row follows):
 *   1. A hooked call holds its mode lock across the original, and may block
 *      inside it: commandBuffer waits for a free slot of its queue until a
 *      command buffer completes; waitUntilCompleted waits for completion.
 *   2. So nothing the driver runs to complete a command buffer may wait for a
 *      mode or region lock: the rows on the completion path (the command
 *      buffer's release, which frees its slot, and the encoders' dealloc) are
 *      AGX_ROW_UNLOCKED. Their bookkeeping (lifecycle.c) takes only
 *      lifecycle's own mutex, a leaf: held for a few loads and stores, never
 *      across a message send or another lock.
 *   3. This is safe for the encoders: lifecycle retains each tracked encoder
 *      from its factory to its end, so no dealloc can overlap a call on an
 *      encoder still in use. It relies on the driver's completion path being
 *      thread-safe by itself (Metal documents the queue as thread-safe; the
 *      driver model hands released objects back under its own mutex).
 * With 1-3, a thread that blocks for a slot or a completion while holding a
 * lock is always woken: the completion path it waits for takes no lock. */
#ifndef AGX_HOOK_TABLE_H
#define AGX_HOOK_TABLE_H

#include <stddef.h>
#include <stdint.h>

#include "discovery.h"

/* What a hooked call does besides taking the mode's lock (agx_swizzle
 * install kinds; lifecycle.c acts on them). */
enum {
    AGX_KIND_CALL = 0,        /* locked call, nothing else */
    AGX_KIND_MAKE_BUFFER,     /* queue -> command buffer: the buffer gets the queue's stream */
    AGX_KIND_MAKE_ENCODER,    /* command buffer -> encoder: stream, retain, count created */
    AGX_KIND_END_ENCODER,     /* endEncoding / deferredEndEncoding: count ended, release */
    AGX_KIND_COMMIT,          /* ends encoders still open on the buffer first */
    AGX_KIND_DEALLOC,         /* encoder destruction: forget it */
};

/* Row flags. */
#define AGX_ROW_OWN 1      /* only where a driver class implements it, never the root class's (release, dealloc) */
#define AGX_ROW_UNLOCKED 2 /* the driver's completion path: no mode lock (see "Lock order" above) */

typedef struct agx_hook_row {
    unsigned roles; /* 1 << agx_role, may name several */
    const char *selector;
    int kind;
    int flags;
} agx_hook_row;

extern const agx_hook_row agx_hook_rows[];
extern const size_t agx_hook_row_count;

/* One applied row: the report behind agxguard.hooks(). */
typedef struct agx_hook_report {
    const char *class_name;
    const char *selector;
    int role;
    int kind;
    int installed;          /* hooked now */
    char skipped[160];      /* why not, when not */
    int unlocked;           /* AGX_ROW_UNLOCKED: the call takes no mode lock */
} agx_hook_report;

/* Discover the driver's classes (first call per driver; later calls add the
 * classes found by name since) and install the table on them, leaving hooks
 * already installed as they are. Returns how many hooks were newly
 * installed, or -1 with err saying why nothing was installed (no device, no
 * runtime, ...). Another driver's hooks are removed first. The first install
 * of a driver also watches image loads (agx_watch_images): classes that
 * appear later are hooked as they come (agx_hooks_image_loaded). */
int agx_hooks_install(int driver, char *err, size_t errlen);
/* Look for classes known by name again (MPSCommandBuffer) and hook those
 * that appeared, without touching the others. Returns how many hooks are
 * new (0, with err saying why, when nothing is installed). */
int agx_hooks_rediscover(char *err, size_t errlen);
/* The image-load callback: safe with the runtime's or dyld's lock held (it
 * only bumps a counter and, when none is running, starts one detached
 * thread that runs agx_hooks_rediscover until no new load has come in). */
void agx_hooks_image_loaded(void);
typedef struct agx_hooks_image_stats {
    const char *mechanism;        /* how image loads reach us for the installed driver; NULL if none */
    uint64_t events;              /* image-load callbacks seen */
    uint64_t rediscoveries;       /* agx_hooks_rediscover runs (callbacks' worker and explicit) */
    uint64_t rediscovered_hooks;  /* hooks they added */
    int pending;                  /* a worker is running now */
} agx_hooks_image_stats;
void agx_hooks_images(agx_hooks_image_stats *out);
/* Remove every hook of the table; returns how many were removed. */
int agx_hooks_uninstall(void);
int agx_hooks_driver(void);          /* the installed driver, AGX_DRIVER_NONE if none */
size_t agx_hooks_report_count(void);
const agx_hook_report *agx_hooks_report(size_t i);
/* A copy of the report taken under the install lock (a rediscovery may be
 * rebuilding it on another thread): how many entries, at most `max`. */
#define AGX_HOOKS_REPORT_MAX 1024
size_t agx_hooks_report_snapshot(agx_hook_report *out, size_t max);
const agx_discovery *agx_hooks_discovery(void); /* the last driver discovered; NULL before any */

#endif
