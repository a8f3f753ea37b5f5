/* module.c: the CPython module agxguard._C.
 *
 * Guard objects are the Python front door to the lock domains: entering one
 * takes the lock that the current mode assigns to its site (and a throttle
 * slot for an outermost region) and records it on the thread's region stack;
 * leaving releases exactly what was taken. Lock objects expose single domain
 * locks directly. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "acquire.h"
#include "capi.h"
#include "guard.h"
#include "module_state.h"
#include "spin.h"

#ifdef AGX_HAVE_OBJC
#include "objc_module.h"
#include "discovery.h"
#include "hook_table.h"
#endif

PyObject *agx_LockTimeout;
PyObject *agx_LockWaitWarning;
static PyObject *stream_resolver; /* callable returning the current stream key, or NULL */

/* ---------------------------------------------------------------- keys */

/* A Python int from -2**63 to 2**64-1 becomes a 64-bit key (a negative one in two's
 * complement); a bool, a non-int or an int outside 64 bits is refused. */
static int key_from_object(PyObject *o, uint64_t *key) {
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "a stream key must be an int, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow > 0) { /* above 2**63-1: unsigned, if it fits */
        unsigned long long u = PyLong_AsUnsignedLongLong(o);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            overflow = 2;
        } else {
            *key = (uint64_t)u;
            return 0;
        }
    }
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "a stream key must be an int from -2**63 to 2**64-1 (64 bits), not %R", o);
        return -1;
    }
    *key = (uint64_t)v;
    return 0;
}

/* The calling thread's stream: use_stream() if set, else the resolver, else 0. */
static int current_stream(uint64_t *key) {
    if (agx_thread_stream(key)) return 0;
    if (stream_resolver == NULL) {
        *key = 0;
        return 0;
    }
    PyObject *r = PyObject_CallNoArgs(stream_resolver);
    if (r == NULL) return -1;
    int rc = key_from_object(r, key);
    Py_DECREF(r);
    return rc;
}

/* ---------------------------------------------------------------- Guard */

typedef struct {
    PyObject_HEAD
    int site;
    int has_key;
    uint64_t key;
} GuardObject;

/* Enter a region or call site under the nesting rule (guard.h): the mode is
 * the thread's bound mode when it holds locks of nested entries, else the
 * current one; a throttle slot only for a thread's first entry. */
/* Whether anything below a region is locked in mode 'op': the AGX hook set is
 * installed (a swizzle engine build with a driver found). Without it, an op-mode
 * guard() region takes no lock at all (on CPU and CUDA, and on a Mac whose hooks
 * failed): the first such region warns once, naming the modes that lock regions. */
static _Atomic int op_region_warned;

static int op_region_check(void) {
#ifdef AGX_HAVE_OBJC
    if (agx_hooks_driver() != AGX_DRIVER_NONE) return 0;
#endif
    if (atomic_exchange(&op_region_warned, 1)) return 0;
    return PyErr_WarnEx(PyExc_RuntimeWarning,
                        "agxguard: this guard() region takes no lock: mode 'op' locks driver calls, and no "
                        "driver hooks are installed in this process (see agxguard.status()['protects']); "
                        "set_mode('global') or set_mode('stream') locks regions (this warning is shown once)",
                        1);
}

static int region_enter(GuardObject *g) {
    agx_thread_entries *t = agx_entries();
    int mode = agx_entry_mode_in(t);
    if (mode == AGX_MODE_OP && g->site == AGX_SITE_REGION && !atomic_load_explicit(&op_region_warned,
                                                                                    memory_order_relaxed) &&
        op_region_check() < 0)
        return -1;
    uint64_t key = g->key;
    /* the stream is resolved only where the mode uses it (it may call Python) */
    if (mode == AGX_MODE_STREAM && !g->has_key && current_stream(&key) < 0) return -1;
    agx_lock *lock = agx_lock_for_mode(mode, g->site, 1, key, NULL);
    agx_held h = {{NULL, NULL, NULL}, 0, NULL};
    if (g->site == AGX_SITE_REGION && t->entries == 0 &&
        atomic_load_explicit(&agx_throttle()->limit, memory_order_relaxed) > 0) {
        if (agx_throttle_acquire_py() < 0) return -1;
        h.throttled = 1;
    }
    agx_admit admit = agx_entry_admit(t, lock);
    if (admit == AGX_ADMIT_WAIT && agx_acquire_py(lock) < 0) {
        if (h.throttled) agx_sem_release(agx_throttle());
        return -1;
    }
    agx_entry_push(t, &h.entry, mode, admit == AGX_ADMIT_NONE ? NULL : lock);
    if (agx_region_push(&h) < 0) {
        agx_entry_pop(&h.entry);
        if (h.throttled) agx_sem_release(agx_throttle());
        if (agx_region_depth() >= AGX_MAX_REGION_DEPTH)
            PyErr_Format(PyExc_RecursionError, "agxguard regions nested deeper than %d", AGX_MAX_REGION_DEPTH);
        else
            PyErr_NoMemory(); /* the thread's region stack could not be allocated */
        return -1;
    }
    return 0;
}

static int region_exit(void) {
    agx_held h;
    if (agx_region_pop(&h) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "agxguard: leaving a guarded region that was never entered");
        return -1;
    }
    agx_entry_pop(&h.entry);
    if (h.throttled) agx_sem_release(agx_throttle());
    return 0;
}

/* Which Guard entered each of this thread's open regions (the region's owner,
 * guard.h), so that a thread can only leave a region it entered itself,
 * innermost first: a Guard is shared between threads, and its __exit__ called
 * from a thread that did not enter it must not pop that thread's own region.
 * Identity only, no reference. */
static void region_mark(const GuardObject *g) { agx_region_set_owner(g); }

/* 0 if this thread's innermost open region was entered through g; else a RuntimeError. */
static int region_check_owner(const GuardObject *g) {
    int depth = agx_region_depth();
    if (depth <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "agxguard: leaving a guarded region that was never entered");
        return -1;
    }
    if (agx_region_owner() != g) {
        PyErr_SetString(PyExc_RuntimeError,
                        "agxguard: this thread did not enter this guard's region: a thread can only leave "
                        "regions it entered itself, innermost first");
        return -1;
    }
    return 0;
}

static PyObject *Guard_enter(GuardObject *self, PyObject *unused) {
    if (region_enter(self) < 0) return NULL;
    region_mark(self);
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *Guard_exit(GuardObject *self, PyObject *const *args, Py_ssize_t nargs) {
    /* no need to clear the entry: every push (Guard_enter, call_in_region) marks its own */
    if (region_check_owner(self) < 0 || region_exit() < 0) return NULL;
    Py_RETURN_FALSE;
}

/* func(*fargs, **fkw) inside guard g; the region is left whatever happens. */
static PyObject *call_in_region(GuardObject *g, PyObject *func, PyObject *fargs, PyObject *fkw) {
    if (fargs != NULL && !PyTuple_Check(fargs)) {
        PyErr_SetString(PyExc_TypeError, "call(): args must be a tuple");
        return NULL;
    }
    if (fkw != NULL && fkw != Py_None && !PyDict_Check(fkw)) {
        PyErr_SetString(PyExc_TypeError, "call(): kwargs must be a dict or None");
        return NULL;
    }
    if (fkw == Py_None || (fkw != NULL && PyDict_GET_SIZE(fkw) == 0)) fkw = NULL;
    if (region_enter(g) < 0) return NULL;
    region_mark(g);
    PyObject *r = fargs ? PyObject_Call(func, fargs, fkw) : PyObject_CallNoArgs(func);
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    int rc = region_exit();
    if (et) PyErr_Restore(et, ev, tb);
    if (rc < 0 && r) Py_CLEAR(r);
    return r;
}

/* call(func, args=(), kwargs=None): func(*args, **kwargs) inside the guard. */
static PyObject *Guard_call_guarded(GuardObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "call(func, args=(), kwargs=None)");
        return NULL;
    }
    return call_in_region(self, args[0], nargs > 1 ? args[1] : NULL, nargs > 2 ? args[2] : NULL);
}

static GuardObject *op_site; /* the call-site guard of torch ops */
static PyObject *passthrough_funcs; /* frozenset of torch functions that reach no device */
static PyObject *passthrough_type;  /* a type whose callables all reach no device (attribute getters) */

/* _set_op_passthrough(type_or_None, frozenset_or_None) */
static PyObject *mod_set_op_passthrough(PyObject *m, PyObject *args) {
    PyObject *type, *funcs;
    if (!PyArg_ParseTuple(args, "OO:_set_op_passthrough", &type, &funcs)) return NULL;
    if ((type != Py_None && !PyType_Check(type)) || (funcs != Py_None && !PyFrozenSet_Check(funcs))) {
        PyErr_SetString(PyExc_TypeError, "_set_op_passthrough(type or None, frozenset or None)");
        return NULL;
    }
    Py_XSETREF(passthrough_type, type == Py_None ? NULL : Py_NewRef(type));
    Py_XSETREF(passthrough_funcs, funcs == Py_None ? NULL : Py_NewRef(funcs));
    Py_RETURN_NONE;
}

static PyObject *mod_affinity_changed(PyObject *m, PyObject *unused) {
    agx_affinity_changed();
    Py_RETURN_NONE;
}

static int is_passthrough(PyObject *func) {
    if (passthrough_type && (PyObject *)Py_TYPE(func) == passthrough_type) return 1;
    if (passthrough_funcs == NULL) return 0;
    int r = PySet_Contains(passthrough_funcs, func);
    if (r < 0) { /* an unhashable callable is simply not in the set */
        PyErr_Clear();
        return 0;
    }
    return r;
}

/* torch_function(mode, func, types, args=(), kwargs=None): the body of
 * agxguard.ops()'s __torch_function__, bound to the mode instance with
 * types.MethodType (torch wants a method whose __self__ is the mode). */
int agx_wakeup_add_to_module(PyObject *m);   /* wakeup.c */
int agx_reqqueue_add_to_module(PyObject *m); /* reqqueue.c */

static PyObject *mod_torch_function(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 3 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "torch_function(mode, func, types, args=(), kwargs=None)");
        return NULL;
    }
    if (is_passthrough(args[1])) {
        PyObject *fargs = nargs > 3 ? args[3] : NULL, *fkw = nargs > 4 && args[4] != Py_None ? args[4] : NULL;
        return fargs ? PyObject_Call(args[1], fargs, fkw) : PyObject_CallNoArgs(args[1]);
    }
    return call_in_region(op_site, args[1], nargs > 3 ? args[3] : NULL, nargs > 4 ? args[4] : NULL);
}

static int Guard_init(GuardObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"stream", "site", NULL};
    PyObject *stream = Py_None;
    const char *site = "region";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|Os:Guard", kwlist, &stream, &site)) return -1;
    if (strcmp(site, "region") == 0)
        self->site = AGX_SITE_REGION;
    else if (strcmp(site, "call") == 0)
        self->site = AGX_SITE_CALL;
    else {
        PyErr_Format(PyExc_ValueError, "site must be 'region' or 'call', not '%s'", site);
        return -1;
    }
    self->has_key = stream != Py_None;
    self->key = 0;
    if (self->has_key && key_from_object(stream, &self->key) < 0) return -1;
    return 0;
}

static PyObject *Guard_repr(GuardObject *self) {
    const char *site = self->site == AGX_SITE_CALL ? "call" : "region";
    if (self->has_key)
        return PyUnicode_FromFormat("<agxguard.Guard site=%s stream=%llu>", site, (unsigned long long)self->key);
    return PyUnicode_FromFormat("<agxguard.Guard site=%s stream=current>", site);
}

static PyMethodDef Guard_methods[] = {
    {"__enter__", (PyCFunction)Guard_enter, METH_NOARGS, "Take the lock the current mode assigns."},
    {"__exit__", (PyCFunction)(void (*)(void))Guard_exit, METH_FASTCALL,
     "Release what __enter__ took; RuntimeError unless this thread's innermost open region was entered "
     "through this guard."},
    {"call", (PyCFunction)(void (*)(void))Guard_call_guarded, METH_FASTCALL,
     "call(func, args=(), kwargs=None): func(*args, **kwargs) inside the guard."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GuardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agxguard._C.Guard",
    .tp_basicsize = sizeof(GuardObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE, /* agxguard._decorate.Guard adds __call__ */
    .tp_doc = "Guard(stream=None, site='region'): a guarded region under the current mode.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Guard_init,
    .tp_repr = (reprfunc)Guard_repr,
    .tp_methods = Guard_methods,
};

/* ---------------------------------------------------------------- Lock */

typedef struct {
    PyObject_HEAD
    agx_lock *lock;
} LockObject;

static PyObject *new_lock_object(agx_lock *l);

static PyObject *Lock_acquire(LockObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"blocking", NULL};
    int blocking = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p:acquire", kwlist, &blocking)) return NULL;
    if (!blocking) return PyBool_FromLong(agx_lock_try(self->lock));
    if (agx_acquire_py(self->lock) < 0) return NULL;
    Py_RETURN_TRUE;
}

static PyObject *Lock_release(LockObject *self, PyObject *unused) {
    if (agx_lock_release(self->lock) < 0) {
        PyErr_Format(PyExc_RuntimeError, "agxguard: releasing the '%s' lock, which this thread does not hold",
                     self->lock->name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Lock_enter(LockObject *self, PyObject *unused) {
    if (agx_acquire_py(self->lock) < 0) return NULL;
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *Lock_exit(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (Lock_release(self, NULL) == NULL) return NULL;
    Py_RETURN_FALSE;
}

static PyObject *Lock_locked(LockObject *self, PyObject *unused) {
    return PyBool_FromLong(atomic_load(&self->lock->owner) != 0);
}

static PyObject *Lock_owned(LockObject *self, PyObject *unused) {
    return PyBool_FromLong(agx_lock_owned(self->lock));
}

static PyObject *Lock_repr(LockObject *self) {
    return PyUnicode_FromFormat("<agxguard.Lock '%s' at %p>", self->lock->name, (void *)self->lock);
}

static PyObject *Lock_richcompare(PyObject *a, PyObject *b, int op) {
    extern PyTypeObject LockType;
    if (!PyObject_TypeCheck(b, &LockType) || (op != Py_EQ && op != Py_NE)) Py_RETURN_NOTIMPLEMENTED;
    int eq = ((LockObject *)a)->lock == ((LockObject *)b)->lock;
    return PyBool_FromLong(op == Py_EQ ? eq : !eq);
}

static Py_hash_t Lock_hash(LockObject *self) { return _Py_HashPointer(self->lock); }

static PyMethodDef Lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))Lock_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True) -> bool: take the lock (re-entrant)."},
    {"release", (PyCFunction)Lock_release, METH_NOARGS, "Release one level."},
    {"__enter__", (PyCFunction)Lock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Lock_exit, METH_FASTCALL, NULL},
    {"locked", (PyCFunction)Lock_locked, METH_NOARGS, "Whether any thread holds it."},
    {"owned", (PyCFunction)Lock_owned, METH_NOARGS, "Whether the calling thread holds it."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agxguard._C.Lock",
    .tp_basicsize = sizeof(LockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One lock of a domain (global, op, a stream, an object stripe). Re-entrant.",
    .tp_repr = (reprfunc)Lock_repr,
    .tp_richcompare = Lock_richcompare,
    .tp_hash = (hashfunc)Lock_hash,
    .tp_methods = Lock_methods,
};

static PyObject *new_lock_object(agx_lock *l) {
    LockObject *o = PyObject_New(LockObject, &LockType);
    if (o) o->lock = l;
    return (PyObject *)o;
}

/* ---------------------------------------------------------------- functions */

static PyObject *mod_set_mode(PyObject *m, PyObject *arg) {
    if (!PyUnicode_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "mode must be a str, one of 'off', 'op', 'stream', 'global'; got %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    Py_ssize_t len;
    const char *name = PyUnicode_AsUTF8AndSize(arg, &len);
    if (name == NULL) return NULL;
    /* a NUL would end the C string early: 'global\0junk' is not 'global' */
    int mode = (size_t)len == strlen(name) ? agx_mode_from_name(name) : -1;
    if (mode < 0) {
        PyErr_Format(PyExc_ValueError, "unknown agxguard mode %R; allowed: 'off', 'op', 'stream', 'global'", arg);
        return NULL;
    }
    int old = agx_mode_get();
    agx_mode_set(mode);
    return PyUnicode_FromString(agx_mode_names[old]);
}

static PyObject *mod_get_mode(PyObject *m, PyObject *unused) {
    return PyUnicode_FromString(agx_mode_names[agx_mode_get()]);
}

#define AGX_THROTTLE_MAX 1000000 /* agxguard/_config.py THROTTLE_MAX */

static PyObject *mod_set_throttle(PyObject *m, PyObject *arg) {
    if (!PyLong_Check(arg) || PyBool_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "throttle must be an int from 0 (no limit) to %d, not %.100s",
                     AGX_THROTTLE_MAX, Py_TYPE(arg)->tp_name);
        return NULL;
    }
    int overflow = 0;
    long n = PyLong_AsLongAndOverflow(arg, &overflow);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (overflow || n < 0 || n > AGX_THROTTLE_MAX) {
        PyErr_Format(PyExc_ValueError, "throttle must be an int from 0 (no limit) to %d, not %R", AGX_THROTTLE_MAX,
                     arg);
        return NULL;
    }
    int old = atomic_load(&agx_throttle()->limit);
    agx_sem_set_limit(agx_throttle(), (int)n);
    return PyLong_FromLong(old);
}

static PyObject *mod_get_throttle(PyObject *m, PyObject *unused) {
    return PyLong_FromLong(atomic_load(&agx_throttle()->limit));
}

/* agxguard/_config.py WAIT_MS_MIN, WAIT_MS_MAX: below 1 us a limit would round to
 * no limit at all, so a positive value under it is refused rather than turned off. */
#define AGX_WAIT_MS_MIN 0.001
#define AGX_WAIT_MS_MAX 1e12
#define AGX_WAIT_MS_RANGE "None or 0 (off), or milliseconds from 0.001 to 1e+12"

/* A wait limit: None or 0 is off (0 ns); a number from AGX_WAIT_MS_MIN to
 * AGX_WAIT_MS_MAX ms; a bool, a non-number or anything else is refused. */
static int ms_to_ns(PyObject *o, int64_t *out, const char *what) {
    if (o == Py_None) {
        *out = 0;
        return 0;
    }
    if (PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be %s, not a bool", what, AGX_WAIT_MS_RANGE);
        return -1;
    }
    double ms = PyFloat_AsDouble(o);
    if (ms == -1.0 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "%s must be %s, not %.100s", what, AGX_WAIT_MS_RANGE,
                             Py_TYPE(o)->tp_name);
            }
            return -1;
        }
        PyErr_Clear();
        ms = HUGE_VAL; /* an int too large for a double: out of range below */
    }
    if (ms == 0) {
        *out = 0;
        return 0;
    }
    if (!(ms >= AGX_WAIT_MS_MIN && ms <= AGX_WAIT_MS_MAX)) { /* NaN fails this too */
        PyErr_Format(PyExc_ValueError, "%s must be %s, not %R", what, AGX_WAIT_MS_RANGE, o);
        return -1;
    }
    *out = (int64_t)(ms * 1e6 + 0.5);
    return 0;
}

static PyObject *mod_set_wait(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"warn_ms", "timeout_ms", "abort", NULL};
    PyObject *warn = Py_None, *timeout = Py_None;
    int abort_ = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OOp:set_lock_timeout", kwlist, &warn, &timeout, &abort_)) return NULL;
    int64_t w, t;
    if (ms_to_ns(warn, &w, "warn_ms") < 0 || ms_to_ns(timeout, &t, "timeout_ms") < 0) return NULL;
    atomic_store(&agx_wait.warn_ns, w);
    atomic_store(&agx_wait.timeout_ns, t);
    atomic_store(&agx_wait.timeout_aborts, abort_);
    Py_RETURN_NONE;
}

static PyObject *ns_to_ms_or_none(int64_t ns) {
    if (ns <= 0) Py_RETURN_NONE;
    return PyFloat_FromDouble((double)ns / 1e6);
}

static PyObject *mod_get_wait(PyObject *m, PyObject *unused) {
    return Py_BuildValue("{s:N,s:N,s:O}", "warn_ms", ns_to_ms_or_none(atomic_load(&agx_wait.warn_ns)),
                         "timeout_ms", ns_to_ms_or_none(atomic_load(&agx_wait.timeout_ns)), "abort",
                         atomic_load(&agx_wait.timeout_aborts) ? Py_True : Py_False);
}

static PyObject *counters_dict(const agx_lock_counters *c) {
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "handoffs", (unsigned long long)c->handoffs,
                         "hold_samples",
                         (unsigned long long)c->hold_samples, "acquisitions", (unsigned long long)c->acquisitions,
                         "reentries", (unsigned long long)c->reentries, "contentions",
                         (unsigned long long)c->contentions, "timeouts", (unsigned long long)c->timeouts,
                         "wait_ns", (unsigned long long)c->wait_ns, "max_wait_ns",
                         (unsigned long long)c->max_wait_ns, "hold_ns", (unsigned long long)c->hold_ns);
}

static PyObject *mod_stats(PyObject *m, PyObject *unused) {
    PyObject *domains = PyDict_New(), *out = NULL, *d = NULL, *thr = NULL;
    if (!domains) return NULL;
    for (int i = 0; i < AGX_DOMAIN_COUNT; i++) {
        agx_domain_counters dc;
        agx_domain_read((agx_domain)i, &dc);
        d = counters_dict(&dc.c);
        if (!d) goto done;
        PyObject *n = PyLong_FromUnsignedLongLong(dc.locks);
        if (!n || PyDict_SetItemString(d, "locks", n) < 0) {
            Py_XDECREF(n);
            goto done;
        }
        Py_DECREF(n);
        if (PyDict_SetItemString(domains, agx_domain_names[i], d) < 0) goto done;
        Py_CLEAR(d);
    }
    agx_lock_counters tc;
    agx_sem_read(agx_throttle(), &tc);
    thr = counters_dict(&tc);
    if (!thr) goto done;
    {
        PyObject *lim = PyLong_FromLong(atomic_load(&agx_throttle()->limit));
        PyObject *inuse = PyLong_FromLong(atomic_load(&agx_throttle()->in_use));
        int bad = !lim || !inuse || PyDict_SetItemString(thr, "limit", lim) < 0 ||
                  PyDict_SetItemString(thr, "in_use", inuse) < 0;
        Py_XDECREF(lim);
        Py_XDECREF(inuse);
        if (bad) goto done;
    }
    out = Py_BuildValue("{s:s,s:O,s:O,s:K}", "mode", agx_mode_names[agx_mode_get()], "domains", domains, "throttle",
                        thr, "nested_skips", (unsigned long long)agx_nesting_skips());
done:
    Py_XDECREF(d);
    Py_XDECREF(thr);
    Py_DECREF(domains);
    return out;
}

static PyObject *mod_reset_stats(PyObject *m, PyObject *unused) {
    agx_stats_reset();
    Py_RETURN_NONE;
}

static PyObject *mod_set_thread_stream(PyObject *m, PyObject *arg) {
    uint64_t old, key = 0;
    if (arg != Py_None && key_from_object(arg, &key) < 0) return NULL;
    int had = agx_thread_stream(&old);
    agx_thread_stream_set(arg != Py_None, key);
    if (!had) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(old);
}

static PyObject *mod_set_stream_resolver(PyObject *m, PyObject *arg) {
    if (arg != Py_None && !PyCallable_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "the stream resolver must be callable or None, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    PyObject *old = stream_resolver ? stream_resolver : Py_None;
    Py_INCREF(old);
    Py_XSETREF(stream_resolver, arg == Py_None ? NULL : Py_NewRef(arg));
    return old;
}


static PyObject *mod_global_lock(PyObject *m, PyObject *unused) { return new_lock_object(agx_global_lock()); }
static PyObject *mod_op_lock(PyObject *m, PyObject *unused) { return new_lock_object(agx_op_lock()); }

static PyObject *mod_stream_lock(PyObject *m, PyObject *arg) {
    uint64_t key;
    if (key_from_object(arg, &key) < 0) return NULL;
    return new_lock_object(agx_stream_lock(key));
}

static PyMethodDef module_methods[] = {
    {"set_mode", mod_set_mode, METH_O, "set_mode(name) -> previous name."},
    {"get_mode", mod_get_mode, METH_NOARGS, "The current mode's name."},
    {"set_throttle", mod_set_throttle, METH_O, "set_throttle(n) -> previous; 0 = no limit."},
    {"get_throttle", mod_get_throttle, METH_NOARGS, "The throttle limit (0 = none)."},
    {"set_lock_timeout", (PyCFunction)(void (*)(void))mod_set_wait, METH_VARARGS | METH_KEYWORDS,
     "set_lock_timeout(warn_ms=None, timeout_ms=None, abort=False): the lock wait policy."},
    {"get_lock_timeout", mod_get_wait, METH_NOARGS, "The lock wait policy as a dict."},
    {"stats", mod_stats, METH_NOARGS, "Counters per domain, the throttle and the mode."},
    {"reset_stats", mod_reset_stats, METH_NOARGS, "Zero every counter."},
    {"set_thread_stream", mod_set_thread_stream, METH_O, "Set this thread's stream key (None clears); returns the previous."},
    {"set_stream_resolver", mod_set_stream_resolver, METH_O, "Callable giving the current stream key; returns the previous."},
    {"global_lock", mod_global_lock, METH_NOARGS, "The process-wide region lock."},
    {"op_lock", mod_op_lock, METH_NOARGS, "The process-wide op (driver call) lock."},
    {"stream_lock", mod_stream_lock, METH_O, "The lock of a stream key."},
    {"torch_function", (PyCFunction)(void (*)(void))mod_torch_function, METH_FASTCALL,
     "torch_function(mode, func, types, args=(), kwargs=None): func(*args, **kwargs) under the op-site lock."},
    {"_set_op_passthrough", mod_set_op_passthrough, METH_VARARGS, NULL},
    {"_affinity_changed", mod_affinity_changed, METH_NOARGS,
     "_affinity_changed(): a thread's CPU affinity changed; waits read it again."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "agxguard._C", "agxguard's C core: lock domains, modes, guards.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__C(void) {
    agx_guard_init();
    if (PyType_Ready(&GuardType) < 0 || PyType_Ready(&LockType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    agx_LockTimeout = PyErr_NewExceptionWithDoc(
        "agxguard.LockTimeout", "A guard wait passed AGXGUARD_LOCK_TIMEOUT_MS.", PyExc_TimeoutError, NULL);
    agx_LockWaitWarning = PyErr_NewExceptionWithDoc(
        "agxguard.LockWaitWarning", "A guard wait passed AGXGUARD_LOCK_WARN_MS.", PyExc_RuntimeWarning, NULL);
    if (!agx_LockTimeout || !agx_LockWaitWarning) goto fail;
    if (PyModule_AddObjectRef(m, "LockTimeout", agx_LockTimeout) < 0 ||
        PyModule_AddObjectRef(m, "LockWaitWarning", agx_LockWaitWarning) < 0 ||
        PyModule_AddObjectRef(m, "Guard", (PyObject *)&GuardType) < 0 ||
        PyModule_AddObjectRef(m, "Lock", (PyObject *)&LockType) < 0 || agx_wakeup_add_to_module(m) < 0 ||
        agx_reqqueue_add_to_module(m) < 0)
        goto fail;
    op_site = (GuardObject *)PyObject_CallNoArgs((PyObject *)&GuardType);
    if (op_site == NULL) goto fail;
    op_site->site = AGX_SITE_CALL;
    PyObject *modes = Py_BuildValue("(ssss)", agx_mode_names[0], agx_mode_names[1], agx_mode_names[2],
                                    agx_mode_names[3]);
    if (modes == NULL || PyModule_AddObjectRef(m, "MODES", modes) < 0) {
        Py_XDECREF(modes);
        goto fail;
    }
    Py_DECREF(modes);
    /* the C API of capi.h, for agxguard._model; const: nobody writes through it */
    PyObject *capi = PyCapsule_New((void *)&agx_capi_table, AGX_CAPI_NAME, NULL);
    int capi_bad = capi == NULL || PyModule_AddObjectRef(m, "_capi", capi) < 0;
    Py_XDECREF(capi);
    if (capi_bad) goto fail;
#ifdef AGX_HAVE_OBJC
    if (PyModule_AddObjectRef(m, "HAVE_OBJC", Py_True) < 0) goto fail;
    if (agx_objc_add_to_module(m) < 0) goto fail;
#else
    if (PyModule_AddObjectRef(m, "HAVE_OBJC", Py_False) < 0) goto fail;
#endif
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
