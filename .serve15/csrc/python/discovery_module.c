/* discovery_module.c: Python bindings for rediscovery, Metal's device list,
 * and the driver model's images, debug layer and live-object counts (added
 * to agxguard._C by agx_objc_add_to_module). */
#ifdef AGX_HAVE_OBJC /* the whole file: built only with an Objective-C runtime */
#include "discovery_module.h"

#include <string.h>

#include "discovery.h"
#include "driver_model.h"
#include "hook_table.h"
#include "model_debug_layer.h"
#include "model_images.h"

static PyObject *py_hooks_rediscover(PyObject *self, PyObject *unused) {
    char err[256] = "";
    int n;
    Py_BEGIN_ALLOW_THREADS n = agx_hooks_rediscover(err, sizeof err);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *py_hooks_images(PyObject *self, PyObject *unused) {
    agx_hooks_image_stats s;
    agx_hooks_images(&s);
    return Py_BuildValue("{s:z,s:K,s:K,s:K,s:O}", "mechanism", s.mechanism, "events",
                         (unsigned long long)s.events, "rediscoveries", (unsigned long long)s.rediscoveries,
                         "rediscovered_hooks", (unsigned long long)s.rediscovered_hooks, "pending",
                         s.pending ? Py_True : Py_False);
}

static PyObject *py_metal_devices(PyObject *self, PyObject *unused) {
    char names[16][128];
    int n;
    Py_BEGIN_ALLOW_THREADS n = agx_metal_devices(names, 16);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(0);
    for (int i = 0; list && i < n && i < 16; i++) {
        PyObject *s = PyUnicode_FromString(names[i]);
        if (!s || PyList_Append(list, s) < 0) { Py_XDECREF(s); Py_CLEAR(list); break; }
        Py_DECREF(s);
    }
    return list;
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
static PyMethodDef methods[] = {
    {"hooks_rediscover", py_hooks_rediscover, METH_NOARGS,
     "hooks_rediscover() -> int: look for classes known by name again and hook those that appeared."},
    {"hooks_images", py_hooks_images, METH_NOARGS,
     "hooks_images() -> {mechanism, events, rediscoveries, rediscovered_hooks, pending}: image-load watching."},
    {"metal_devices", py_metal_devices, METH_NOARGS,
     "metal_devices() -> [class name]: the Metal devices present (MTLCopyAllDevices); [] off macOS."},
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

int agx_discovery_add_to_module(PyObject *m) { return PyModule_AddFunctions(m, methods); }

#endif /* AGX_HAVE_OBJC */
