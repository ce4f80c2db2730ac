/* CPython bindings of the lowbit kernels (module lowbit.runtime._kernels).
 *
 * Arrays travel through the buffer protocol (C-contiguous, checked for size here; dtypes and
 * shapes are checked by lowbit/runtime/kernels.py, the public face). The GIL is released while a
 * kernel runs. Every GEMM takes an output stage: (mode, out, params) with params
 *   EPI_INT32:     ()
 *   EPI_THRESHOLD: (thr int32 [N], flip uint64 [ceil(N/64)])
 *   EPI_SCALE:     (scale float32 [N], bias float32 [N])
 *   EPI_REQUANT:   (bias int32 [N], m0 int32 [N], rshift int32 [N], lshift int32 [N], lo, hi, zp)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "lowbit_kernels.h"

#define MAX_BUFS 10

typedef struct {
    Py_buffer views[MAX_BUFS];
    int count;
} bufset;

static void bufs_release(bufset *b) {
    for (int i = 0; i < b->count; i++) PyBuffer_Release(&b->views[i]);
    b->count = 0;
}

/* Buffer of obj with at least `need` bytes (writable if asked); NULL with an exception set. */
static void *get_buf(bufset *b, PyObject *obj, Py_ssize_t need, int writable, const char *name) {
    if (b->count >= MAX_BUFS) {
        PyErr_SetString(PyExc_RuntimeError, "too many buffers");
        return NULL;
    }
    Py_buffer *v = &b->views[b->count];
    int flags = writable ? (PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) : PyBUF_C_CONTIGUOUS;
    if (PyObject_GetBuffer(obj, v, flags) < 0) return NULL;
    b->count++;
    if (v->len < need) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, needs %zd", name, v->len, need);
        return NULL;
    }
    return v->buf;
}

static int check_dims(int64_t M, int64_t N, int64_t K) {
    if (M < 0 || N < 0 || K < 0 || K > INT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "dimensions must be non-negative (K < 2^30)");
        return -1;
    }
    return 0;
}

static int parse_epilogue(bufset *b, epilogue *e, int mode, PyObject *out, PyObject *params,
                          int64_t M, int64_t N) {
    memset(e, 0, sizeof *e);
    e->mode = mode;
    e->N = N;
    if (!PyTuple_Check(params)) {
        PyErr_SetString(PyExc_TypeError, "params must be a tuple");
        return -1;
    }
    Py_ssize_t np = PyTuple_GET_SIZE(params), n4 = (Py_ssize_t)N * 4;
    const Py_ssize_t want[] = {0, 2, 2, 7};
    if (mode < EPI_INT32 || mode > EPI_REQUANT || np != want[mode]) {
        PyErr_Format(PyExc_ValueError, "bad output mode %d or parameter count %zd", mode, np);
        return -1;
    }
    const Py_ssize_t out_elem[] = {4, 0, 4, 1};
    Py_ssize_t out_need = mode == EPI_THRESHOLD ? (Py_ssize_t)(M * ((N + 63) / 64) * 8)
                                                : (Py_ssize_t)(M * N) * out_elem[mode];
    if (!(e->out = get_buf(b, out, out_need, 1, "out"))) return -1;
    PyObject *p[7];
    for (Py_ssize_t i = 0; i < np; i++) p[i] = PyTuple_GET_ITEM(params, i);
    switch (mode) {
    case EPI_THRESHOLD:
        if (!(e->thr = get_buf(b, p[0], n4, 0, "thresholds"))) return -1;
        if (!(e->flip = get_buf(b, p[1], (Py_ssize_t)((N + 63) / 64) * 8, 0, "flip"))) return -1;
        break;
    case EPI_SCALE:
        if (!(e->scale = get_buf(b, p[0], n4, 0, "scale"))) return -1;
        if (!(e->fbias = get_buf(b, p[1], n4, 0, "bias"))) return -1;
        break;
    case EPI_REQUANT:
        if (!(e->ibias = get_buf(b, p[0], n4, 0, "bias"))) return -1;
        if (!(e->m0 = get_buf(b, p[1], n4, 0, "m0"))) return -1;
        if (!(e->rshift = get_buf(b, p[2], n4, 0, "rshift"))) return -1;
        if (!(e->lshift = get_buf(b, p[3], n4, 0, "lshift"))) return -1;
        e->lo = (int32_t)PyLong_AsLong(p[4]);
        e->hi = (int32_t)PyLong_AsLong(p[5]);
        e->zp = (int32_t)PyLong_AsLong(p[6]);
        if (PyErr_Occurred()) return -1;
        for (int64_t n = 0; n < N; n++)
            if (e->rshift[n] < 0 || e->rshift[n] > 31 || e->lshift[n] < 0 || e->lshift[n] > 31) {
                PyErr_SetString(PyExc_ValueError, "shifts must lie in [0, 31]");
                return -1;
            }
        break;
    }
    return 0;
}

static PyObject *finish(bufset *b, int rc) {
    bufs_release(b);
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_pack_signs(PyObject *self, PyObject *args) {
    PyObject *x, *out;
    long long M, K;
    int nthreads;
    if (!PyArg_ParseTuple(args, "OOLLi", &x, &out, &M, &K, &nthreads)) return NULL;
    if (check_dims(M, 0, K) < 0) return NULL;
    bufset b = {.count = 0};
    const float *xp = get_buf(&b, x, (Py_ssize_t)(M * K) * 4, 0, "x");
    uint64_t *op = xp ? get_buf(&b, out, (Py_ssize_t)(M * ((K + 63) / 64)) * 8, 1, "out") : NULL;
    if (!op) {
        bufs_release(&b);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = lowbit_pack_signs(xp, op, M, K, nthreads);
    Py_END_ALLOW_THREADS return finish(&b, rc);
}

static PyObject *py_bitgemm(PyObject *self, PyObject *args) {
    PyObject *a, *w, *wn, *out, *params;
    long long M, N, K;
    int nthreads, mode;
    if (!PyArg_ParseTuple(args, "OOOLLLiiOO", &a, &w, &wn, &M, &N, &K, &nthreads, &mode, &out,
                          &params))
        return NULL;
    if (check_dims(M, N, K) < 0) return NULL;
    bufset b = {.count = 0};
    epilogue e;
    const Py_ssize_t kw8 = (Py_ssize_t)((K + 63) / 64) * 8;
    const uint64_t *ap = get_buf(&b, a, M * kw8, 0, "a_bits");
    const uint64_t *wp = ap ? get_buf(&b, w, N * kw8, 0, "w_bits") : NULL;
    const uint64_t *np = NULL;
    int ok = wp != NULL;
    if (ok && wn != Py_None) ok = (np = get_buf(&b, wn, N * kw8, 0, "w_neg")) != NULL;
    if (!ok || parse_epilogue(&b, &e, mode, out, params, M, N) < 0) {
        bufs_release(&b);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = lowbit_bitgemm(ap, wp, np, M, N, K, &e, nthreads);
    Py_END_ALLOW_THREADS return finish(&b, rc);
}

static PyObject *py_int8gemm(PyObject *self, PyObject *args) {
    PyObject *a, *w, *out, *params;
    long long M, N, K;
    int azp, nthreads, mode;
    if (!PyArg_ParseTuple(args, "OiOLLLiiOO", &a, &azp, &w, &M, &N, &K, &nthreads, &mode, &out,
                          &params))
        return NULL;
    if (check_dims(M, N, K) < 0) return NULL;
    bufset b = {.count = 0};
    epilogue e;
    const uint8_t *ap = get_buf(&b, a, (Py_ssize_t)(M * K), 0, "a");
    const int8_t *wp = ap ? get_buf(&b, w, (Py_ssize_t)(N * K), 0, "w") : NULL;
    if (!wp || parse_epilogue(&b, &e, mode, out, params, M, N) < 0) {
        bufs_release(&b);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = lowbit_int8gemm(ap, azp, wp, M, N, K, &e, nthreads);
    Py_END_ALLOW_THREADS return finish(&b, rc);
}

static PyObject *py_ternary_int8gemm(PyObject *self, PyObject *args) {
    PyObject *a, *t, *out, *params;
    long long M, N, K;
    int nthreads, mode;
    if (!PyArg_ParseTuple(args, "OOLLLiiOO", &a, &t, &M, &N, &K, &nthreads, &mode, &out, &params))
        return NULL;
    if (check_dims(M, N, K) < 0) return NULL;
    bufset b = {.count = 0};
    epilogue e;
    const int8_t *ap = get_buf(&b, a, (Py_ssize_t)(M * K), 0, "a");
    const int8_t *tp = ap ? get_buf(&b, t, (Py_ssize_t)(N * K), 0, "w") : NULL;
    if (!tp || parse_epilogue(&b, &e, mode, out, params, M, N) < 0) {
        bufs_release(&b);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = lowbit_ternary_int8gemm(ap, tp, M, N, K, &e, nthreads);
    Py_END_ALLOW_THREADS return finish(&b, rc);
}

static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("popcnt");
}

static PyObject *py_set_avx2(PyObject *self, PyObject *arg) {
    int want = PyObject_IsTrue(arg);
    if (want < 0) return NULL;
    lowbit_use_avx2 = want && cpu_has_avx2();
    return PyBool_FromLong(lowbit_use_avx2);
}

static PyObject *py_avx2_enabled(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(lowbit_use_avx2);
}

static PyObject *py_cpu_has_avx2(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(cpu_has_avx2());
}

static PyObject *py_drop_pool(PyObject *self, PyObject *unused) {
    lowbit_drop_pool();
    Py_RETURN_NONE;
}

static PyObject *py_max_threads(PyObject *self, PyObject *unused) {
    return PyLong_FromLong(lowbit_max_threads());
}


/* ---- fused engine (lowbit/runtime/fused/) ---- */

static int check_isa(int isa) {
    if (isa < ENG_ISA_SCALAR || isa > lowbit_engine_cpu_isa()) {
        PyErr_Format(PyExc_ValueError, "ISA %d is not available on this CPU", isa);
        return -1;
    }
    return 0;
}

static PyObject *py_engine_cpu_isa(PyObject *self, PyObject *unused) {
    return PyLong_FromLong(lowbit_engine_cpu_isa());
}

static PyObject *py_engine_sizes(PyObject *self, PyObject *args) {
    int isa;
    long long N, K;
    if (!PyArg_ParseTuple(args, "iLL", &isa, &N, &K)) return NULL;
    if (check_isa(isa) < 0 || check_dims(0, N, K) < 0) return NULL;
    return Py_BuildValue("LLL", (long long)lowbit_engine_kpad(isa, K),
                         (long long)lowbit_engine_packed_bytes(isa, N, K),
                         (long long)lowbit_engine_conv_scratch(isa, N, K));
}

static PyObject *py_engine_pack(PyObject *self, PyObject *args) {
    int isa;
    PyObject *w, *dst;
    long long N, K;
    if (!PyArg_ParseTuple(args, "iOLLO", &isa, &w, &N, &K, &dst)) return NULL;
    if (check_isa(isa) < 0 || check_dims(0, N, K) < 0) return NULL;
    bufset b = {.count = 0};
    const int8_t *wp = get_buf(&b, w, (Py_ssize_t)(N * K), 0, "w");
    void *dp = wp ? get_buf(&b, dst, (Py_ssize_t)lowbit_engine_packed_bytes(isa, N, K), 1, "dst")
                  : NULL;
    if (dp) lowbit_engine_pack(isa, wp, N, K, dp);
    bufs_release(&b);
    if (!dp) return NULL;
    Py_RETURN_NONE;
}

/* engine_run(steps): steps is an int64 [n, ENG_FIELDS] array whose addresses point into arrays
 * the caller keeps alive (lowbit.runtime.fused builds and owns them). */
static PyObject *py_engine_run(PyObject *self, PyObject *arg) {
    bufset b = {.count = 0};
    Py_buffer *v = &b.views[0];
    if (PyObject_GetBuffer(arg, v, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    b.count = 1;
    const Py_ssize_t row = (Py_ssize_t)ENG_FIELDS * 8;
    if (v->len % row != 0) {
        bufs_release(&b);
        return PyErr_Format(PyExc_ValueError, "steps must be rows of %d int64", ENG_FIELDS);
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = lowbit_engine_run(v->buf, v->len / row);
    Py_END_ALLOW_THREADS bufs_release(&b);
    if (rc) return PyErr_Format(PyExc_ValueError, "step %d has an unknown op", rc - 1);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pack_signs", py_pack_signs, METH_VARARGS, "pack_signs(x, out, M, K, nthreads)"},
    {"bitgemm", py_bitgemm, METH_VARARGS,
     "bitgemm(a, w, w_neg|None, M, N, K, nthreads, mode, out, params)"},
    {"int8gemm", py_int8gemm, METH_VARARGS,
     "int8gemm(a, a_zp, w, M, N, K, nthreads, mode, out, params)"},
    {"ternary_int8gemm", py_ternary_int8gemm, METH_VARARGS,
     "ternary_int8gemm(a, t, M, N, K, nthreads, mode, out, params)"},
    {"set_avx2", py_set_avx2, METH_O, "set_avx2(flag) -> whether the AVX2 path is now on"},
    {"avx2_enabled", py_avx2_enabled, METH_NOARGS, "whether the AVX2 path is on"},
    {"cpu_has_avx2", py_cpu_has_avx2, METH_NOARGS, "whether the CPU supports AVX2+FMA+POPCNT"},
    {"max_threads", py_max_threads, METH_NOARGS, "OpenMP default thread count"},
    {"drop_pool", py_drop_pool, METH_NOARGS, "free the scratch memory kept between calls"},
    {"engine_cpu_isa", py_engine_cpu_isa, METH_NOARGS, "best fused-engine ISA of this CPU"},
    {"engine_sizes", py_engine_sizes, METH_VARARGS,
     "engine_sizes(isa, N, K) -> (Kp, packed weight bytes, per-thread conv scratch bytes)"},
    {"engine_pack", py_engine_pack, METH_VARARGS, "engine_pack(isa, w, N, K, dst)"},
    {"engine_run", py_engine_run, METH_O, "engine_run(steps): run a fused program"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_kernels",
                                       "lowbit compiled kernels (see lowbit.runtime.kernels)", -1,
                                       methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    const char *off = getenv("LOWBIT_NO_AVX2"), *isa = getenv("LOWBIT_ISA");
    const int scalar = isa && strcmp(isa, "scalar") == 0; /* LOWBIT_ISA=scalar: every kernel */
    lowbit_use_avx2 = cpu_has_avx2() && !scalar && !(off && off[0] && strcmp(off, "0") != 0);
    lowbit_bitgemm_init();
    PyObject *m = PyModule_Create(&moduledef);
    if (m && (PyModule_AddIntConstant(m, "EPI_INT32", EPI_INT32) < 0 ||
              PyModule_AddIntConstant(m, "EPI_THRESHOLD", EPI_THRESHOLD) < 0 ||
              PyModule_AddIntConstant(m, "EPI_SCALE", EPI_SCALE) < 0 ||
              PyModule_AddIntConstant(m, "EPI_REQUANT", EPI_REQUANT) < 0 ||
              PyModule_AddIntConstant(m, "ENG_FIELDS", ENG_FIELDS) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
