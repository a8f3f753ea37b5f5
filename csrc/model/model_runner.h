/* model_runner.h: agxguard's side of the driver model: the model's hook set,
 * and the op pattern of a PyTorch MPS op run from native threads. This file
 * knows agxguard (regions, streams, the hook set), through the product's C
 * API only (model_capi.h); the model itself does not. */
#ifndef AGX_MODEL_RUNNER_H
#define AGX_MODEL_RUNNER_H

#include <stddef.h>
#include <stdint.h>

typedef struct agx_run_options {
    int threads;
    int iterations;      /* ops per thread */
    int shared_queue;    /* one command queue for all threads, else one each */
    int region;          /* wrap each op in a region, as `with agxguard.guard():` */
    int internal_every;  /* every Nth op of a thread takes the internal dispatch path (0: never) */
    uint64_t length;     /* floats per buffer */
} agx_run_options;

typedef struct agx_run_result {
    uint64_t ops;
    uint64_t internal_ops;
    double seconds;
    uint64_t mismatches; /* elements that differ from the reference */
} agx_run_result;

/* The AGX hook set on the model's classes (hook_table.h, driver "model"):
 * how many were newly installed, or -1 with err. */
int agx_model_hook(char *err, size_t errlen);
int agx_model_unhook(void);

/* Runs the op pattern from `threads` native threads (call without the GIL).
 * 0, or -1 with err. */
int agx_model_run(const agx_run_options *o, agx_run_result *r, char *err, size_t errlen);

/* One op on queue `queue` (made on first use): y = a*x + y over `length`
 * floats, through the internal path when `internal`; `end` 0 commits with
 * the encoder still open. 1 if the result is right, 0 if not, -1 with err.
 * Call without the GIL. */
int agx_model_run_op(int queue, float a, uint64_t length, int internal, int end, char *err, size_t errlen);

/* One message to a driver-model object, for tests that script the driver
 * selector by selector: `receiver` is an object the model made (from
 * agx_model_device() or an earlier send; anything else is undefined), the
 * method's arguments and return must all be objects or integers (n <= 4).
 * 0 and *ret (0 for a void method), or -1 with err (no such method, wrong
 * argument count, a type that is not an object or integer). Goes through any
 * hook. Call without the GIL: a driver call may block. */
int agx_model_send(uint64_t receiver, const char *selector, const uint64_t *args, int n, uint64_t *ret, char *err,
                   size_t errlen);

/* The stream key the runner gives queue i. */
uint64_t agx_model_stream_key(int queue);

#endif
