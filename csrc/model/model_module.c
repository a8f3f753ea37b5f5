/* model_module.c: the CPython module agxguard._model, the lab's C: the
 * driver model (configure it, run its op pattern from native threads, send
 * it single messages, load its images, switch its debug layer, count its
 * live objects) and the fixtures that measure the product (race_classes.c,
 * measure.c). It is not part of the product: `import agxguard` never loads
 * it, and agxguard._C includes and links nothing of it.
 *
 * It reaches the product only through the C API of agxguard._C (capi.h),
 * imported at init, and registers the model there as the provider of the
 * "model" driver, so that agxguard.install("model") and AGXGUARD_DRIVER=model
 * find it. Each binding file adds its functions with one
 * `agx_*_add_to_module(PyObject *m)` call in PyInit__model below. Every
 * native run releases the GIL.
 *
 * Without an Objective-C runtime (AGXGUARD_NO_OBJC=1, or none found) only
 * the measuring fixtures (measure.c) are built, HAVE_MODEL is False, and the
 * model's own files are not compiled (setup.py MODEL_NATIVE). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "model_capi.h"
#include "model_module.h"

#ifdef AGX_HAVE_OBJC /* the driver model and the hooks' side of it */
#include "driver_model.h"
#include "model_debug_layer.h"
#include "model_images.h"
#include "model_runner.h"

static PyObject *config_dict(const agx_model_config *c) {
    return Py_BuildValue("{s:O,s:O,s:O,s:O,s:i,s:i}", "context_race", c->context_race ? Py_True : Py_False,
                         "encoder_recycle", c->encoder_recycle ? Py_True : Py_False, "buffer_recycle",
                         c->buffer_recycle ? Py_True : Py_False, "bypass", c->bypass ? Py_True : Py_False,
                         "window_spins", c->window_spins, "window_yields", c->window_yields);
}

static int model_ready(void) {
    if (agx_model_init() < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the driver model could not be created (class names taken?)");
        return -1;
    }
    return 0;
}

static PyObject *py_model_configure(PyObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"context_race", "encoder_recycle", "buffer_recycle", "bypass",
                            "window_spins", "window_yields", NULL};
    if (model_ready() < 0) return NULL;
    agx_model_config c;
    agx_model_get_config(&c);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|ppppii:model_configure", names, &c.context_race,
                                     &c.encoder_recycle, &c.buffer_recycle, &c.bypass, &c.window_spins,
                                     &c.window_yields))
        return NULL;
    if (c.window_spins < 0 || c.window_yields < 0) {
        PyErr_SetString(PyExc_ValueError, "window_spins and window_yields must be >= 0");
        return NULL;
    }
    agx_model_configure(&c);
    return config_dict(&c);
}

static PyObject *py_model_config(PyObject *self, PyObject *unused) {
    agx_model_config c;
    agx_model_get_config(&c);
    return config_dict(&c);
}

static PyObject *py_model_hook(PyObject *self, PyObject *unused) {
    if (model_ready() < 0) return NULL;
    char err[512];
    int n = agx_model_hook(err, sizeof err);
    if (n < 0) { PyErr_SetString(PyExc_RuntimeError, err); return NULL; }
    return PyLong_FromLong(n);
}

static PyObject *py_model_unhook(PyObject *self, PyObject *unused) { return PyLong_FromLong(agx_model_unhook()); }

static PyObject *py_model_run(PyObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"threads", "iterations", "shared_queue", "region", "internal_every", "length", NULL};
    agx_run_options o = {8, 100, 1, 1, 4, 256};
    unsigned long long length = o.length;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii|ppiK:model_run", names, &o.threads, &o.iterations,
                                     &o.shared_queue, &o.region, &o.internal_every, &length))
        return NULL;
    o.length = length;
    if (model_ready() < 0) return NULL;
    agx_run_result r;
    char err[256];
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = agx_model_run(&o, &r, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_SetString(PyExc_ValueError, err); return NULL; }
    return Py_BuildValue("{s:K,s:K,s:d,s:K,s:O}", "ops", (unsigned long long)r.ops, "internal_ops",
                         (unsigned long long)r.internal_ops, "seconds", r.seconds, "mismatches",
                         (unsigned long long)r.mismatches, "result_ok", r.mismatches ? Py_False : Py_True);
}

static PyObject *py_model_run_op(PyObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"queue", "a", "length", "internal", "end_encoding", NULL};
    int queue = 0, internal = 0, end = 1;
    float a = 2.0f;
    unsigned long long length = 256;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|ifKpp:model_run_op", names, &queue, &a, &length, &internal, &end))
        return NULL;
    if (model_ready() < 0) return NULL;
    char err[256];
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = agx_model_run_op(queue, a, length, internal, end, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_SetString(PyExc_ValueError, err); return NULL; }
    return PyBool_FromLong(rc);
}

static PyObject *py_model_classes(PyObject *self, PyObject *unused) {
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:s,s:s,s:s}", "device", agx_model_device_class, "command_queue",
                         agx_model_queue_class, "command_buffer", agx_model_cmdbuf_class, "compute_encoder",
                         agx_model_compute_class, "blit_encoder", agx_model_blit_class, "buffer",
                         agx_model_buffer_class, "pipeline", agx_model_pipeline_class);
}

static PyObject *py_model_stream_key(PyObject *self, PyObject *args) {
    int q;
    if (!PyArg_ParseTuple(args, "i:model_stream_key", &q)) return NULL;
    return PyLong_FromUnsignedLongLong(agx_model_stream_key(q));
}

static PyObject *py_model_device(PyObject *self, PyObject *unused) {
    if (model_ready() < 0) return NULL;
    return PyLong_FromUnsignedLongLong((uint64_t)(uintptr_t)agx_model_device());
}

static PyObject *py_model_send(PyObject *self, PyObject *args) {
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n < 2 || n > 6) {
        PyErr_SetString(PyExc_TypeError, "model_send(receiver, selector, *args) takes 0..4 integer arguments");
        return NULL;
    }
    unsigned long long receiver = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(args, 0));
    if (PyErr_Occurred()) return NULL;
    const char *sel = PyUnicode_AsUTF8(PyTuple_GET_ITEM(args, 1));
    if (!sel) return NULL;
    uint64_t a[4] = {0};
    for (Py_ssize_t i = 2; i < n; i++) {
        a[i - 2] = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(args, i));
        if (PyErr_Occurred()) return NULL;
    }
    if (model_ready() < 0) return NULL;
    uint64_t ret;
    char err[256];
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = agx_model_send(receiver, sel, a, (int)(n - 2), &ret, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_SetString(PyExc_ValueError, err); return NULL; }
    return PyLong_FromUnsignedLongLong(ret);
}

static PyObject *py_model_load_image(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s:model_load_image", &name)) return NULL;
    char err[256];
    int rc;
    /* the image-load callbacks run here: without the GIL, as a dlopen would */
    Py_BEGIN_ALLOW_THREADS rc = agx_model_load_image(name, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_SetString(PyExc_ValueError, err); return NULL; }
    return PyBool_FromLong(rc);
}

static PyObject *py_model_images(PyObject *self, PyObject *unused) {
    PyObject *d = PyDict_New();
    for (int i = 0; d && agx_model_image_names[i]; i++)
        if (PyDict_SetItemString(d, agx_model_image_names[i],
                                 agx_model_image_loaded(agx_model_image_names[i]) ? Py_True : Py_False) < 0)
            Py_CLEAR(d);
    return d;
}

static PyObject *py_model_debug_layer(PyObject *self, PyObject *args) {
    PyObject *on = Py_None;
    if (!PyArg_ParseTuple(args, "|O:model_debug_layer", &on)) return NULL;
    int was = agx_model_debug_layer_enabled();
    if (on != Py_None) {
        int v = PyObject_IsTrue(on);
        if (v < 0) return NULL;
        agx_model_set_debug_layer(v);
    }
    return PyBool_FromLong(was);
}

static PyObject *py_model_live_objects(PyObject *self, PyObject *unused) {
    /* counted once the model's GPU is idle: its completion thread releases
     * encoders and buffers after waitUntilCompleted may have returned */
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = agx_model_wait_idle();
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the driver model's completion thread did not go idle (a hang)");
        return NULL;
    }
    PyObject *d = PyDict_New();
    for (int k = 0; d && k < AGX_LIVE_KINDS; k++) {
        PyObject *v = PyLong_FromLong(atomic_load(&agx_model_live[k]));
        if (!v || PyDict_SetItemString(d, agx_model_live_names[k], v) < 0) Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return d;
}

static PyObject *py_model_mps_run_op(PyObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"queue", "a", "length", NULL};
    int queue = 0;
    float a = 2.0f;
    unsigned long long length = 256;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|ifK:model_mps_run_op", names, &queue, &a, &length)) return NULL;
    char err[256];
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = agx_model_mps_run_op(queue, a, length, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_SetString(PyExc_ValueError, err); return NULL; }
    return PyBool_FromLong(rc);
}

#define KW (PyCFunction)(void (*)(void))
static PyMethodDef model_methods[] = {
    {"model_configure", KW py_model_configure, METH_VARARGS | METH_KEYWORDS,
     "model_configure(**bugs_and_window) -> the driver model's configuration."},
    {"model_config", py_model_config, METH_NOARGS, "model_config() -> the driver model's configuration."},
    {"model_hook", py_model_hook, METH_NOARGS, "model_hook() -> int: install the model's hook set."},
    {"model_unhook", py_model_unhook, METH_NOARGS, "model_unhook() -> int: remove it."},
    {"model_run", KW py_model_run, METH_VARARGS | METH_KEYWORDS,
     "model_run(threads, iterations, shared_queue=True, region=True, internal_every=4, length=256) -> dict."},
    {"model_run_op", KW py_model_run_op, METH_VARARGS | METH_KEYWORDS,
     "model_run_op(queue=0, a=2.0, length=256, internal=False, end_encoding=True) -> bool (result correct)."},
    {"model_classes", py_model_classes, METH_NOARGS, "model_classes() -> the model's class names."},
    {"model_stream_key", py_model_stream_key, METH_VARARGS, "model_stream_key(queue) -> the runner's key."},
    {"model_device", py_model_device, METH_NOARGS, "model_device() -> int: the driver model's device (its address)."},
    {"model_send", py_model_send, METH_VARARGS,
     "model_send(receiver, selector, *args) -> int: one message to a driver-model object (an address from "
     "model_device() or an earlier model_send; anything else is undefined), objects and integers only, GIL "
     "released; ValueError when the method does not exist or has another shape."},
    {"model_load_image", py_model_load_image, METH_VARARGS,
     "model_load_image(name) -> bool: load the driver model's image ('mps'); False if it already was."},
    {"model_images", py_model_images, METH_NOARGS, "model_images() -> {name: loaded}: the model's images."},
    {"model_debug_layer", py_model_debug_layer, METH_VARARGS,
     "model_debug_layer(on=None) -> bool: whether the model's debug layer was on; sets it when on is given."},
    {"model_live_objects", py_model_live_objects, METH_NOARGS,
     "model_live_objects() -> {kind: count}: model objects handed out and not given back, once the model's\n"
     "completion thread is idle."},
    {"model_mps_run_op", KW py_model_mps_run_op, METH_VARARGS | METH_KEYWORDS,
     "model_mps_run_op(queue=0, a=2.0, length=256) -> bool: one op through an MPS command buffer."},
    {NULL, NULL, 0, NULL},
};

int agx_model_bindings_add_to_module(PyObject *m) { return PyModule_AddFunctions(m, model_methods); }

/* After the model is registered: agxguard.hooks installs the hook set on it
 * now when AGXGUARD_DRIVER=model asked for that before the model had loaded. */
static int tell_hooks(void) {
    PyObject *hooks = PyImport_ImportModule("agxguard.hooks");
    if (hooks == NULL) return -1;
    PyObject *r = PyObject_CallMethod(hooks, "_driver_registered", "s", "model");
    Py_DECREF(hooks);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}
#endif /* AGX_HAVE_OBJC */

static struct PyModuleDef model_module_def = {
    PyModuleDef_HEAD_INIT, "agxguard._model",
    "agxguard's lab in C: the driver model (a test double for Apple's AGX driver) and the fixtures that\n"
    "measure the product. Not part of the product: import agxguard never loads it.",
    -1, NULL,
};

PyMODINIT_FUNC PyInit__model(void) {
    const agx_capi *capi = PyCapsule_Import(AGX_CAPI_NAME, 0);
    if (capi == NULL) return NULL;
    char err[256];
    if (agx_model_use_capi(capi, err, sizeof err) < 0) {
        PyErr_SetString(PyExc_ImportError, err);
        return NULL;
    }
    PyObject *m = PyModule_Create(&model_module_def);
    if (m == NULL) return NULL;
    /* one line per binding file (model_module.h) */
    if (agx_measure_add_to_module(m) < 0) goto fail;
#ifdef AGX_HAVE_OBJC
    if (agx_model_bindings_add_to_module(m) < 0) goto fail;
    if (agx_race_classes_add_to_module(m) < 0) goto fail;
    if (agx_forward_probes_add_to_module(m) < 0) goto fail;
    if (PyModule_AddObjectRef(m, "HAVE_MODEL", Py_True) < 0) goto fail;
    if (tell_hooks() < 0) goto fail;
#else
    if (PyModule_AddObjectRef(m, "HAVE_MODEL", Py_False) < 0) goto fail;
#endif
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
