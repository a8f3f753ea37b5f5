/* reqqueue.c: agxguard._C.RequestQueue, the request queue of the Batcher
 * (agxguard/batcher.py subclasses it).
 *
 * The synchronous caller's whole path is one C call, the queue's __call__:
 * describe the request (its batching key), enqueue it, wake the dispatcher if
 * it sleeps for this many requests, release the GIL and wait on the request's
 * own agx_event (spinning first: wakeup.h), take the GIL back and return the
 * answer or raise the stored exception. No Python frame runs for it. The
 * dispatcher takes a batch in one call (_take: waiting up to max_delay for it
 * to fill, GIL released) and answers a whole batch in one call (_complete: a
 * list of outputs, or one exception for all), which skips requests whose
 * callers gave up.
 *
 * Requests of submit() (a concurrent Future) and acall() (an asyncio future)
 * go through the same queue (_put); for them the dispatcher's calls return
 * (payload, value, error) triples that Python hands to the futures.
 *
 * Locking: every field of the queue and of its requests is read and written
 * with the GIL held, and no operation on the queue's list calls code that could
 * release the GIL before the list is consistent again (references to drop are
 * collected and dropped at the end). Only the counters a thread reads with the
 * GIL released are atomic: the queue length (room waiters) and closed.
 *
 * Staging (the device path, fixed shapes): the dispatcher registers a pinned
 * host buffer for the next batch of a key (_stage). Each request of that key
 * accepted while it is registered gets the next rows of it; a caller copies its
 * own request there right after releasing the GIL (so the copies of a batch run
 * beside the other callers' Python instead of after them on the dispatcher),
 * and the take that forms the batch detaches the buffer, copies (GIL released)
 * whatever no caller copied (futures, requests queued before the buffer came),
 * waits for copies in progress, and tells the dispatcher (_staged) whether the
 * batch it formed is exactly the buffer's first rows, in order: then the buffer
 * is the batch and nothing is concatenated. A copy is made by whoever claims
 * it first (copy_state), and a buffer is handed back only when no copy into
 * it can still be running.
 *
 * A take that fails (MemoryError) leaves the queue as it found it: requests it
 * took go back to the head in order, and deliveries it made (expired futures)
 * wait for the next take. An answer (_complete) that fails claims only the
 * requests it delivered (their deliveries also wait for the next take, which
 * returns them at once) and leaves the batch in flight for the dispatcher's
 * _fail(settle=True). (fallible(); _q_fault for tests.)
 *
 * Accounting: a request is finished exactly once, by whoever sets `claimed`
 * first (the dispatcher answering or failing it, close() failing it, its caller
 * giving it up), and that one counts it: answered, failed, cancelled or
 * expired. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "acquire.h"
#include "event.h"
#include "spin.h"
#include "wakeup.h"

#define RING_CAP 65536       /* per-request latency samples kept (the newest) */
#define MAX_KEYS 4096        /* distinct batching keys remembered before the table restarts */
#define NS 1000000000.0

enum { REQ_CALL = 0, REQ_FUTURE = 1, REQ_ASYNC = 2 };

/* ------------------------------------------------------------------ Request */

typedef struct ReqObject {
    PyObject_HEAD
    struct ReqObject *next; /* in the queue (which holds a reference) */
    PyObject *x;            /* the input, until its batch is formed */
    PyObject *value;        /* a call's answer, until its caller takes it */
    PyObject *error;        /* a call's exception, until its caller takes it */
    PyObject *payload;      /* submit: the Future; acall: (loop, future); calls: NULL */
    int64_t t_ns;           /* enqueued (agx_now_ns) */
    int64_t deadline_ns;    /* past it the request is not computed; -1: none */
    int64_t start_ns;       /* its batch was formed */
    Py_ssize_t rows, length, key;
    int kind;
    int claimed;   /* finished (answered, failed, given up): by the one who set it */
    int timed_out; /* given up at its timeout (acall sets it from Python) */
    agx_event ev;  /* REQ_CALL: set when answered */
    /* staging: its rows in a registered buffer (COPY_PENDING until someone claims the copy) */
    _Atomic int copy_state;
    struct Stage *stage;
    char *dst;
    const char *src;
    Py_ssize_t nbytes;
} ReqObject;

enum { COPY_NONE = 0, COPY_PENDING = 1, COPY_CLAIMED = 2 };

static PyTypeObject ReqType;

static ReqObject *req_new(int kind) {
    ReqObject *r = PyObject_GC_New(ReqObject, &ReqType);
    if (r == NULL) return NULL;
    r->next = NULL;
    r->x = r->value = r->error = r->payload = NULL;
    r->t_ns = r->start_ns = 0;
    r->deadline_ns = -1;
    r->rows = r->length = r->key = 0;
    r->kind = kind;
    r->claimed = r->timed_out = 0;
    atomic_store_explicit(&r->copy_state, COPY_NONE, memory_order_relaxed);
    r->stage = NULL;
    r->dst = NULL;
    r->src = NULL;
    r->nbytes = 0;
    if (kind == REQ_CALL) agx_event_init(&r->ev);
    PyObject_GC_Track(r);
    return r;
}

static int Req_traverse(ReqObject *r, visitproc visit, void *arg) {
    Py_VISIT(r->x);
    Py_VISIT(r->value);
    Py_VISIT(r->error);
    Py_VISIT(r->payload);
    return 0;
}

static int Req_clear(ReqObject *r) {
    Py_CLEAR(r->x);
    Py_CLEAR(r->value);
    Py_CLEAR(r->error);
    Py_CLEAR(r->payload);
    return 0;
}

static void Req_dealloc(ReqObject *r) {
    PyObject_GC_UnTrack(r);
    Req_clear(r);
    if (r->kind == REQ_CALL) {
        pthread_mutex_destroy(&r->ev.mu);
        pthread_cond_destroy(&r->ev.cv);
    }
    PyObject_GC_Del(r);
}

static PyObject *obj_or_none(PyObject *o) { return Py_NewRef(o ? o : Py_None); }
static PyObject *Req_get_x(ReqObject *r, void *u) { return obj_or_none(r->x); }
static PyObject *Req_get_payload(ReqObject *r, void *u) { return obj_or_none(r->payload); }
static PyObject *Req_get_rows(ReqObject *r, void *u) { return PyLong_FromSsize_t(r->rows); }
static PyObject *Req_get_length(ReqObject *r, void *u) { return PyLong_FromSsize_t(r->length); }
static PyObject *Req_get_key(ReqObject *r, void *u) { return PyLong_FromSsize_t(r->key); }
static PyObject *Req_get_claimed(ReqObject *r, void *u) { return PyBool_FromLong(r->claimed); }
static PyObject *Req_get_timed_out(ReqObject *r, void *u) { return PyBool_FromLong(r->timed_out); }
static int Req_set_timed_out(ReqObject *r, PyObject *v, void *u) {
    int t = v ? PyObject_IsTrue(v) : 0;
    if (t < 0) return -1;
    r->timed_out = t;
    return 0;
}
static PyObject *Req_get_deadline(ReqObject *r, void *u) {
    if (r->deadline_ns < 0) Py_RETURN_NONE;
    return PyFloat_FromDouble((double)r->deadline_ns / NS);
}

static PyGetSetDef Req_getset[] = {
    {"x", (getter)Req_get_x, NULL, "The input (None once its batch is formed or it is finished).", NULL},
    {"payload", (getter)Req_get_payload, NULL, "What the answer goes to: a Future, (loop, future), or None.", NULL},
    {"rows", (getter)Req_get_rows, NULL, "Its size along dim 0.", NULL},
    {"length", (getter)Req_get_length, NULL, "Its size along pad_dim (0 without pad_dim).", NULL},
    {"key", (getter)Req_get_key, NULL, "Its batching key's number (equal keys batch together).", NULL},
    {"claimed", (getter)Req_get_claimed, NULL, "True once answered, failed or given up.", NULL},
    {"timed_out", (getter)Req_get_timed_out, (setter)Req_set_timed_out, "Given up at its timeout.", NULL},
    {"deadline", (getter)Req_get_deadline, NULL, "RequestQueue.now() past which it is not computed, or None.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReqType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agxguard._C.Request",
    .tp_basicsize = sizeof(ReqObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One request of a RequestQueue (made by the queue, read by the Batcher's dispatcher).",
    .tp_dealloc = (destructor)Req_dealloc,
    .tp_traverse = (traverseproc)Req_traverse,
    .tp_clear = (inquiry)Req_clear,
    .tp_getset = Req_getset,
};

/* ------------------------------------------------------------------ the queue */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    ReqObject *head, *tail;
    _Atomic Py_ssize_t count;     /* queued requests */
    _Atomic Py_ssize_t max_queue; /* past it, enqueuing waits for room */
    _Atomic int closed;
    int64_t spin_ns;
    int pad_dim;           /* -1: none */
    Py_ssize_t max_length; /* -1: none (the largest bucket otherwise) */
    PyObject *describe;    /* describe(x) -> (key, rows, length): the slow path, raises for bad input */
    PyObject *keys;        /* key -> its number */
    Py_ssize_t next_key;
    PyObject *pin_hook;    /* called once per thread (Batcher pin_cpus), or NULL */
    PyObject *pin_obj;     /* what the thread-state dict remembers for it */
    PyObject *closed_msg;  /* why enqueuing is refused, once closed */
    /* the dispatcher's sleep: a submitter sets wake when sleeping and count >= wake_at */
    agx_event wake;
    int sleeping;
    Py_ssize_t wake_at;
    /* submitters waiting for room */
    pthread_mutex_t room_mu;
    pthread_cond_t room_cv;
    _Atomic int room_sleepers;
    /* counters (GIL) */
    long long accepted, answered, failed, cancelled, expired;
    long long batches, requests, rows, largest, in_flight;
    PyObject *hist; /* batch size -> batches */
    int64_t *waits, *lats; /* rings of RING_CAP: queue wait and latency per computed request */
    Py_ssize_t ring_n, ring_pos;
    int64_t run_sum_ns;
    long long run_count;
    /* adaptive batching estimates */
    int64_t last_arrival_ns;
    double ia_est_ns, run_est_ns;
    int wake_unlocked; /* wake sleeping callers with the GIL released */
    struct Stage *stage; /* the registered staging buffer, or NULL */
    PyObject *staged;    /* what the last take's detach found: (buffer, rows), or NULL */
    long long staged_batches, staged_by_callers;
    PyObject *undelivered;      /* deliveries a failed take made: the next take returns them */
    Py_ssize_t fault_countdown; /* _q_fault: the n-th next fallible step of a take fails */
} QueueObject;

static PyTypeObject QueueType;
static PyObject *s_shape, *s_dtype, *s_device, *s_name, *s_set_running, *s_pin_key, *s_is_contiguous, *s_is_neg, *s_data_ptr;
static PyObject *QueueFull; /* queue.Full */

static agx_sleeper room_sleeper(QueueObject *q) {
    return (agx_sleeper){NULL, &q->room_sleepers, &q->room_mu, &q->room_cv};
}

static int room_ready(void *arg) {
    QueueObject *q = arg;
    return atomic_load(&q->closed) || atomic_load(&q->count) < atomic_load(&q->max_queue);
}

static void wake_room(QueueObject *q) {
    agx_sleeper s = room_sleeper(q);
    agx_cv_wake(&s, 1);
}

/* The Batcher's name for messages (the subclass's attribute), or '?'. */
static PyObject *queue_name(QueueObject *q) {
    PyObject *n = PyObject_GetAttr((PyObject *)q, s_name);
    if (n == NULL) {
        PyErr_Clear();
        n = PyUnicode_FromString("?");
    }
    return n;
}

static void set_named_error(QueueObject *q, PyObject *type, const char *fmt_after_name, PyObject *arg) {
    PyObject *name = queue_name(q);
    if (name == NULL) return;
    PyObject *msg = arg ? PyUnicode_FromFormat(fmt_after_name, name, arg) : PyUnicode_FromFormat(fmt_after_name, name);
    Py_DECREF(name);
    if (msg) {
        PyErr_SetObject(type, msg);
        Py_DECREF(msg);
    }
}

static PyObject *new_named_error(QueueObject *q, PyObject *type, const char *fmt_after_name) {
    PyObject *name = queue_name(q);
    if (name == NULL) return NULL;
    PyObject *msg = PyUnicode_FromFormat(fmt_after_name, name);
    Py_DECREF(name);
    if (msg == NULL) return NULL;
    PyObject *exc = PyObject_CallOneArg(type, msg);
    Py_DECREF(msg);
    return exc;
}

/* A timeout argument: None (-1) or seconds >= 0, as nanoseconds (huge: none). */
static int parse_timeout(PyObject *t, int64_t *ns, double *secs) {
    *ns = -1;
    *secs = -1;
    if (t == NULL || t == Py_None) return 0;
    if (PyBool_Check(t) || !(PyFloat_Check(t) || PyLong_Check(t))) {
        PyErr_Format(PyExc_TypeError, "timeout must be None or a number of seconds >= 0, got %R", t);
        return -1;
    }
    double v = PyFloat_AsDouble(t);
    if (v == -1.0 && PyErr_Occurred()) return -1;
    if (!(v >= 0)) {
        PyErr_Format(PyExc_ValueError, "timeout must be None or a number of seconds >= 0, got %R", t);
        return -1;
    }
    *secs = v;
    *ns = v > 1e9 ? -1 : (int64_t)(v * NS);
    return 0;
}

/* ---------------------------------------------------------- describing a request */

/* The key's number: equal keys get one number (compared here, in the caller, so
 * that a key that compares with an error fails its own caller). */
static int intern_key(QueueObject *q, PyObject *key, Py_ssize_t *out) {
    PyObject *id = PyDict_GetItemWithError(q->keys, key);
    if (id != NULL) {
        *out = PyLong_AsSsize_t(id);
        return 0;
    }
    if (PyErr_Occurred()) return -1;
    if (PyDict_GET_SIZE(q->keys) >= MAX_KEYS) PyDict_Clear(q->keys); /* queued ones keep their numbers */
    PyObject *num = PyLong_FromSsize_t(q->next_key);
    if (num == NULL) return -1;
    int rc = PyDict_SetItem(q->keys, key, num);
    Py_DECREF(num);
    if (rc < 0) return -1;
    *out = q->next_key++;
    return 0;
}

/* torch tensors: shape a tuple (torch.Size) of exact ints; NULL key otherwise
 * (no error set): the slow path decides. */
static PyObject *fast_key(QueueObject *q, PyObject *x, Py_ssize_t *rows, Py_ssize_t *length) {
    PyObject *key = NULL, *dims = NULL;
    PyObject *shape = PyObject_GetAttr(x, s_shape);
    if (shape == NULL) goto fail;
    if (!PyTuple_Check(shape)) goto fail;
    Py_ssize_t n = PyTuple_GET_SIZE(shape);
    if (n < 1) goto fail;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyLong_CheckExact(PyTuple_GET_ITEM(shape, i))) goto fail;
    *rows = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, 0));
    if (*rows < 0) goto fail;
    if (q->pad_dim < 0) {
        *length = 0;
        dims = PyTuple_GetSlice(shape, 1, n);
    } else {
        if (q->pad_dim >= n) goto fail;
        *length = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, q->pad_dim));
        if (*length < 0 || (q->max_length >= 0 && *length > q->max_length)) goto fail;
        dims = PyTuple_New(n - 2);
        if (dims == NULL) goto fail;
        for (Py_ssize_t i = 1, j = 0; i < n; i++) {
            if (i == q->pad_dim) continue;
            PyTuple_SET_ITEM(dims, j++, Py_NewRef(PyTuple_GET_ITEM(shape, i)));
        }
    }
    if (dims == NULL) goto fail;
    PyObject *dtype = PyObject_GetAttr(x, s_dtype);
    if (dtype == NULL) goto fail;
    PyObject *device = PyObject_GetAttr(x, s_device);
    if (device == NULL) {
        Py_DECREF(dtype);
        goto fail;
    }
    key = PyTuple_Pack(3, dims, dtype, device);
    Py_DECREF(dtype);
    Py_DECREF(device);
fail:
    Py_XDECREF(shape);
    Py_XDECREF(dims);
    if (key == NULL) PyErr_Clear();
    return key;
}

/* Set r's key, rows and length from x, or raise in the caller. */
static int describe(QueueObject *q, ReqObject *r, PyObject *x) {
    Py_ssize_t rows = 0, length = 0;
    PyObject *key = fast_key(q, x, &rows, &length);
    if (key == NULL) {
        if (q->describe == NULL) {
            PyErr_Format(PyExc_TypeError, "requests must be tensors with a batch dimension, got %.200s",
                         Py_TYPE(x)->tp_name);
            return -1;
        }
        PyObject *d = PyObject_CallOneArg(q->describe, x);
        if (d == NULL) return -1;
        if (!PyTuple_Check(d) || PyTuple_GET_SIZE(d) != 3) {
            Py_DECREF(d);
            PyErr_SetString(PyExc_TypeError, "RequestQueue describe() must return (key, rows, length)");
            return -1;
        }
        key = Py_NewRef(PyTuple_GET_ITEM(d, 0));
        rows = PyLong_AsSsize_t(PyTuple_GET_ITEM(d, 1));
        length = PyLong_AsSsize_t(PyTuple_GET_ITEM(d, 2));
        Py_DECREF(d);
        if ((rows == -1 || length == -1) && PyErr_Occurred()) {
            Py_DECREF(key);
            return -1;
        }
    }
    int rc = intern_key(q, key, &r->key);
    Py_DECREF(key);
    r->rows = rows;
    r->length = length;
    return rc;
}

/* ------------------------------------------------------------------ staging */

typedef struct {
    ReqObject *r; /* references: a request given rows, and its input */
    PyObject *x;
    int mine;     /* the take that detached the stage claimed this copy */
} StageEntry;

typedef struct Stage {
    PyObject *buf;  /* the buffer (a reference): rows of row_bytes from ptr */
    PyObject *type; /* the exact type a request must have (torch.Tensor) */
    char *ptr;
    Py_ssize_t key, row_bytes, cap_rows, used_rows;
    int single; /* a row is one element: requests of one row are asked is_neg() */
    Py_ssize_t n;         /* the requests given rows, in order */
    StageEntry *entries; /* room for cap_rows (a request has a row at least) */
    _Atomic Py_ssize_t copying; /* copies given out and not yet made */
} Stage;

/* Drop a detached stage's references (may run finalizers: call it last). */
static void stage_free(Stage *st) {
    if (st == NULL) return;
    for (Py_ssize_t i = 0; i < st->n; i++) {
        if (st->entries[i].r->stage == st) st->entries[i].r->stage = NULL;
        Py_DECREF(st->entries[i].r);
        Py_DECREF(st->entries[i].x);
    }
    Py_XDECREF(st->buf);
    Py_XDECREF(st->type);
    PyMem_Free(st->entries);
    PyMem_Free(st);
}

/* x's first byte if x.is_contiguous() and (check_neg) not x.is_neg(), from
 * x.data_ptr(); else NULL, no error set. A negated view's memory holds the
 * values before negation; torch's public API makes a contiguous one only of a
 * single element (the .imag of a conjugated complex tensor), and is_neg()
 * releases the GIL (a handoff on the caller's path), so it is asked only for
 * single elements (check_neg). */
static const char *contiguous_data(PyObject *x, int check_neg) {
    PyObject *c = PyObject_CallMethodNoArgs(x, s_is_contiguous);
    int ok = c == Py_True;
    Py_XDECREF(c);
    if (ok && check_neg) {
        c = PyObject_CallMethodNoArgs(x, s_is_neg);
        ok = c == Py_False;
        Py_XDECREF(c);
    }
    if (!ok) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *p = PyObject_CallMethodNoArgs(x, s_data_ptr);
    void *ptr = p ? PyLong_AsVoidPtr(p) : NULL;
    Py_XDECREF(p);
    if (ptr == NULL) PyErr_Clear();
    return ptr;
}

/* Whether r (input x) may be staged: the registered stage's key and type,
 * and x contiguous (then x's data, else NULL). Calls x's methods, and torch
 * releases the GIL inside is_neg(): so it runs before stage_assign, never
 * between its checks and its update (there another caller could take the rows
 * this one was checked against, and its copy would run past the buffer). */
static const char *stage_src(QueueObject *q, ReqObject *r, PyObject *x) {
    Stage *st = q->stage;
    if (st == NULL || x == NULL || r->key != st->key || Py_TYPE(x) != (PyTypeObject *)st->type || r->rows < 1)
        return NULL;
    return contiguous_data(x, st->single && r->rows == 1);
}

/* Give r (input x, data src from stage_src) the next rows of the registered
 * stage if it still fits there; otherwise it is concatenated as usual. Plain C
 * with the GIL held: nothing between the checks and the update can let
 * another thread in. */
static void stage_assign(QueueObject *q, ReqObject *r, PyObject *x, const char *src) {
    Stage *st = q->stage;
    if (st == NULL || src == NULL || x == NULL || r->key != st->key || Py_TYPE(x) != (PyTypeObject *)st->type ||
        r->rows < 1 || st->used_rows + r->rows > st->cap_rows)
        return;
    r->src = src;
    r->nbytes = r->rows * st->row_bytes;
    r->dst = st->ptr + st->used_rows * st->row_bytes;
    r->stage = st;
    st->entries[st->n].r = (ReqObject *)Py_NewRef((PyObject *)r);
    st->entries[st->n].x = Py_NewRef(x);
    st->entries[st->n].mine = 0;
    st->n++;
    st->used_rows += r->rows;
    atomic_fetch_add(&st->copying, 1);
    atomic_store(&r->copy_state, COPY_PENDING);
}

/* A caller's own copy, run with the GIL released (agx_wakeup_wait_then): made
 * here unless the dispatcher claimed it first. */
static void stage_copy_released(void *arg) {
    ReqObject *r = arg;
    int pending = COPY_PENDING;
    if (!atomic_compare_exchange_strong(&r->copy_state, &pending, COPY_CLAIMED)) return;
    Stage *st = r->stage; /* valid until the decrement: a detach waits for it */
    memcpy(r->dst, r->src, (size_t)r->nbytes);
    atomic_fetch_sub(&st->copying, 1);
}

static int no_copies_running(void *arg) { return atomic_load(&((Stage *)arg)->copying) == 0; }

/* Unregister the stage (GIL held), then with the GIL released make every copy
 * nobody claimed yet and wait for those in progress. NULL if none was
 * registered. The caller frees it (stage_free). */
static Stage *stage_detach(QueueObject *q) {
    Stage *st = q->stage;
    if (st == NULL) return NULL;
    q->stage = NULL;
    Py_ssize_t mine = 0;
    for (Py_ssize_t i = 0; i < st->n; i++) {
        int pending = COPY_PENDING;
        st->entries[i].mine = atomic_compare_exchange_strong(&st->entries[i].r->copy_state, &pending, COPY_CLAIMED);
        mine += st->entries[i].mine;
    }
    q->staged_by_callers += st->n - mine;
    if (mine == 0 && no_copies_running(st)) return st; /* the callers made every copy */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < st->n; i++) {
        if (!st->entries[i].mine) continue;
        ReqObject *r = st->entries[i].r;
        memcpy(r->dst, r->src, (size_t)r->nbytes);
        atomic_fetch_sub(&st->copying, 1);
    }
    /* a caller's copy in progress is one memcpy; its thread may be descheduled */
    if (!agx_spin_until(no_copies_running, st, 100 * 1000))
        while (!no_copies_running(st)) {
            struct timespec ts = {0, 20 * 1000};
            nanosleep(&ts, NULL);
        }
    Py_END_ALLOW_THREADS
    return st;
}

/* After a take formed `batch` (finish_take done) with `st` detached: record for
 * _staged() whether the batch is exactly st's first rows, in order. */
static int stage_judge(QueueObject *q, Stage *st, PyObject *batch) {
    Py_ssize_t n = PyList_GET_SIZE(batch), rows = 0;
    int ok = n >= 1 && n <= st->n;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        ok = PyList_GET_ITEM(batch, i) == (PyObject *)st->entries[i].r;
        rows += st->entries[i].r->rows;
    }
    if (ok) q->staged_batches++;
    PyObject *t = Py_BuildValue("(On)", st->buf, ok ? rows : (Py_ssize_t)0);
    if (t == NULL) return -1;
    Py_XSETREF(q->staged, t);
    return 0;
}

/* ------------------------------------------------------------------ enqueuing */

/* Wait (GIL released) until there is room, the queue closes, or room_deadline
 * passes (then queue.Full). Returns 0 to look again, -1 with an exception. */
static int wait_for_room(QueueObject *q, int64_t deadline_ns, double timeout_s) {
    int64_t now = agx_now_ns();
    if (deadline_ns >= 0 && now >= deadline_ns) {
        PyObject *t = PyFloat_FromDouble(timeout_s);
        if (t == NULL) return -1;
        PyObject *name = queue_name(q);
        if (name) {
            PyErr_Format(QueueFull, "Batcher %R: queue full (%zd requests) for %R s", name,
                         (Py_ssize_t)atomic_load(&q->max_queue), t);
            Py_DECREF(name);
        }
        Py_DECREF(t);
        return -1;
    }
    int64_t slice = now + AGX_SLICE_NS;
    if (deadline_ns >= 0 && deadline_ns < slice) slice = deadline_ns;
    agx_sleeper s = room_sleeper(q);
    Py_BEGIN_ALLOW_THREADS
    agx_cv_sleep_until(&s, room_ready, q, slice);
    Py_END_ALLOW_THREADS
    if (PyErr_CheckSignals() < 0) return -1;
    if (atomic_load(&q->closed)) {
        set_named_error(q, PyExc_RuntimeError,
                        "Batcher %R closed while this request waited for room; it was not accepted", NULL);
        return -1;
    }
    return 0;
}

/* Queue r (taking a reference), waiting for room up to room_deadline_ns (0: not
 * at all, -1: for ever), and wake the dispatcher if it waits for this many. */
static int push(QueueObject *q, ReqObject *r, int64_t room_deadline_ns, double timeout_s) {
    const char *src = q->stage ? stage_src(q, r, r->x) : NULL;
    if (atomic_load(&q->closed)) {
        if (q->closed_msg) PyErr_SetObject(PyExc_RuntimeError, q->closed_msg);
        else PyErr_SetString(PyExc_RuntimeError, "closed");
        return -1;
    }
    while (atomic_load(&q->count) >= atomic_load(&q->max_queue))
        if (wait_for_room(q, room_deadline_ns, timeout_s) < 0) return -1;
    int64_t now = agx_now_ns();
    r->t_ns = now;
    if (q->last_arrival_ns) {
        double gap = (double)(now - q->last_arrival_ns);
        q->ia_est_ns = q->ia_est_ns == 0 ? gap : q->ia_est_ns * 0.8 + gap * 0.2;
    }
    q->last_arrival_ns = now;
    if (src) stage_assign(q, r, r->x, src);
    r->next = NULL;
    Py_INCREF(r);
    if (q->tail) q->tail->next = r;
    else q->head = r;
    q->tail = r;
    Py_ssize_t n = atomic_load(&q->count) + 1;
    atomic_store(&q->count, n);
    q->accepted++;
    if (q->sleeping && n >= q->wake_at) {
        q->sleeping = 0;
        agx_event_set(&q->wake);
    }
    return 0;
}

static int maybe_pin(QueueObject *q) {
    PyObject *d = PyThreadState_GetDict();
    if (d == NULL) return 0;
    PyObject *cur = PyDict_GetItemWithError(d, s_pin_key);
    if (cur == q->pin_obj) return 0;
    if (cur == NULL && PyErr_Occurred()) return -1;
    if (PyDict_SetItem(d, s_pin_key, q->pin_obj) < 0) return -1;
    PyObject *res = PyObject_CallNoArgs(q->pin_hook);
    Py_XDECREF(res);
    return res ? 0 : -1;
}

/* Count a request its caller gave up (the caller just claimed it). */
static void count_given_up(QueueObject *q, ReqObject *r) {
    Py_CLEAR(r->x);
    if (r->timed_out || (r->deadline_ns >= 0 && agx_now_ns() >= r->deadline_ns)) q->expired++;
    else q->cancelled++;
}

/* Hand over a stored exception with its traceback (fn's frames). */
static PyObject *raise_stored(PyObject *error) {
    PyObject *tb = PyException_GetTraceback(error);
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(error)), error, tb);
    return NULL;
}

/* The synchronous call: enqueue, wait (GIL released), answer. */
static PyObject *queue_call(QueueObject *q, PyObject *x, PyObject *timeout) {
    int64_t timeout_ns;
    double timeout_s;
    if (parse_timeout(timeout, &timeout_ns, &timeout_s) < 0) return NULL;
    if (q->pin_hook && maybe_pin(q) < 0) return NULL;
    ReqObject *r = req_new(REQ_CALL);
    if (r == NULL) return NULL;
    if (describe(q, r, x) < 0) goto fail;
    int64_t deadline = timeout_ns < 0 ? -1 : agx_now_ns() + timeout_ns;
    r->x = Py_NewRef(x);
    r->deadline_ns = deadline;
    if (push(q, r, deadline, timeout_s) < 0) goto fail;
    void (*copy)(void *) = atomic_load(&r->copy_state) == COPY_PENDING ? stage_copy_released : NULL;
    for (;;) {
        int got = agx_wakeup_wait_then(&r->ev, deadline, q->spin_ns, copy, r);
        copy = NULL;
        if (got == 1) break;
        if (got < 0) { /* a signal handler raised (KeyboardInterrupt): give up */
            if (!r->claimed) {
                r->claimed = 1;
                count_given_up(q, r);
            }
            goto fail;
        }
        if (!r->claimed) { /* timed out: the dispatcher drops it, or discards its answer */
            r->claimed = r->timed_out = 1;
            count_given_up(q, r);
            PyObject *t = PyFloat_FromDouble(timeout_s);
            if (t) {
                set_named_error(q, PyExc_TimeoutError, "Batcher %R: no result within %R s", t);
                Py_DECREF(t);
            }
            goto fail;
        }
        /* answered as the deadline passed: its event is set (answers are set with the GIL) */
        deadline = -1;
    }
    PyObject *value = r->value, *error = r->error;
    r->value = r->error = NULL;
    Py_DECREF(r);
    if (error) {
        Py_XDECREF(value);
        return raise_stored(error);
    }
    return value ? value : Py_NewRef(Py_None);
fail:
    Py_DECREF(r);
    return NULL;
}

static PyObject *Queue_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *x = NULL, *timeout = NULL;
    if (nargs >= 1) x = args[0];
    if (nargs == 2) timeout = args[1];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(k, "timeout") == 0 && timeout == NULL) timeout = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(k, "x") == 0 && x == NULL) x = args[nargs + i];
        else goto bad;
    }
    if (x == NULL || nargs > 2) goto bad;
    return queue_call((QueueObject *)self, x, timeout);
bad:
    PyErr_SetString(PyExc_TypeError, "a Batcher is called as batcher(x, timeout=None)");
    return NULL;
}

static PyObject *Queue_call(PyObject *self, PyObject *args, PyObject *kw) {
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    if (kw == NULL || PyDict_GET_SIZE(kw) == 0) {
        if (nargs == 1) return queue_call((QueueObject *)self, PyTuple_GET_ITEM(args, 0), NULL);
        if (nargs == 2) return queue_call((QueueObject *)self, PyTuple_GET_ITEM(args, 0), PyTuple_GET_ITEM(args, 1));
    }
    return PyVectorcall_Call(self, args, kw);
}

/* _put(x, payload, is_async, room_timeout, timeout) -> Request */
static PyObject *Queue_put(QueueObject *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "_q_put(x, payload, is_async, room_timeout, timeout)");
        return NULL;
    }
    int is_async = PyObject_IsTrue(args[2]);
    if (is_async < 0) return NULL;
    int64_t room_ns, t_ns;
    double room_s, t_s;
    if (parse_timeout(args[3], &room_ns, &room_s) < 0 || parse_timeout(args[4], &t_ns, &t_s) < 0) return NULL;
    if (q->pin_hook && maybe_pin(q) < 0) return NULL;
    ReqObject *r = req_new(is_async ? REQ_ASYNC : REQ_FUTURE);
    if (r == NULL) return NULL;
    if (describe(q, r, args[0]) < 0) goto fail;
    int64_t now = agx_now_ns();
    r->x = Py_NewRef(args[0]);
    r->payload = Py_NewRef(args[1]);
    r->deadline_ns = t_ns < 0 ? -1 : now + t_ns;
    if (push(q, r, room_ns < 0 ? -1 : now + room_ns, room_s) < 0) goto fail;
    return (PyObject *)r;
fail:
    Py_CLEAR(r->payload);
    Py_DECREF(r);
    return NULL;
}

/* ------------------------------------------------------------------ answering */

/* The steps of a take or an answer that need memory go through fallible():
 * _q_fault(n) makes the n-th next one fail with MemoryError, so tests can
 * check that a failure loses no request (a failed take leaves the queue as it
 * was; the deliveries already made wait for the next take). */
static int fallible(QueueObject *q) {
    if (q->fault_countdown > 0 && --q->fault_countdown == 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int fallible_append(QueueObject *q, PyObject *list, PyObject *item) {
    return fallible(q) < 0 ? -1 : PyList_Append(list, item);
}

static PyObject *fallible_list(QueueObject *q, Py_ssize_t n) { return fallible(q) < 0 ? NULL : PyList_New(n); }


/* Deliver a claimed request: a call's caller is woken; a future's triple goes to
 * `deliver` for Python. Returns -1 only when the triple cannot be made. */
static int deliver_one(ReqObject *r, PyObject *value, PyObject *error, PyObject *deliver) {
    if (r->kind == REQ_CALL) {
        Py_CLEAR(r->x);
        if (error) r->error = Py_NewRef(error);
        else r->value = Py_NewRef(value ? value : Py_None);
        if (deliver) agx_event_set(&r->ev); /* r belongs to its caller again */
        return 0;             /* (deliver NULL: the caller of deliver_one sets the event) */
    }
    PyObject *t = PyTuple_Pack(3, r->payload, error ? Py_None : (value ? value : Py_None), error ? error : Py_None);
    if (t == NULL) return -1;
    int rc = PyList_Append(deliver, t);
    Py_DECREF(t);
    if (rc == 0) Py_CLEAR(r->x); /* on failure r is as it was (a take leaves it queued) */
    return rc;
}

static void record_sample(QueueObject *q, int64_t wait, int64_t lat) {
    if (q->waits == NULL) {
        q->waits = PyMem_RawMalloc(sizeof(int64_t) * RING_CAP);
        q->lats = PyMem_RawMalloc(sizeof(int64_t) * RING_CAP);
        if (q->waits == NULL || q->lats == NULL) {
            PyMem_RawFree(q->waits);
            PyMem_RawFree(q->lats);
            q->waits = q->lats = NULL;
            return;
        }
    }
    q->waits[q->ring_pos] = wait;
    q->lats[q->ring_pos] = lat;
    q->ring_pos = (q->ring_pos + 1) % RING_CAP;
    if (q->ring_n < RING_CAP) q->ring_n++;
}

static int check_reqs(PyObject *reqs) {
    if (!PyList_Check(reqs)) {
        PyErr_SetString(PyExc_TypeError, "expected a list of requests");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(reqs); i++)
        if (!Py_IS_TYPE(PyList_GET_ITEM(reqs, i), &ReqType)) {
            PyErr_SetString(PyExc_TypeError, "expected a list of requests");
            return -1;
        }
    return 0;
}

/* Count an answered batch of n requests that ran run_ns: in flight no more,
 * batch and size statistics, the run-time estimate. */
static void count_batch(QueueObject *q, Py_ssize_t n, int64_t run_ns) {
    q->in_flight -= n;
    if (q->in_flight < 0) q->in_flight = 0;
    q->batches++;
    q->requests += n;
    if (n > q->largest) q->largest = n;
    double run = (double)run_ns;
    q->run_sum_ns += run_ns;
    q->run_count++;
    q->run_est_ns = q->run_est_ns == 0 ? run : q->run_est_ns * 0.8 + run * 0.2;
    PyObject *k = PyLong_FromSsize_t(n);
    if (k) {
        PyObject *old = PyDict_GetItemWithError(q->hist, k);
        long long c = old ? PyLong_AsLongLong(old) + 1 : 1;
        PyObject *v = PyLong_FromLongLong(c);
        if (v == NULL || PyDict_SetItem(q->hist, k, v) < 0) PyErr_Clear(); /* a statistic only */
        Py_XDECREF(v);
        Py_DECREF(k);
    } else {
        PyErr_Clear();
    }
}

/* _complete(batch, results, error) -> deliveries: answer a batch the dispatcher
 * took (results: one per request) or fail it all with `error`; requests given up
 * are skipped (their answers discarded). Counts the batch. */
static PyObject *Queue_complete(QueueObject *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_q_complete(batch, results, error)");
        return NULL;
    }
    PyObject *batch = args[0], *results = args[1], *error = args[2] == Py_None ? NULL : args[2];
    if (check_reqs(batch) < 0) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(batch);
    PyObject *own_error = NULL;
    if (error == NULL && (!PyList_Check(results) || PyList_GET_SIZE(results) != n)) {
        own_error = PyUnicode_FromFormat("Batcher: %zd results for a batch of %zd requests",
                                         PyList_Check(results) ? PyList_GET_SIZE(results) : (Py_ssize_t)-1, n);
        if (own_error) {
            PyObject *e = PyObject_CallOneArg(PyExc_ValueError, own_error);
            Py_SETREF(own_error, e);
        }
        if (own_error == NULL) return NULL;
        error = own_error;
    }
    PyObject *deliver = PyList_New(0);
    if (deliver == NULL) {
        Py_XDECREF(own_error);
        return NULL;
    }
    int64_t done = agx_now_ns();
    int64_t start = n ? ((ReqObject *)PyList_GET_ITEM(batch, 0))->start_ns : done;
    int bad = 0;
    /* Calls are woken after every answer is stored: with the GIL released when a
     * caller sleeps (a futex wake each, which need not hold up the callers that
     * already woke), else with it held (a store each: the callers spin). */
    agx_event *small[64], **wake = n <= 64 ? small : PyMem_Malloc(sizeof(agx_event *) * n);
    Py_ssize_t nwake = 0;
    int sleeping = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        ReqObject *r = (ReqObject *)PyList_GET_ITEM(batch, i);
        record_sample(q, r->start_ns - r->t_ns, done - r->t_ns);
        q->rows += r->rows;
        if (r->claimed) continue; /* its caller gave up (counted then), or close() failed it */
        if (bad) continue;        /* after a failed delivery: left to the dispatcher's _q_fail */
        int later = r->kind == REQ_CALL && wake != NULL;
        if (fallible(q) < 0 ||
            deliver_one(r, error ? NULL : PyList_GET_ITEM(results, i), error, later ? NULL : deliver) < 0) {
            bad = 1; /* r stays unclaimed, as it was */
            continue;
        }
        r->claimed = 1;
        if (error) q->failed++;
        else q->answered++;
        if (later) {
            wake[nwake++] = &r->ev;
            sleeping |= atomic_load_explicit(&r->ev.sleepers, memory_order_relaxed) > 0;
        }
    }
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    if (bad) { /* out of memory: keep the deliveries made for the next take, wake the
                * calls answered (below), and leave the batch in flight for _q_fail(settle) */
        PyErr_Fetch(&et, &ev, &tb);
        if (PyList_GET_SIZE(deliver)) {
            if (q->undelivered == NULL) q->undelivered = Py_NewRef(deliver);
            else if (PyList_SetSlice(q->undelivered, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, deliver) < 0) PyErr_Clear();
        }
    } else {
        count_batch(q, n, done - start);
    }
    /* counted before anyone is woken: a caller that reads stats() sees its batch */
    if (nwake && sleeping && q->wake_unlocked) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < nwake; i++) agx_event_set(wake[i]);
        Py_END_ALLOW_THREADS
    } else {
        for (Py_ssize_t i = 0; i < nwake; i++) agx_event_set(wake[i]);
    }
    if (wake != small) PyMem_Free(wake);
    Py_XDECREF(own_error);
    if (bad) {
        Py_DECREF(deliver);
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    return deliver;
}

/* _fail(reqs, exc_type, message, expired=False, settle=False) -> deliveries:
 * fail each request nobody finished yet with exc_type(message) (one exception
 * each), counted failed (or expired); settle: they were in flight and the
 * dispatcher let them go. */
static PyObject *Queue_fail(QueueObject *q, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"reqs", "exc_type", "message", "expired", "settle", NULL};
    PyObject *reqs, *type, *msg;
    int expired = 0, settle = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|pp:_fail", kwlist, &reqs, &type, &msg, &expired, &settle))
        return NULL;
    if (check_reqs(reqs) < 0) return NULL;
    PyObject *deliver = PyList_New(0);
    if (deliver == NULL) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(reqs);
    for (Py_ssize_t i = 0; i < n; i++) {
        ReqObject *r = (ReqObject *)PyList_GET_ITEM(reqs, i);
        if (r->claimed) continue;
        PyObject *exc = PyObject_CallOneArg(type, msg);
        if (exc == NULL) {
            Py_DECREF(deliver);
            return NULL;
        }
        r->claimed = 1;
        if (expired) q->expired++;
        else q->failed++;
        int rc = deliver_one(r, NULL, exc, deliver);
        Py_DECREF(exc);
        if (rc < 0) {
            Py_DECREF(deliver);
            return NULL;
        }
    }
    if (settle) {
        q->in_flight -= n;
        if (q->in_flight < 0) q->in_flight = 0;
    }
    return deliver;
}

/* _give_up(request) -> bool: its caller gives it up (timeout, cancellation)
 * unless it was finished already; counted cancelled or expired. */
static PyObject *Queue_give_up(QueueObject *q, PyObject *arg) {
    if (!Py_IS_TYPE(arg, &ReqType)) {
        PyErr_SetString(PyExc_TypeError, "_q_give_up(request)");
        return NULL;
    }
    ReqObject *r = (ReqObject *)arg;
    if (r->claimed) Py_RETURN_FALSE;
    r->claimed = 1;
    count_given_up(q, r);
    Py_RETURN_TRUE;
}

/* _recount(n): n deliveries counted answered or failed found their future set
 * by its caller already: count them cancelled instead. */
static PyObject *Queue_recount(QueueObject *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_q_recount(answered, failed)");
        return NULL;
    }
    long long a = PyLong_AsLongLong(args[0]), f = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    q->answered -= a;
    q->failed -= f;
    q->cancelled += a + f;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ forming batches */

/* How long (ns) a batch of n may wait for more (the Batcher's latency target). */
static int64_t batch_delay(QueueObject *q, Py_ssize_t n, Py_ssize_t max_batch, double max_delay_s, double target_s) {
    double delay = max_delay_s * NS;
    if (target_s < 0 || delay <= 0) return (int64_t)delay;
    double budget = target_s * NS - q->run_est_ns;
    double fill = (double)(max_batch - n) * q->ia_est_ns * 1.5;
    if (budget < delay) delay = budget;
    if (fill < delay) delay = fill;
    return delay > 0 ? (int64_t)delay : 0;
}

/* Sleep (GIL released) until a submitter sees wake_at queued, close(), or deadline. */
static void dispatcher_sleep(QueueObject *q, Py_ssize_t wake_at, int64_t deadline_ns) {
    q->wake_at = wake_at;
    q->sleeping = 1;
    int got = agx_wakeup_wait(&q->wake, deadline_ns, q->spin_ns);
    if (got < 0) PyErr_Clear(); /* a signal handler on the dispatcher thread: not its business */
    if (q->sleeping) q->sleeping = 0;                /* nobody woke it */
    else if (got != 1) agx_event_consume(&q->wake); /* woken right after its deadline */
}

/* Unlink r (whose predecessor is prev) from the queue; the queue's reference
 * goes to the caller. */
static void unlink_req(QueueObject *q, ReqObject *prev, ReqObject *r) {
    if (prev) prev->next = r->next;
    else q->head = r->next;
    if (q->tail == r) q->tail = prev;
    r->next = NULL;
    atomic_store(&q->count, atomic_load(&q->count) - 1);
}

/* Put a failed take's batch back at the head of the queue, in order. */
static void requeue_front(QueueObject *q, PyObject *batch) {
    for (Py_ssize_t i = PyList_GET_SIZE(batch) - 1; i >= 0; i--) {
        ReqObject *r = (ReqObject *)Py_NewRef(PyList_GET_ITEM(batch, i));
        r->next = q->head;
        q->head = r;
        if (q->tail == NULL) q->tail = r;
        atomic_store(&q->count, atomic_load(&q->count) + 1);
    }
}

/* Move queued requests of `key` into batch (oldest first, up to max_batch);
 * others keep their places. Given-up requests leave the queue (to `drop`);
 * expired ones are failed with TimeoutError (calls woken, futures to deliver). */
static int take_key(QueueObject *q, Py_ssize_t key, PyObject *batch, Py_ssize_t max_batch, PyObject *deliver,
                    PyObject *drop) {
    ReqObject *prev = NULL, *r = q->head;
    int64_t now = -1;
    while (r && PyList_GET_SIZE(batch) < max_batch) {
        ReqObject *next = r->next;
        int take = 0, remove = 0;
        if (r->claimed) {
            remove = 1;
        } else {
            if (r->deadline_ns >= 0) {
                if (now < 0) now = agx_now_ns();
                if (now >= r->deadline_ns) remove = 2;
            }
            if (!remove && r->key == key) take = remove = 1;
        }
        if (remove == 2) { /* expired before its batch formed: never computed */
            PyObject *exc = new_named_error(
                q, PyExc_TimeoutError, "Batcher %R: the request's timeout passed before its batch formed");
            Py_ssize_t had = PyList_GET_SIZE(deliver);
            if (exc == NULL || fallible_append(q, drop, (PyObject *)r) < 0) {
                Py_XDECREF(exc);
                return -1; /* it stays queued, untouched */
            }
            r->claimed = 1;
            if (fallible(q) < 0 || deliver_one(r, NULL, exc, deliver) < 0) {
                r->claimed = 0; /* not delivered: it stays queued for the next take */
                PyList_SetSlice(deliver, had, PyList_GET_SIZE(deliver), NULL);
                PyList_SetSlice(drop, PyList_GET_SIZE(drop) - 1, PyList_GET_SIZE(drop), NULL);
                Py_DECREF(exc);
                return -1;
            }
            Py_DECREF(exc);
            q->expired++;
        } else if (remove && fallible_append(q, take ? batch : drop, (PyObject *)r) < 0) {
            return -1; /* it stays queued */
        }
        if (remove) {
            /* the queue's reference moves to batch or drop (both lists hold one
             * until the end of the dispatcher's call) */
            unlink_req(q, prev, r);
            Py_DECREF(r);
        } else {
            prev = r;
        }
        r = next;
    }
    return 0;
}

/* list[to] = list[from] (to < from; both slots filled). */
static void list_move(PyObject *list, Py_ssize_t from, Py_ssize_t to) {
    PyObject *old = PyList_GET_ITEM(list, to);
    PyList_SET_ITEM(list, to, Py_NewRef(PyList_GET_ITEM(list, from)));
    Py_DECREF(old);
}

/* After taking: futures (submit) go running, or leave the batch if cancelled or
 * set by their caller (counted cancelled). Then the batch is in flight: its
 * inputs, rows and lengths come back as lists. Python code may run here (a
 * Future's lock): the queue is consistent by now. */
static PyObject *finish_take(QueueObject *q, PyObject *batch, PyObject *deliver) {
    /* everything that needs memory first, while a failure can still leave the
     * requests as they were (the take then puts them back) */
    Py_ssize_t n = PyList_GET_SIZE(batch), kept = 0;
    PyObject *xs = fallible_list(q, n), *rows = fallible_list(q, n);
    PyObject *lens = q->pad_dim >= 0 ? fallible_list(q, n) : Py_NewRef(Py_None);
    PyObject *out = fallible(q) < 0 ? NULL : PyTuple_New(5);
    if (xs == NULL || rows == NULL || lens == NULL || out == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        ReqObject *r = (ReqObject *)PyList_GET_ITEM(batch, i);
        PyObject *v = fallible(q) < 0 ? NULL : PyLong_FromSsize_t(r->rows);
        if (v == NULL) goto fail;
        PyList_SET_ITEM(rows, i, v);
        if (lens != Py_None) {
            v = PyLong_FromSsize_t(r->length);
            if (v == NULL) goto fail;
            PyList_SET_ITEM(lens, i, v);
        }
    }
    /* futures (submit) go running, or leave the batch if cancelled or set by
     * their caller (counted cancelled); nothing below can fail */
    for (Py_ssize_t i = 0; i < n; i++) {
        ReqObject *r = (ReqObject *)PyList_GET_ITEM(batch, i);
        int keep = 1;
        if (r->kind == REQ_FUTURE) {
            PyObject *res = PyObject_CallMethodNoArgs(r->payload, s_set_running);
            keep = res ? PyObject_IsTrue(res) : 0; /* RuntimeError: its caller set it */
            if (keep < 0) keep = 0;
            Py_XDECREF(res);
            if (!res) PyErr_Clear();
            if (!keep && !r->claimed) {
                r->claimed = 1;
                Py_CLEAR(r->x);
                q->cancelled++;
            }
        }
        if (keep) {
            if (kept != i) { /* move request i, its rows and length to slot kept */
                list_move(batch, i, kept);
                list_move(rows, i, kept);
                if (lens != Py_None) list_move(lens, i, kept);
            }
            kept++;
        }
    }
    if (kept != n) { /* shrinking a list needs no memory */
        PyList_SetSlice(batch, kept, n, NULL);
        PyList_SetSlice(rows, kept, n, NULL);
        if (lens != Py_None) PyList_SetSlice(lens, kept, n, NULL);
        PyList_SetSlice(xs, kept, n, NULL);
    }
    n = kept;
    int64_t now = agx_now_ns();
    for (Py_ssize_t i = 0; i < n; i++) {
        ReqObject *r = (ReqObject *)PyList_GET_ITEM(batch, i);
        r->start_ns = now;
        PyList_SET_ITEM(xs, i, r->x ? r->x : Py_NewRef(Py_None)); /* the list takes r's reference */
        r->x = NULL;
    }
    q->in_flight += n;
    if (atomic_load(&q->room_sleepers)) wake_room(q);
    PyTuple_SET_ITEM(out, 0, Py_NewRef(batch));
    PyTuple_SET_ITEM(out, 1, xs);
    PyTuple_SET_ITEM(out, 2, rows);
    PyTuple_SET_ITEM(out, 3, lens);
    PyTuple_SET_ITEM(out, 4, Py_NewRef(deliver));
    return out;
fail:
    Py_XDECREF(xs);
    Py_XDECREF(rows);
    Py_XDECREF(lens);
    Py_XDECREF(out);
    return NULL;
}

/* A take formed `batch`: finish the take (the inputs move to its xs list, so a
 * caller giving up while the GIL is released below takes nothing from the
 * batch), then, if the batch is not empty, detach the stage (its copies made)
 * and judge it against the batch. */
static PyObject *take_formed(QueueObject *q, PyObject *batch, PyObject *deliver) {
    PyObject *out = finish_take(q, batch, deliver);
    Stage *st = out && PyList_GET_SIZE(batch) ? stage_detach(q) : NULL;
    if (st && stage_judge(q, st, batch) < 0) {
        PyErr_Clear(); /* no memory for the verdict: the batch is concatenated as usual */
        Py_CLEAR(q->staged);
    }
    stage_free(st);
    return out;
}

/* A take's three lists: its batch, its deliveries (starting with those a
 * failed take left) and the requests it drops. -1 when out of memory. */
static int take_lists(QueueObject *q, PyObject **batch, PyObject **deliver, PyObject **drop) {
    *batch = PyList_New(0);
    *drop = PyList_New(0);
    *deliver = q->undelivered ? q->undelivered : PyList_New(0);
    q->undelivered = NULL;
    return *batch && *drop && *deliver ? 0 : -1;
}

/* A take failed (an exception is set): the requests it took go back to the
 * head of the queue, in order, and the deliveries it made wait for the next
 * take, so that nothing is lost. */
static void take_failed(QueueObject *q, PyObject *batch, PyObject *deliver) {
    if (batch) requeue_front(q, batch);
    if (deliver && PyList_GET_SIZE(deliver)) Py_XSETREF(q->undelivered, Py_NewRef(deliver));
}

/* _take(max_batch, max_delay_s, target_s) -> (batch, xs, rows, lengths,
 * deliveries), or None once closed and drained. Waits (GIL released) for a
 * request, then while the batch is not full up to the delay counted from its
 * oldest request's arrival. batch may be empty (only deliveries to make). */
static PyObject *Queue_take(QueueObject *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_q_take(max_batch, max_delay_s, target_s)");
        return NULL;
    }
    Py_ssize_t max_batch = PyLong_AsSsize_t(args[0]);
    double max_delay = PyFloat_AsDouble(args[1]);
    double target = args[2] == Py_None ? -1 : PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (max_batch < 1) max_batch = 1;
    PyObject *batch, *deliver, *drop, *out = NULL;
    if (take_lists(q, &batch, &deliver, &drop) < 0) goto failed;
    if (PyList_GET_SIZE(deliver)) goto ready; /* left by a failed call: out at once */
    int64_t delay = batch_delay(q, 0, max_batch, max_delay, target);
    if (q->head == NULL && !atomic_load(&q->closed) && delay > 0 && max_batch > 1)
        dispatcher_sleep(q, max_batch, agx_now_ns() + delay);
    Py_ssize_t head_key = 0;
    int64_t head_t = 0;
    while (PyList_GET_SIZE(batch) == 0) {
        while (q->head == NULL) {
            if (atomic_load(&q->closed)) {
                if (PyList_GET_SIZE(deliver)) goto ready; /* answer the expired first */
                out = Py_NewRef(Py_None);
                goto done;
            }
            dispatcher_sleep(q, 1, -1);
        }
        head_key = q->head->key;
        head_t = q->head->t_ns;
        if (take_key(q, head_key, batch, max_batch, deliver, drop) < 0) goto failed;
        if (PyList_GET_SIZE(batch) == 0 && PyList_GET_SIZE(deliver)) goto ready;
    }
    delay = batch_delay(q, PyList_GET_SIZE(batch), max_batch, max_delay, target);
    if (PyList_GET_SIZE(batch) < max_batch && delay > 0 && !atomic_load(&q->closed)) {
        int64_t deadline = head_t + delay;
        for (;;) {
            if (deadline <= agx_now_ns()) break;
            dispatcher_sleep(q, atomic_load(&q->count) + max_batch - PyList_GET_SIZE(batch), deadline);
            if (take_key(q, head_key, batch, max_batch, deliver, drop) < 0) goto failed;
            if (PyList_GET_SIZE(batch) >= max_batch || atomic_load(&q->closed)) break;
        }
    }
ready:
    out = take_formed(q, batch, deliver);
    if (out == NULL) take_failed(q, batch, deliver);
done:
    Py_XDECREF(batch);
    Py_XDECREF(deliver);
    Py_XDECREF(drop); /* may run finalizers: the queue is consistent */
    return out;
failed:
    take_failed(q, batch, deliver);
    goto done;
}

/* _take_ready(max_batch) -> as _take, or None: a batch only if max_batch
 * requests are queued now (the pipelined dispatcher answers a batch otherwise). */
static PyObject *Queue_take_ready(QueueObject *q, PyObject *arg) {
    Py_ssize_t max_batch = PyLong_AsSsize_t(arg);
    if (max_batch == -1 && PyErr_Occurred()) return NULL;
    if (max_batch < 1) max_batch = 1;
    if (atomic_load(&q->count) < max_batch || atomic_load(&q->closed) || q->head == NULL) Py_RETURN_NONE;
    PyObject *batch, *deliver, *drop, *out = NULL;
    if (take_lists(q, &batch, &deliver, &drop) == 0 && take_key(q, q->head->key, batch, max_batch, deliver, drop) == 0)
        out = take_formed(q, batch, deliver);
    if (out == NULL) take_failed(q, batch, deliver);
    Py_XDECREF(batch);
    Py_XDECREF(deliver);
    Py_XDECREF(drop);
    return out;
}

/* _stage(buffer, key, data_ptr, row_bytes, rows, tensor_type, single) -> bool:
 * register `buffer` (rows of row_bytes at data_ptr, kept alive here) as the
 * staging buffer of the next batch of requests with batching key number `key`
 * whose type is exactly tensor_type (single: a row is one element); requests
 * of that key already queued get rows first (copied by the take). False
 * (nothing done) if one is registered. */
static PyObject *Queue_stage(QueueObject *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "_q_stage(buffer, key, data_ptr, row_bytes, rows, tensor_type, single)");
        return NULL;
    }
    int single = PyObject_IsTrue(args[6]);
    if (single < 0) return NULL;
    Py_ssize_t key = PyLong_AsSsize_t(args[1]);
    void *ptr = PyLong_AsVoidPtr(args[2]);
    Py_ssize_t row_bytes = PyLong_AsSsize_t(args[3]), rows = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (q->pad_dim >= 0) {
        PyErr_SetString(PyExc_ValueError, "_q_stage: requests padded along pad_dim are not staged");
        return NULL;
    }
    if (ptr == NULL || row_bytes < 1 || rows < 1 || !PyType_Check(args[5])) {
        PyErr_SetString(PyExc_ValueError, "_q_stage: data_ptr must be non-zero, row_bytes and rows >= 1, "
                                          "tensor_type a type");
        return NULL;
    }
    if (q->stage) Py_RETURN_FALSE;
    Stage *st = PyMem_Calloc(1, sizeof(Stage));
    StageEntry *entries = PyMem_Calloc((size_t)rows, sizeof(StageEntry));
    PyObject *queued = PyList_New(0);
    if (st == NULL || entries == NULL || queued == NULL) {
        PyMem_Free(st);
        PyMem_Free(entries);
        Py_XDECREF(queued);
        return PyErr_NoMemory();
    }
    st->buf = Py_NewRef(args[0]);
    st->type = Py_NewRef(args[5]);
    st->ptr = ptr;
    st->key = key;
    st->row_bytes = row_bytes;
    st->single = single;
    st->cap_rows = rows;
    st->entries = entries;
    atomic_store(&st->copying, 0);
    /* those already queued, in order: listed, their data looked up (methods of
     * their inputs), then given rows in plain C */
    for (ReqObject *r = q->head; r; r = r->next)
        if (!r->claimed && r->key == key && r->x && PyList_Append(queued, (PyObject *)r) < 0) {
            PyErr_Clear();
            break;
        }
    q->stage = st;
    Py_ssize_t n = PyList_GET_SIZE(queued);
    const char **srcs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(char *));
    if (srcs == NULL) n = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        ReqObject *r = (ReqObject *)PyList_GET_ITEM(queued, i);
        srcs[i] = q->stage == st ? stage_src(q, r, r->x) : NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        ReqObject *r = (ReqObject *)PyList_GET_ITEM(queued, i);
        if (!r->claimed && atomic_load(&r->copy_state) != COPY_PENDING) stage_assign(q, r, r->x, srcs[i]);
    }
    PyMem_Free(srcs);
    Py_DECREF(queued);
    Py_RETURN_TRUE;
}

/* _fault(n): make the n-th next fallible step of a take fail with MemoryError
 * (0: none); for tests of failed takes. */
static PyObject *Queue_fault(QueueObject *q, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    q->fault_countdown = n > 0 ? n : 0;
    Py_RETURN_NONE;
}

/* _staged() -> (buffer, rows) or None: what the last take that formed a batch
 * found in the stage it detached: rows > 0 when the batch is exactly the
 * buffer's first `rows` rows (nothing to concatenate), 0 when the buffer is
 * free again and the batch must be concatenated. Cleared by the call. */
static PyObject *Queue_staged(QueueObject *q, PyObject *unused) {
    PyObject *t = q->staged;
    q->staged = NULL;
    return t ? t : Py_NewRef(Py_None);
}

/* ------------------------------------------------------------------ lifecycle */

/* Unlink every queued request into a new list. */
static PyObject *drain(QueueObject *q) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    ReqObject *r = q->head;
    q->head = q->tail = NULL;
    atomic_store(&q->count, 0);
    while (r) {
        ReqObject *next = r->next;
        r->next = NULL;
        PyList_Append(out, (PyObject *)r); /* on failure the request is only lost to the list */
        Py_DECREF(r);
        r = next;
    }
    return out;
}

/* _close(message, cancel_pending) -> the queued requests removed (cancel_pending)
 * or []: refuse requests from now on (RuntimeError(message)), wake the
 * dispatcher and submitters waiting for room. */
static PyObject *Queue_close(QueueObject *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "_q_close(message, cancel_pending)");
        return NULL;
    }
    int cancel = PyObject_IsTrue(args[1]);
    if (cancel < 0) return NULL;
    Py_XSETREF(q->closed_msg, Py_NewRef(args[0]));
    atomic_store(&q->closed, 1);
    PyObject *out = cancel ? drain(q) : PyList_New(0);
    if (q->sleeping) {
        q->sleeping = 0;
        agx_event_set(&q->wake);
    }
    wake_room(q);
    return out;
}

/* _after_fork(message): in a fork() child: fresh waiting state (the parent's
 * threads are gone), an empty queue, closed with `message`. */
static PyObject *Queue_after_fork(QueueObject *q, PyObject *msg) {
    if (!PyUnicode_Check(msg)) {
        PyErr_SetString(PyExc_TypeError, "_q_after_fork(message)");
        return NULL;
    }
    agx_event_init(&q->wake);
    agx_init_sync(&q->room_mu, &q->room_cv);
    atomic_store(&q->room_sleepers, 0);
    q->sleeping = 0;
    q->in_flight = 0;
    Py_XSETREF(q->closed_msg, Py_NewRef(msg));
    atomic_store(&q->closed, 1);
    Stage *st = q->stage; /* copies given to the parent's threads never finish here: drop it */
    q->stage = NULL;
    PyObject *old = drain(q);
    Py_XDECREF(old);
    stage_free(st);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ stats */

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted v (ms), or None. */
static PyObject *pct_ms(const int64_t *v, Py_ssize_t n, double p) {
    if (n == 0) Py_RETURN_NONE;
    Py_ssize_t rank = (Py_ssize_t)ceil(p / 100.0 * (double)n);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return PyFloat_FromDouble((double)v[rank - 1] / 1e6);
}

static PyObject *mean_ms(const int64_t *v, Py_ssize_t n) {
    if (n == 0) Py_RETURN_NONE;
    double s = 0;
    for (Py_ssize_t i = 0; i < n; i++) s += (double)v[i];
    return PyFloat_FromDouble(s / (double)n / 1e6);
}

static int put(PyObject *d, const char *k, PyObject *v) {
    if (v == NULL) return -1;
    int rc = PyDict_SetItemString(d, k, v);
    Py_DECREF(v);
    return rc;
}

/* _stats() -> dict: the counters and the latency percentiles (Batcher.stats). */
static PyObject *Queue_stats(QueueObject *q, PyObject *unused) {
    Py_ssize_t n = q->ring_n;
    int64_t *w = NULL, *l = NULL;
    if (n) {
        w = PyMem_Malloc(sizeof(int64_t) * n);
        l = PyMem_Malloc(sizeof(int64_t) * n);
        if (!w || !l) {
            PyMem_Free(w);
            PyMem_Free(l);
            return PyErr_NoMemory();
        }
        memcpy(w, q->waits, sizeof(int64_t) * n); /* the ring's order does not matter */
        memcpy(l, q->lats, sizeof(int64_t) * n);
        qsort(w, n, sizeof(int64_t), cmp_i64);
        qsort(l, n, sizeof(int64_t), cmp_i64);
    }
    PyObject *d = PyDict_New(), *hist = NULL;
    int bad = d == NULL;
    if (!bad) {
        PyObject *keys = PyDict_Keys(q->hist);
        bad = keys == NULL || PyList_Sort(keys) < 0 || (hist = PyDict_New()) == NULL;
        for (Py_ssize_t i = 0; !bad && i < PyList_GET_SIZE(keys); i++) {
            PyObject *k = PyList_GET_ITEM(keys, i);
            bad = PyDict_SetItem(hist, k, PyDict_GetItem(q->hist, k)) < 0;
        }
        Py_XDECREF(keys);
    }
    bad = bad || put(d, "accepted", PyLong_FromLongLong(q->accepted)) < 0 ||
          put(d, "answered", PyLong_FromLongLong(q->answered)) < 0 ||
          put(d, "failed", PyLong_FromLongLong(q->failed)) < 0 ||
          put(d, "cancelled", PyLong_FromLongLong(q->cancelled)) < 0 ||
          put(d, "expired", PyLong_FromLongLong(q->expired)) < 0 ||
          put(d, "queued", PyLong_FromSsize_t(atomic_load(&q->count))) < 0 ||
          put(d, "in_flight", PyLong_FromLongLong(q->in_flight)) < 0 ||
          put(d, "batches", PyLong_FromLongLong(q->batches)) < 0 ||
          put(d, "requests", PyLong_FromLongLong(q->requests)) < 0 ||
          put(d, "rows", PyLong_FromLongLong(q->rows)) < 0 ||
          put(d, "mean_batch_size",
              q->batches ? PyFloat_FromDouble((double)q->requests / (double)q->batches) : Py_NewRef(Py_None)) < 0 ||
          put(d, "largest_batch", PyLong_FromLongLong(q->largest)) < 0 ||
          put(d, "staged_batches", PyLong_FromLongLong(q->staged_batches)) < 0 ||
          put(d, "staged_by_callers", PyLong_FromLongLong(q->staged_by_callers)) < 0 ||
          put(d, "batch_sizes", Py_NewRef(hist)) < 0 ||
          put(d, "queue_wait_mean_ms", mean_ms(w, n)) < 0 || put(d, "queue_wait_p50_ms", pct_ms(w, n, 50)) < 0 ||
          put(d, "queue_wait_p99_ms", pct_ms(w, n, 99)) < 0 ||
          put(d, "batch_run_mean_ms", q->run_count ? PyFloat_FromDouble((double)q->run_sum_ns / (double)q->run_count / 1e6)
                                                   : Py_NewRef(Py_None)) < 0 ||
          put(d, "latency_mean_ms", mean_ms(l, n)) < 0 || put(d, "latency_p50_ms", pct_ms(l, n, 50)) < 0 ||
          put(d, "latency_p99_ms", pct_ms(l, n, 99)) < 0 || put(d, "latency_p999_ms", pct_ms(l, n, 99.9)) < 0;
    PyMem_Free(w);
    PyMem_Free(l);
    Py_XDECREF(hist);
    if (bad) {
        Py_XDECREF(d);
        return NULL;
    }
    return d;
}

/* _reset_stats(): zero the counters and samples; accepted restarts at what is
 * queued or in flight now. */
static PyObject *Queue_reset_stats(QueueObject *q, PyObject *unused) {
    q->answered = q->failed = q->cancelled = q->expired = 0;
    q->batches = q->requests = q->rows = q->largest = 0;
    q->staged_batches = q->staged_by_callers = 0;
    q->accepted = atomic_load(&q->count) + q->in_flight;
    q->ring_n = q->ring_pos = 0;
    q->run_sum_ns = 0;
    q->run_count = 0;
    PyDict_Clear(q->hist);
    Py_RETURN_NONE;
}

/* RequestQueue.now() -> seconds on the clock of request times and deadlines. */
static PyObject *Queue_now(PyObject *unused_cls, PyObject *unused) {
    return PyFloat_FromDouble((double)agx_now_ns() / NS);
}

/* ------------------------------------------------------------------ the type */

static PyObject *Queue_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    QueueObject *q = (QueueObject *)type->tp_alloc(type, 0);
    if (q == NULL) return NULL;
    q->vectorcall = Queue_vectorcall;
    q->head = q->tail = NULL;
    atomic_store(&q->count, 0);
    atomic_store(&q->max_queue, 1024);
    atomic_store(&q->closed, 0);
    atomic_store(&q->room_sleepers, 0);
    q->pad_dim = -1;
    q->max_length = -1;
    q->wake_unlocked = 1;
    agx_event_init(&q->wake);
    agx_init_sync(&q->room_mu, &q->room_cv);
    q->keys = PyDict_New();
    q->hist = PyDict_New();
    if (q->keys == NULL || q->hist == NULL) {
        Py_DECREF(q);
        return NULL;
    }
    return (PyObject *)q;
}

static int check_spin(double spin_us) {
    if (!(spin_us >= 0) || spin_us > 1e6) {
        PyErr_SetString(PyExc_ValueError, "spin_us must be a number from 0 to 1000000 (1 s)");
        return -1;
    }
    return 0;
}

static int Queue_init(QueueObject *q, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"max_queue", "spin_us", "pad_dim", "max_length", "describe", "pin_hook", "pin_obj", NULL};
    Py_ssize_t max_queue = 1024;
    double spin_us = 0;
    PyObject *pad = Py_None, *maxlen = Py_None, *describe_fn = Py_None, *pin_hook = Py_None, *pin_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|ndOOOOO:RequestQueue", kwlist, &max_queue, &spin_us, &pad, &maxlen,
                                     &describe_fn, &pin_hook, &pin_obj))
        return -1;
    if (max_queue < 1) {
        PyErr_Format(PyExc_ValueError, "max_queue must be an int >= 1, got %zd", max_queue);
        return -1;
    }
    if (check_spin(spin_us) < 0) return -1;
    int pad_dim = -1;
    if (pad != Py_None) {
        long v = PyLong_AsLong(pad);
        if (v == -1 && PyErr_Occurred()) return -1;
        if (v < 1 || v > 64) {
            PyErr_Format(PyExc_ValueError, "pad_dim must be None or an int from 1 to 64, got %R", pad);
            return -1;
        }
        pad_dim = (int)v;
    }
    Py_ssize_t max_length = -1;
    if (maxlen != Py_None) {
        max_length = PyLong_AsSsize_t(maxlen);
        if (max_length == -1 && PyErr_Occurred()) return -1;
    }
    atomic_store(&q->max_queue, max_queue);
    q->spin_ns = (int64_t)(spin_us * 1000.0);
    q->pad_dim = pad_dim;
    q->max_length = max_length;
    Py_XSETREF(q->describe, describe_fn == Py_None ? NULL : Py_NewRef(describe_fn));
    Py_XSETREF(q->pin_hook, pin_hook == Py_None ? NULL : Py_NewRef(pin_hook));
    Py_XSETREF(q->pin_obj, Py_NewRef(pin_obj));
    return 0;
}

static int Queue_traverse(QueueObject *q, visitproc visit, void *arg) {
    for (ReqObject *r = q->head; r; r = r->next) Py_VISIT(r);
    Py_VISIT(q->describe);
    Py_VISIT(q->keys);
    Py_VISIT(q->pin_hook);
    Py_VISIT(q->pin_obj);
    Py_VISIT(q->closed_msg);
    Py_VISIT(q->hist);
    Py_VISIT(q->staged);
    Py_VISIT(q->undelivered);
    if (q->stage) {
        Py_VISIT(q->stage->buf);
        Py_VISIT(q->stage->type);
        for (Py_ssize_t i = 0; i < q->stage->n; i++) {
            Py_VISIT(q->stage->entries[i].r);
            Py_VISIT(q->stage->entries[i].x);
        }
    }
    return 0;
}

static int Queue_clear(QueueObject *q) {
    ReqObject *r = q->head;
    q->head = q->tail = NULL;
    atomic_store(&q->count, 0);
    while (r) {
        ReqObject *next = r->next;
        r->next = NULL;
        Py_DECREF(r);
        r = next;
    }
    Py_CLEAR(q->describe);
    Py_CLEAR(q->keys);
    Py_CLEAR(q->pin_hook);
    Py_CLEAR(q->pin_obj);
    Py_CLEAR(q->closed_msg);
    Py_CLEAR(q->hist);
    Py_CLEAR(q->staged);
    Py_CLEAR(q->undelivered);
    Stage *st = q->stage; /* no caller can be copying: each holds a reference to the queue */
    q->stage = NULL;
    stage_free(st);
    return 0;
}

static void Queue_dealloc(QueueObject *q) {
    PyObject_GC_UnTrack(q);
    Queue_clear(q);
    PyMem_RawFree(q->waits);
    PyMem_RawFree(q->lats);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

static PyObject *Queue_get_max_queue(QueueObject *q, void *u) { return PyLong_FromSsize_t(atomic_load(&q->max_queue)); }
static int Queue_set_max_queue(QueueObject *q, PyObject *v, void *u) {
    if (v == NULL || PyBool_Check(v) || !PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "max_queue must be an int >= 1, got %R", v ? v : Py_None);
        return -1;
    }
    Py_ssize_t n = PyLong_AsSsize_t(v);
    if (n == -1 && PyErr_Occurred()) return -1;
    if (n < 1) {
        PyErr_Format(PyExc_ValueError, "max_queue must be an int >= 1, got %R", v);
        return -1;
    }
    atomic_store(&q->max_queue, n);
    wake_room(q);
    return 0;
}
static PyObject *Queue_get_spin_us(QueueObject *q, void *u) { return PyFloat_FromDouble((double)q->spin_ns / 1000.0); }
static PyObject *Queue_get_wake_unlocked(QueueObject *q, void *u) { return PyBool_FromLong(q->wake_unlocked); }
static int Queue_set_wake_unlocked(QueueObject *q, PyObject *v, void *u) {
    int t = v ? PyObject_IsTrue(v) : 0;
    if (t < 0) return -1;
    q->wake_unlocked = t;
    return 0;
}
static PyObject *Queue_get_queued(QueueObject *q, void *u) { return PyLong_FromSsize_t(atomic_load(&q->count)); }

static PyGetSetDef Queue_getset[] = {
    {"max_queue", (getter)Queue_get_max_queue, (setter)Queue_set_max_queue,
     "Most requests queued at once; past it enqueuing waits for room (settable).", NULL},
    {"spin_us", (getter)Queue_get_spin_us, NULL, "How long waits spin (GIL released) before they sleep.", NULL},
    {"_queued", (getter)Queue_get_queued, NULL, "Requests queued now.", NULL},
    {"_wake_unlocked", (getter)Queue_get_wake_unlocked, (setter)Queue_set_wake_unlocked,
     "Wake sleeping callers of a batch with the GIL released (default True).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Queue_methods[] = {
    {"_q_put", (PyCFunction)(void (*)(void))Queue_put, METH_FASTCALL,
     "_q_put(x, payload, is_async, room_timeout, timeout) -> Request: queue a request answered through payload."},
    {"_q_take", (PyCFunction)(void (*)(void))Queue_take, METH_FASTCALL,
     "_q_take(max_batch, max_delay_s, target_s) -> (batch, xs, rows, lengths, deliveries) or None when closed and drained."},
    {"_q_take_ready", (PyCFunction)Queue_take_ready, METH_O,
     "_q_take_ready(max_batch) -> as _take, or None unless max_batch requests are queued."},
    {"_q_complete", (PyCFunction)(void (*)(void))Queue_complete, METH_FASTCALL,
     "_q_complete(batch, results, error) -> deliveries: answer (or fail) a batch, skipping given-up requests."},
    {"_q_fail", (PyCFunction)(void (*)(void))Queue_fail, METH_VARARGS | METH_KEYWORDS,
     "_q_fail(reqs, exc_type, message, expired=False, settle=False) -> deliveries."},
    {"_q_give_up", (PyCFunction)Queue_give_up, METH_O, "_q_give_up(request) -> True if its caller gave it up now."},
    {"_q_recount", (PyCFunction)(void (*)(void))Queue_recount, METH_FASTCALL,
     "_q_recount(answered, failed): count that many deliveries cancelled instead."},
    {"_q_close", (PyCFunction)(void (*)(void))Queue_close, METH_FASTCALL,
     "_q_close(message, cancel_pending) -> requests removed from the queue."},
    {"_q_after_fork", (PyCFunction)Queue_after_fork, METH_O, "_q_after_fork(message): closed and empty in a fork() child."},
    {"_q_stats", (PyCFunction)Queue_stats, METH_NOARGS, "_q_stats() -> dict of counters and latency percentiles."},
    {"_q_reset_stats", (PyCFunction)Queue_reset_stats, METH_NOARGS, "_q_reset_stats(): zero the counters."},
    {"_q_stage", (PyCFunction)(void (*)(void))Queue_stage, METH_FASTCALL,
     "_q_stage(buffer, key, data_ptr, row_bytes, rows, tensor_type, single) -> bool: register the next batch's staging buffer."},
    {"_q_fault", (PyCFunction)Queue_fault, METH_O,
     "_q_fault(n): the n-th next step of a take that needs memory fails with MemoryError (tests; 0: none)."},
    {"_q_staged", (PyCFunction)Queue_staged, METH_NOARGS,
     "_q_staged() -> (buffer, rows) or None: the stage the last take detached (rows 0: not usable)."},
    {"now", (PyCFunction)Queue_now, METH_NOARGS | METH_STATIC, "now() -> seconds on the queue's clock."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject QueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agxguard._C.RequestQueue",
    .tp_basicsize = sizeof(QueueObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "RequestQueue(max_queue=1024, spin_us=0, pad_dim=None, max_length=None, describe=None,\n"
              "             pin_hook=None, pin_obj=None)\n\n"
              "The Batcher's request queue in C (agxguard.Batcher subclasses it). Calling it,\n"
              "q(x, timeout=None), queues x and waits for its answer with the GIL released,\n"
              "in one C call; the dispatcher takes batches with _take and answers them with\n"
              "_complete.",
    .tp_new = Queue_new,
    .tp_init = (initproc)Queue_init,
    .tp_dealloc = (destructor)Queue_dealloc,
    .tp_traverse = (traverseproc)Queue_traverse,
    .tp_clear = (inquiry)Queue_clear,
    .tp_call = Queue_call,
    .tp_vectorcall_offset = offsetof(QueueObject, vectorcall),
    .tp_methods = Queue_methods,
    .tp_getset = Queue_getset,
};

int agx_reqqueue_add_to_module(PyObject *m) {
    s_shape = PyUnicode_InternFromString("shape");
    s_dtype = PyUnicode_InternFromString("dtype");
    s_device = PyUnicode_InternFromString("device");
    s_name = PyUnicode_InternFromString("name");
    s_set_running = PyUnicode_InternFromString("set_running_or_notify_cancel");
    s_pin_key = PyUnicode_InternFromString("agxguard.batcher.pinned");
    s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
    s_data_ptr = PyUnicode_InternFromString("data_ptr");
    s_is_neg = PyUnicode_InternFromString("is_neg");
    if (!s_shape || !s_dtype || !s_device || !s_name || !s_set_running || !s_pin_key) return -1;
    PyObject *qmod = PyImport_ImportModule("queue");
    if (qmod == NULL) return -1;
    QueueFull = PyObject_GetAttrString(qmod, "Full");
    Py_DECREF(qmod);
    if (QueueFull == NULL) return -1;
    if (PyType_Ready(&ReqType) < 0 || PyType_Ready(&QueueType) < 0) return -1;
    return PyModule_AddObjectRef(m, "RequestQueue", (PyObject *)&QueueType);
}
