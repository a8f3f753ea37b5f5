/* objc_module.c: Python bindings for the swizzle engine and the driver model
 * (added to agxguard._C by agx_objc_add_to_module). Every native run releases
 * the GIL; hooked calls made with the GIL held release it while they wait. */
#ifdef AGX_HAVE_OBJC /* the whole file: built only with an Objective-C runtime */
#include "objc_module.h"
#include "start_gate.h"

#include <pthread.h>
#include <sched.h>
#include <string.h>

#include "discovery_module.h"
#include "driver_model.h"
#include "hook_table.h"
#include "lifecycle.h"
#include "model_runner.h"
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

static PyObject *py_swizzle_host_abi(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(agx_swizzle_host_abi());
}

static PyObject *py_swizzle_probes(PyObject *self, PyObject *unused) {
    size_t n = agx_swizzle_shape_count();
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list) return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(ss)", agx_swizzle_shape_key(i), agx_swizzle_probe_selector(i));
        if (!t) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

static PyObject *py_swizzle_probe_call(PyObject *self, PyObject *args) {
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "n:swizzle_probe_call", &i)) return NULL;
    char err[256];
    int r;
    Py_BEGIN_ALLOW_THREADS r = agx_swizzle_probe_call((size_t)i, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (r < 0) return PyUnicode_FromString(err);
    Py_RETURN_NONE;
}

static PyObject *py_objc_method_imp(PyObject *self, PyObject *args) {
    const char *cls, *sel;
    if (!PyArg_ParseTuple(args, "ss:objc_method_imp", &cls, &sel)) return NULL;
    Class c = objc_getClass(cls);
    if (!c) { PyErr_Format(PyExc_ValueError, "no Objective-C class named %s", cls); return NULL; }
    Method m = class_getInstanceMethod(c, sel_registerName(sel));
    if (!m) { PyErr_Format(PyExc_ValueError, "-[%s %s]: no such instance method", cls, sel); return NULL; }
    return PyLong_FromVoidPtr((void *)method_getImplementation(m));
}

/* Every root class in the runtime, with whether it answers +initialize:
 * Apple's runtime sends that to each class on first use, and a root class
 * without it crashes there (objc_compat.h, agx_objc_new_root_class). */
static PyObject *py_objc_root_classes(PyObject *self, PyObject *unused) {
    int n = objc_getClassList(NULL, 0);
    Class *all = n > 0 ? PyMem_Calloc((size_t)n, sizeof(Class)) : NULL;
    if (n > 0 && !all) return PyErr_NoMemory();
    n = all ? objc_getClassList(all, n) : 0;
    PyObject *d = PyDict_New();
    SEL init = sel_registerName("initialize");
    for (int i = 0; d && i < n; i++) {
        if (!all[i] || class_getSuperclass(all[i])) continue;
        PyObject *yes = class_getClassMethod(all[i], init) ? Py_True : Py_False;
        if (PyDict_SetItemString(d, class_getName(all[i]), yes) < 0) Py_CLEAR(d);
    }
    PyMem_Free(all);
    return d;
}

static PyObject *py_set_stream(PyObject *self, PyObject *args) {
    unsigned long long obj, key;
    if (!PyArg_ParseTuple(args, "KK:swizzle_set_stream", &obj, &key)) return NULL;
    if (agx_swizzle_set_stream((const void *)(uintptr_t)obj, key) < 0) {
        PyErr_Format(PyExc_ValueError, "swizzle_set_stream: %llu is not an object address (0 and 1 are not)", obj);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_stream_of(PyObject *self, PyObject *args) {
    unsigned long long obj;
    uint64_t key;
    if (!PyArg_ParseTuple(args, "K:swizzle_stream_of", &obj)) return NULL;
    if (!agx_swizzle_stream_entry((const void *)(uintptr_t)obj, &key)) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(key);
}

static PyObject *py_clear_stream(PyObject *self, PyObject *args) {
    unsigned long long obj;
    if (!PyArg_ParseTuple(args, "K:swizzle_clear_stream", &obj)) return NULL;
    agx_swizzle_clear_stream((const void *)(uintptr_t)obj);
    Py_RETURN_NONE;
}

static PyObject *py_stream_table(PyObject *self, PyObject *unused) {
    agx_stream_table_info t;
    agx_swizzle_stream_table(&t);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "entries", (unsigned long long)t.entries, "tombstones",
                         (unsigned long long)t.tombstones, "capacity", (unsigned long long)t.capacity, "bytes",
                         (unsigned long long)t.bytes, "removed", (unsigned long long)t.removed, "grows",
                         (unsigned long long)t.grows, "rehashes", (unsigned long long)t.rehashes);
}

/* ------------------------------------------------- race classes (tests) */
/* A class with a deliberate read-modify-write race in -increment, made at
 * run time so tests can guard a class of their own. */

typedef struct race_ivars { volatile uint64_t value; uint64_t step; } race_ivars;
#define MAX_RACE_CLASSES 32
static struct { Class cls; uint64_t step; } race_classes[MAX_RACE_CLASSES];
static int n_race_classes;

static void race_increment(id self, SEL cmd) {
    race_ivars *r = object_getIndexedIvars(self);
    uint64_t v = r->value;
    sched_yield(); /* widens the window between the read and the write */
    r->value = v + r->step;
}
static uint64_t race_value(id self, SEL cmd) { return ((race_ivars *)object_getIndexedIvars(self))->value; }
static void race_odd(id self, SEL cmd) {}

static PyObject *py_make_race_class(PyObject *self, PyObject *args) {
    const char *name;
    unsigned long long step = 1;
    if (!PyArg_ParseTuple(args, "s|K:objc_make_race_class", &name, &step)) return NULL;
    if (objc_getClass(name)) { PyErr_Format(PyExc_ValueError, "class %s already exists", name); return NULL; }
    if (n_race_classes >= MAX_RACE_CLASSES) { PyErr_SetString(PyExc_RuntimeError, "too many race classes"); return NULL; }
    Class c = agx_objc_new_root_class(name);
    if (!c) { PyErr_Format(PyExc_RuntimeError, "the runtime refused class %s", name); return NULL; }
    class_addMethod(c, sel_registerName("increment"), (IMP)race_increment, "v@:");
    class_addMethod(c, sel_registerName("value"), (IMP)race_value, "Q@:");
    /* a shape no wrapper forwards exactly: {int, char} by value */
    class_addMethod(c, sel_registerName("oddShape:"), (IMP)race_odd, "v@:{AGXOdd=ic}");
    objc_registerClassPair(c);
    char sub[256];
    snprintf(sub, sizeof sub, "%sSub", name);
    Class s = objc_allocateClassPair(c, sub, 0);
    if (s) objc_registerClassPair(s);
    /* One message so the GNU runtime installs the class's dispatch table now
     * (as any class in use has had); until then lookups see a prepared copy. */
    {
        id tmp = class_createInstance(c, sizeof(race_ivars));
        SEL v = sel_registerName("value");
        ((uint64_t(*)(id, SEL))agx_objc_lookup(tmp, v))(tmp, v);
    }
    race_classes[n_race_classes].cls = c;
    race_classes[n_race_classes].step = step;
    n_race_classes++;
    Py_RETURN_NONE;
}

typedef struct race_job { id obj; int iterations; agx_gate *start; } race_job;

static void *race_thread(void *arg) {
    race_job *j = arg;
    SEL inc = sel_registerName("increment");
    agx_gate_wait(j->start);
    for (int i = 0; i < j->iterations; i++) ((void (*)(id, SEL))agx_objc_lookup(j->obj, inc))(j->obj, inc);
    return NULL;
}

static PyObject *py_race_run(PyObject *self, PyObject *args) {
    const char *name;
    int threads, iterations;
    if (!PyArg_ParseTuple(args, "sii:objc_race_run", &name, &threads, &iterations)) return NULL;
    Class c = objc_getClass(name);
    if (!c) { PyErr_Format(PyExc_ValueError, "no Objective-C class named %s", name); return NULL; }
    if (threads < 1 || threads > 64) { PyErr_SetString(PyExc_ValueError, "threads must be 1..64"); return NULL; }
    uint64_t step = 0;
    for (Class k = c; k && !step; k = class_getSuperclass(k))
        for (int i = 0; i < n_race_classes; i++)
            if (race_classes[i].cls == k) step = race_classes[i].step;
    if (!step) { PyErr_Format(PyExc_ValueError, "%s is not a race class", name); return NULL; }
    id obj = class_createInstance(c, sizeof(race_ivars));
    race_ivars *r = object_getIndexedIvars(obj);
    r->value = 0;
    r->step = step;
    pthread_t ts[64];
    race_job job;
    agx_gate start;
    Py_BEGIN_ALLOW_THREADS
    agx_gate_init(&start, threads);
    job.obj = obj, job.iterations = iterations, job.start = &start;
    for (int t = 0; t < threads; t++) pthread_create(&ts[t], NULL, race_thread, &job);
    for (int t = 0; t < threads; t++) pthread_join(ts[t], NULL);
    agx_gate_destroy(&start);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(r->value);
}

/* ------------------------------------------------------------------ model */

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

/* ------------------------------------------------------------ hook set */

static const char *const kind_names[] = {"call", "make_buffer", "make_encoder", "end_encoder", "commit", "dealloc"};

static int driver_from_name(const char *name) {
    for (int d = 1; d < 3; d++)
        if (!strcmp(name, agx_driver_names[d])) return d;
    PyErr_Format(PyExc_ValueError, "unknown driver %s (allowed: metal, model)", name);
    return -1;
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

#define KW (PyCFunction)(void (*)(void))
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
    {"swizzle_host_abi", py_swizzle_host_abi, METH_NOARGS, "swizzle_host_abi() -> this build's calling convention."},
    {"swizzle_probes", py_swizzle_probes, METH_NOARGS,
     "swizzle_probes() -> [(shape_key, selector)] of class AGXShapeProbe, one per shape."},
    {"swizzle_probe_call", py_swizzle_probe_call, METH_VARARGS,
     "swizzle_probe_call(i) -> None if shape i forwarded exactly, else the error text."},
    {"swizzle_stream_of", py_stream_of, METH_VARARGS,
     "swizzle_stream_of(object_address) -> the key the stream table has for it, or None."},
    {"swizzle_clear_stream", py_clear_stream, METH_VARARGS,
     "swizzle_clear_stream(object_address): forget its key (as its dealloc does)."},
    {"swizzle_stream_table", py_stream_table, METH_NOARGS,
     "swizzle_stream_table() -> the object-to-stream table's entries, tombstones, capacity, bytes,\n"
     "removed (entries cleared at dealloc), grows and rehashes."},
    {"swizzle_set_stream", py_set_stream, METH_VARARGS,
     "swizzle_set_stream(object_address, key): the stream key a receiver's hooked calls use."},
    {"objc_method_imp", py_objc_method_imp, METH_VARARGS,
     "objc_method_imp(class_name, selector) -> int: the address of the implementation the class resolves."},
    {"objc_root_classes", py_objc_root_classes, METH_NOARGS,
     "objc_root_classes() -> {name: answers +initialize} for every root class in the runtime."},
    {"objc_make_race_class", py_make_race_class, METH_VARARGS,
     "objc_make_race_class(name, step=1): a class whose -increment races (and <name>Sub)."},
    {"objc_race_run", py_race_run, METH_VARARGS,
     "objc_race_run(class_name, threads, iterations) -> final value (native threads)."},
    {"model_configure", KW py_model_configure, METH_VARARGS | METH_KEYWORDS,
     "model_configure(**bugs_and_window) -> the driver model's configuration."},
    {"model_config", py_model_config, METH_NOARGS, "model_config() -> the driver model's configuration."},
    {"model_hook", py_model_hook, METH_NOARGS, "model_hook() -> int: install the model's hook set."},
    {"model_unhook", py_model_unhook, METH_NOARGS, "model_unhook() -> int: remove it."},
    {"model_run", KW py_model_run, METH_VARARGS | METH_KEYWORDS,
     "model_run(threads, iterations, shared_queue=True, region=True, internal_every=4, length=256) -> dict."},
    {"model_run_op", KW py_model_run_op, METH_VARARGS | METH_KEYWORDS,
     "model_run_op(queue=0, a=2.0, length=256, internal=False, end_encoding=True) -> bool (result correct)."},
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
    {"model_classes", py_model_classes, METH_NOARGS, "model_classes() -> the model's class names."},
    {"model_stream_key", py_model_stream_key, METH_VARARGS, "model_stream_key(queue) -> the runner's key."},
    {"model_device", py_model_device, METH_NOARGS, "model_device() -> int: the driver model's device (its address)."},
    {"model_send", py_model_send, METH_VARARGS,
     "model_send(receiver, selector, *args) -> int: one message to a driver-model object (an address from "
     "model_device() or an earlier model_send; anything else is undefined), objects and integers only, GIL "
     "released; ValueError when the method does not exist or has another shape."},
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
