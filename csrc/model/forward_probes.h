/* forward_probes.h: test classes for the general forwarder (forward_probes.c)
 * and their Python bindings: forward_probes, forward_probe_call,
 * forward_probe_race, forward_refused, swizzle_force_forwarder, forward_bench. */
#ifndef AGX_FORWARD_PROBES_H
#define AGX_FORWARD_PROBES_H

#include <Python.h>

/* Add the bindings to module m; 0, or -1 with a Python error. */
int agx_forward_probes_add_to_module(PyObject *m);

#endif
