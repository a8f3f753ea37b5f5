/* model_module.h: the binding files of agxguard._model. Each adds its
 * functions to the module and returns 0, or -1 with a Python exception set;
 * PyInit__model (model_module.c) calls each once. A new binding file adds its
 * function here and one call there. */
#ifndef AGX_MODEL_MODULE_H
#define AGX_MODEL_MODULE_H

#include <Python.h>

/* model_module.c: the driver model (model_*); with an Objective-C runtime. */
int agx_model_bindings_add_to_module(PyObject *m);
/* race_classes.c: classes with a planted race, the engine's shape probes,
 * and runtime introspection (objc_*, swizzle_probe*); with a runtime. */
int agx_race_classes_add_to_module(PyObject *m);
/* forward_probes.c: the general forwarder's test and benchmark classes
 * (forward_*, swizzle_force_forwarder); with a runtime. */
int agx_forward_probes_add_to_module(PyObject *m);
/* measure.c: what tests and benchmarks read or switch inside the product
 * (the lock's cost and knobs, region depth, the stream table); every build. */
int agx_measure_add_to_module(PyObject *m);

#endif
