/* objc_module.c: Python bindings for the swizzle engine and the AGX hook set
 * (added to agxguard._C by agx_objc_add_to_module): what the product uses.
 * The driver model and the lab's fixtures (race classes, the shape probes,
 * stream-table introspection) are agxguard._model's (csrc/model). Hooked
 * calls made with the GIL held release it while they wait. */
#ifdef AGX_HAVE_OBJC /* the whole file: built only with an Objective-C runtime */
#include "objc_module.h"

#include <string.h>

#include "discovery_module.h"
#include "hook_table.h"
#include "lifecycle.h"
#include "swizzle.h"

/* ---------------------------------------------------------------- swizzle */

static PyObject *py_swizzle_install(PyObject *self, PyObject *args) {
    const char *cls, *sel;
    if (!PyArg_ParseTuple(args, "ss:swizzle_install", &cls, &sel)) return NULL;
    char err[512];
    int r = agx_swizzle_install(cls, sel, err, sizeof err);
    if (r < 0) { PyErr_SetString(PyExc_ValueError, err); return NULL; }
    return PyLong_FromLong(r);
}

static PyObject *py_swizzle_uninstall(PyObject *self, PyObject *args) {
    const char *cls, *sel = NULL;
    if (!PyArg_ParseTuple(args, "s|z:swizzle_uninstall", &cls, &sel)) return NULL;
    char err[512];
    int r = agx_swizzle_uninstall(cls, sel, err, sizeof err);
    if (r < 0) { PyErr_SetString(PyExc_ValueError, err); return NULL; }
    return PyLong_FromLong(r);
}

static PyObject *py_swizzle_hooks(PyObject *self, PyObject *unused) {
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    size_t n = agx_swizzle_hook_count();
    for (size_t i = 0; i < n; i++) {
        agx_hook_info in;
        if (agx_swizzle_hook_info(i, &in) < 0) break;
        PyObject *d = Py_BuildValue("{s:s,s:s,s:s,s:O,s:O,s:K}", "class", in.class_name, "selector", in.selector,
                                    "shape", in.shape, "active", in.active ? Py_True : Py_False, "added",
                                    in.added ? Py_True : Py_False, "calls", (unsigned long long)in.calls);
        if (!d || PyList_Append(list, d) < 0) { Py_XDECREF(d); Py_DECREF(list); return NULL; }
        Py_DECREF(d);
    }
    return list;
}

static PyObject *py_swizzle_reset_counts(PyObject *self, PyObject *unused) {
    agx_swizzle_reset_counts();
    Py_RETURN_NONE;
}

static PyObject *py_swizzle_shape_for(PyObject *self, PyObject *args) {
    const char *types, *abi = NULL;
    if (!PyArg_ParseTuple(args, "s|z:swizzle_shape_for", &types, &abi)) return NULL;
    char err[256];
    const char *k = agx_swizzle_shape_for_abi(types, abi, err, sizeof err);
    if (!k) { PyErr_SetString(PyExc_ValueError, err); return NULL; }
    return PyUnicode_FromString(k);
}

/* ------------------------------------------------------------ hook set */

static const char *const kind_names[] = {"call", "make_buffer", "make_encoder", "end_encoder", "commit", "dealloc"};

static int driver_from_name(const char *name) {
    for (int d = 1; d < 3; d++)
        if (!strcmp(name, agx_driver_names[d])) return d;
    PyErr_Format(PyExc_ValueError, "unknown driver %s (allowed: metal, model)", name);
    return -1;
}

static PyObject *py_hooks_driver_present(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s:hooks_driver_present", &name)) return NULL;
    int driver = driver_from_name(name);
    if (driver < 0) return NULL;
    return PyBool_FromLong(agx_driver_present(driver));
}

static PyObject *py_hooks_install(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s:hooks_install", &name)) return NULL;
    int driver = driver_from_name(name);
    if (driver < 0) return NULL;
    char err[512];
    int n;
    /* discovery and hooking run driver code that may take agxguard locks */
    Py_BEGIN_ALLOW_THREADS n = agx_hooks_install(driver, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (n < 0) { PyErr_SetString(PyExc_RuntimeError, err); return NULL; }
    return PyLong_FromLong(n);
}

static PyObject *py_hooks_uninstall(PyObject *self, PyObject *unused) {
    int n;
    Py_BEGIN_ALLOW_THREADS n = agx_hooks_uninstall();
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *py_hooks_driver(PyObject *self, PyObject *unused) {
    int d = agx_hooks_driver();
    if (!d) Py_RETURN_NONE;
    return PyUnicode_FromString(agx_driver_names[d]);
}

static PyObject *py_hooks_report(PyObject *self, PyObject *unused) {
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    agx_hook_report *snap = PyMem_Malloc(AGX_HOOKS_REPORT_MAX * sizeof *snap);
    if (!snap) { Py_DECREF(list); return PyErr_NoMemory(); }
    size_t n = agx_hooks_report_snapshot(snap, AGX_HOOKS_REPORT_MAX);
    for (size_t i = 0; i < n; i++) {
        const agx_hook_report *e = &snap[i];
        PyObject *d = Py_BuildValue("{s:s,s:s,s:s,s:s,s:O,s:z}", "class", e->class_name, "selector", e->selector,
                                    "role", agx_role_names[e->role], "kind", kind_names[e->kind], "installed",
                                    e->installed ? Py_True : Py_False, "skipped",
                                    e->installed ? NULL : e->skipped);
        if (!d || PyList_Append(list, d) < 0) { Py_XDECREF(d); Py_DECREF(list); PyMem_Free(snap); return NULL; }
        Py_DECREF(d);
    }
    PyMem_Free(snap);
    return list;
}

static PyObject *py_hooks_discovery(PyObject *self, PyObject *unused) {
    const agx_discovery *d = agx_hooks_discovery();
    if (!d) Py_RETURN_NONE;
    PyObject *classes = PyDict_New(), *notes = PyDict_New();
    if (!classes || !notes) goto fail;
    for (int r = 0; r < AGX_ROLE_COUNT; r++) {
        PyObject *l = PyList_New(0);
        if (!l) goto fail;
        for (int k = 0; k < d->n[r]; k++) {
            PyObject *n = PyUnicode_FromString(class_getName(d->classes[r][k]));
            if (!n || PyList_Append(l, n) < 0) { Py_XDECREF(n); Py_DECREF(l); goto fail; }
            Py_DECREF(n);
        }
        int bad = PyDict_SetItemString(classes, agx_role_names[r], l);
        Py_DECREF(l);
        if (bad) goto fail;
        if (d->notes[r][0]) {
            PyObject *n = PyUnicode_FromString(d->notes[r]);
            bad = !n || PyDict_SetItemString(notes, agx_role_names[r], n) < 0;
            Py_XDECREF(n);
            if (bad) goto fail;
        }
    }
    return Py_BuildValue("{s:s,s:s,s:s,s:i,s:s,s:N,s:N}", "driver", agx_driver_names[d->driver], "device_class",
                         d->device_class, "base_device_class", d->base_device_class, "layers", d->layers, "how",
                         d->how, "classes", classes, "notes", notes);
fail:
    Py_XDECREF(classes);
    Py_XDECREF(notes);
    return NULL;
}

static PyObject *py_hooks_lifecycle(PyObject *self, PyObject *unused) {
    agx_lifecycle_counts c;
    agx_lifecycle_read(&c);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "encoders_created", (unsigned long long)c.created,
                         "encoders_ended", (unsigned long long)c.ended, "forced_ends",
                         (unsigned long long)c.forced_ends, "encoders_open", (unsigned long long)c.open,
                         "retained", (unsigned long long)c.retained, "freed_open",
                         (unsigned long long)c.freed_open, "untracked", (unsigned long long)c.untracked,
                         "abandoned", (unsigned long long)c.abandoned);
}

static PyObject *py_hooks_reset_lifecycle(PyObject *self, PyObject *unused) {
    agx_lifecycle_reset_counts();
    Py_RETURN_NONE;
}

static PyObject *py_hooks_table(PyObject *self, PyObject *unused) {
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (size_t i = 0; i < agx_hook_row_count; i++) {
        const agx_hook_row *row = &agx_hook_rows[i];
        PyObject *roles = PyList_New(0);
        if (!roles) { Py_DECREF(list); return NULL; }
        for (int r = 0; r < AGX_ROLE_COUNT; r++) {
            if (!(row->roles & (1u << r))) continue;
            PyObject *n = PyUnicode_FromString(agx_role_names[r]);
            if (!n || PyList_Append(roles, n) < 0) { Py_XDECREF(n); Py_DECREF(roles); Py_DECREF(list); return NULL; }
            Py_DECREF(n);
        }
        PyObject *d = Py_BuildValue("{s:s,s:N,s:s,s:O,s:O}", "selector", row->selector, "roles", roles, "kind",
                                    kind_names[row->kind], "own_only", (row->flags & AGX_ROW_OWN) ? Py_True : Py_False,
                                    "unlocked", (row->flags & AGX_ROW_UNLOCKED) ? Py_True : Py_False);
        if (!d || PyList_Append(list, d) < 0) { Py_XDECREF(d); Py_DECREF(list); return NULL; }
        Py_DECREF(d);
    }
    return list;
}

static PyMethodDef objc_methods[] = {
    {"swizzle_install", py_swizzle_install, METH_VARARGS,
     "swizzle_install(class_name, selector) -> int: 1 installed, 0 already installed."},
    {"swizzle_uninstall", py_swizzle_uninstall, METH_VARARGS,
     "swizzle_uninstall(class_name, selector=None) -> int: hooks removed."},
    {"swizzle_hooks", py_swizzle_hooks, METH_NOARGS, "swizzle_hooks() -> list of dicts, one per hook slot."},
    {"swizzle_reset_counts", py_swizzle_reset_counts, METH_NOARGS, "Zero the hooks' call counts."},
    {"swizzle_shape_for", py_swizzle_shape_for, METH_VARARGS,
     "swizzle_shape_for(type_encoding, abi=None) -> shape key; ValueError when no wrapper forwards it exactly.\n"
     "abi: 'sysv-x86_64', 'aapcs64' or 'apple-arm64' (None: this build's)."},
    {"hooks_driver_present", py_hooks_driver_present, METH_VARARGS,
     "hooks_driver_present(driver) -> bool: whether 'metal' or 'model' can be discovered now ('model': once\n"
     "agxguard._model, which is not part of the product, has loaded and registered it)."},
    {"hooks_install", py_hooks_install, METH_VARARGS,
     "hooks_install(driver) -> int: discover 'metal' or 'model' and install the AGX hook set; RuntimeError says why not."},
    {"hooks_uninstall", py_hooks_uninstall, METH_NOARGS, "hooks_uninstall() -> int: hooks removed."},
    {"hooks_driver", py_hooks_driver, METH_NOARGS, "hooks_driver() -> 'metal' | 'model' | None (installed now)."},
    {"hooks_report", py_hooks_report, METH_NOARGS,
     "hooks_report() -> [{class, selector, role, kind, installed, skipped}] of the last install."},
    {"hooks_discovery", py_hooks_discovery, METH_NOARGS,
     "hooks_discovery() -> {driver, device_class, classes, notes} of the last discovery, or None."},
    {"hooks_lifecycle", py_hooks_lifecycle, METH_NOARGS, "hooks_lifecycle() -> encoder lifecycle counters."},
    {"hooks_reset_lifecycle", py_hooks_reset_lifecycle, METH_NOARGS, "Zero the lifecycle counters (not `open`)."},
    {"hooks_table", py_hooks_table, METH_NOARGS, "hooks_table() -> the AGX hook set's rows."},
    {NULL, NULL, 0, NULL},
};

int agx_objc_add_to_module(PyObject *m) {
    if (PyModule_AddFunctions(m, objc_methods) < 0) return -1;
    if (agx_discovery_add_to_module(m) < 0) return -1;
    if (PyModule_AddStringConstant(m, "OBJC_RUNTIME", AGX_OBJC_RUNTIME_NAME) < 0) return -1;
    if (PyModule_AddObjectRef(m, "METAL_SUPPORTED", agx_metal_supported() ? Py_True : Py_False) < 0) return -1;
    return 0;
}

#endif /* AGX_HAVE_OBJC */
