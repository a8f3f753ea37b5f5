/* gather.c: agxguard._C.gather_rows, the Batcher's collate without torch.cat.
 *
 * A batch of N requests costs torch.cat (or, padded, a narrow + copy_ + fill_
 * per request) several microseconds of dispatch per call before any byte
 * moves: on the H200 host, torch.cat of 8 small requests into a pinned buffer
 * took 11-12 us, about a tenth of a small model's whole batch. gather_rows
 * copies the requests' bytes into the batch buffer with memcpy, after reading
 * each request's layout through the Python API (shape, dtype, data_ptr, ...).
 *
 * It only takes the plain case: CPU tensors, contiguous, the buffer's dtype
 * (not complex: lazily conjugated views keep unconjugated bytes), no autograd,
 * shapes equal to the buffer's but along dim 0 (and, padded, along pad_dim up
 * to the buffer's length). Anything else, or any error reading a request,
 * returns False before a byte is written, and the caller takes torch's way.
 * The copy runs with the GIL held, so no Python thread can resize or free a
 * request's storage under it. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define MAX_DIMS 64

static PyObject *s_shape, *s_dtype, *s_is_cpu, *s_requires_grad, *s_is_contiguous, *s_data_ptr,
    *s_element_size, *s_is_complex;

/* obj.name is True (1), False (0), or unreadable (-1, no error set) */
static int attr_true(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    int t = v == Py_True ? 1 : v == Py_False ? 0 : -1;
    Py_DECREF(v);
    return t;
}

static int call_true(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_CallMethodNoArgs(obj, name);
    if (v == NULL) return -1;
    int t = v == Py_True ? 1 : v == Py_False ? 0 : -1;
    Py_DECREF(v);
    return t;
}

static Py_ssize_t call_ssize(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_CallMethodNoArgs(obj, name);
    if (v == NULL) return -1;
    Py_ssize_t n = PyLong_Check(v) ? PyLong_AsSsize_t(v) : -1;
    Py_DECREF(v);
    return n;
}

static char *data_ptr(PyObject *t) {
    PyObject *v = PyObject_CallMethodNoArgs(t, s_data_ptr);
    if (v == NULL) return NULL;
    void *p = PyLong_Check(v) ? PyLong_AsVoidPtr(v) : NULL;
    Py_DECREF(v);
    return p;
}

/* t's shape into dims (at most MAX_DIMS); its number of dims, or -1 */
static int read_shape(PyObject *t, Py_ssize_t *dims) {
    PyObject *shape = PyObject_GetAttr(t, s_shape);
    if (shape == NULL) return -1;
    int n = -1;
    if (PyTuple_Check(shape) && PyTuple_GET_SIZE(shape) <= MAX_DIMS) {
        n = (int)PyTuple_GET_SIZE(shape);
        for (int i = 0; i < n; i++) {
            PyObject *d = PyTuple_GET_ITEM(shape, i);
            dims[i] = PyLong_CheckExact(d) ? PyLong_AsSsize_t(d) : -1;
            if (dims[i] < 0) n = -1;
        }
    }
    Py_DECREF(shape);
    return n;
}

/* a plain CPU tensor of dtype (identity), contiguous, not requiring grad */
static int plain(PyObject *t, PyObject *dtype) {
    PyObject *dt = PyObject_GetAttr(t, s_dtype);
    if (dt == NULL) return 0;
    int same = dt == dtype;
    Py_DECREF(dt);
    return same && attr_true(t, s_is_cpu) == 1 && attr_true(t, s_requires_grad) == 0 &&
           call_true(t, s_is_contiguous) == 1;
}

typedef struct {
    const char *src;
    Py_ssize_t outer, length; /* outer blocks (rows x the dims between 0 and pad_dim), length along pad_dim */
} Part;

/* gather_rows(dst, xs, pad_dim=-1, pad=None) -> bool */
static PyObject *gather_rows(PyObject *unused, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "gather_rows(dst, xs, pad_dim=-1, pad=None)");
        return NULL;
    }
    PyObject *dst = args[0], *xs = args[1];
    int pad_dim = -1;
    if (nargs >= 3 && args[2] != Py_None) {
        long p = PyLong_AsLong(args[2]);
        if (p == -1 && PyErr_Occurred()) return NULL;
        pad_dim = p < 1 ? -1 : (int)p;
    }
    PyObject *pad = nargs >= 4 && args[3] != Py_None ? args[3] : NULL;
    if (!PyList_Check(xs)) {
        PyErr_SetString(PyExc_TypeError, "gather_rows: xs must be a list of tensors");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(xs);
    Part small[64], *parts = n <= 64 ? small : PyMem_Malloc(sizeof(Part) * (size_t)(n ? n : 1));
    if (parts == NULL) return PyErr_NoMemory();
    int ok = 0;
    Py_ssize_t ddims[MAX_DIMS], xdims[MAX_DIMS];
    PyObject *dtype = PyObject_GetAttr(dst, s_dtype);
    int nd = read_shape(dst, ddims);
    if (dtype == NULL || nd < 1 || (pad_dim >= 0 && pad_dim >= nd) || !plain(dst, dtype) ||
        call_true(dst, s_is_complex) != 0)
        goto out;
    Py_ssize_t es = call_ssize(dst, s_element_size);
    char *out = data_ptr(dst);
    if (es <= 0 || out == NULL) goto out;
    Py_ssize_t inner = 1, mid = 1; /* elements after pad_dim (after dim 0 if none); dims between */
    for (int i = (pad_dim >= 0 ? pad_dim + 1 : 1); i < nd; i++) inner *= ddims[i];
    for (int i = 1; pad_dim >= 0 && i < pad_dim; i++) mid *= ddims[i];
    Py_ssize_t width = pad_dim >= 0 ? ddims[pad_dim] : 1, rows = 0;
    int short_one = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *x = PyList_GET_ITEM(xs, k);
        if (read_shape(x, xdims) != nd || !plain(x, dtype)) goto out;
        for (int i = 1; i < nd; i++)
            if (xdims[i] != ddims[i] && !(i == pad_dim && xdims[i] <= ddims[i])) goto out;
        Py_ssize_t elems = 1;
        for (int i = 0; i < nd; i++) elems *= xdims[i];
        parts[k].src = data_ptr(x);
        if (parts[k].src == NULL && elems != 0) goto out;
        parts[k].outer = xdims[0] * mid;
        parts[k].length = pad_dim >= 0 ? xdims[pad_dim] : 1;
        short_one |= parts[k].length < width;
        rows += xdims[0];
    }
    if (rows != ddims[0]) goto out;
    char pad_bytes[16];
    if (short_one) { /* the pad value's bytes in dst's dtype */
        if (pad == NULL || es > (Py_ssize_t)sizeof pad_bytes) goto out;
        Py_ssize_t pd[MAX_DIMS];
        int pn = read_shape(pad, pd);
        const char *pp = data_ptr(pad);
        if (pn < 0 || pp == NULL || !plain(pad, dtype)) goto out;
        for (int i = 0; i < pn; i++)
            if (pd[i] != 1) goto out;
        memcpy(pad_bytes, pp, (size_t)es);
    }
    /* every request checked: copy */
    size_t row_bytes = (size_t)(width * inner * es); /* one outer block of dst */
    char *at = out;
    for (Py_ssize_t k = 0; k < n; k++) {
        size_t take = (size_t)(parts[k].length * inner * es);
        if (!short_one || take == row_bytes) {
            size_t bytes = take * (size_t)parts[k].outer;
            if (bytes != 0) memcpy(at, parts[k].src, bytes);
            at += bytes;
            continue;
        }
        for (Py_ssize_t o = 0; o < parts[k].outer; o++) {
            memcpy(at, parts[k].src + (size_t)o * take, take);
            for (char *p = at + take; p < at + row_bytes; p += es) memcpy(p, pad_bytes, (size_t)es);
            at += row_bytes;
        }
    }
    ok = 1;
out:
    Py_XDECREF(dtype);
    if (parts != small) PyMem_Free(parts);
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL; /* KeyboardInterrupt and the like */
        PyErr_Clear();
    }
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"gather_rows", (PyCFunction)(void (*)(void))gather_rows, METH_FASTCALL,
     "gather_rows(dst, xs, pad_dim=-1, pad=None) -> bool: copy the tensors xs one after the\n"
     "other along dim 0 into dst (contiguous, CPU), each padded along pad_dim (>= 1) to\n"
     "dst's length there with pad (a one-element tensor of dst's dtype). Only plain\n"
     "tensors: CPU, contiguous, dst's dtype (not complex), no autograd, shapes equal to\n"
     "dst's but along dim 0 and pad_dim. Returns False, having written nothing, for\n"
     "anything else (use torch.cat / copy_ then)."},
    {NULL, NULL, 0, NULL},
};

int agx_gather_add_to_module(PyObject *m) {
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    INTERN(s_shape, "shape");
    INTERN(s_dtype, "dtype");
    INTERN(s_is_cpu, "is_cpu");
    INTERN(s_requires_grad, "requires_grad");
    INTERN(s_is_contiguous, "is_contiguous");
    INTERN(s_data_ptr, "data_ptr");
    INTERN(s_element_size, "element_size");
    INTERN(s_is_complex, "is_complex");
#undef INTERN
    return PyModule_AddFunctions(m, methods);
}
