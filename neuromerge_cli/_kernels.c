/* Fused CPU kernels for the merge engine's hottest sweeps (see kernels.py, which calls them).
 *
 * Each kernel reads its inputs once and does in one pass what takes several eager torch passes, with
 * the GIL released. Every float32 result is the same IEEE operation torch does (compiled with
 * -ffp-contract=off: no fused multiply-adds), so tensors come out bit for bit as torch makes them;
 * only the float64 norms differ, in their last digits, as they are summed in another order. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi" /* vectors passed between inlined helpers only */
#endif
#define INLINE static inline __attribute__((always_inline))

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

enum { KIND_F32 = 0, KIND_BF16 = 1 }; /* how a tensor's entries are stored */

#define LANES 8
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef uint32_t vuint __attribute__((vector_size(LANES * 4)));
typedef uint16_t vhalf __attribute__((vector_size(LANES * 2)));

/* Entries whose float32 lane sums are added into float64 at a time: short enough that a lane's sum
 * of CHUNK / LANES values stays accurate, long enough that the float64 additions cost nothing. */
#define CHUNK 4096

INLINE float scalar_load(const void *p, int64_t i, int kind) {
    if (kind == KIND_F32)
        return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE vfloat vector_load(const void *p, int64_t i, int kind) {
    vfloat f;
    if (kind == KIND_F32) {
        memcpy(&f, (const float *)p + i, sizeof f);
    } else {
        vhalf h;
        memcpy(&h, (const uint16_t *)p + i, sizeof h);
        vuint u = __builtin_convertvector(h, vuint) << 16;
        memcpy(&f, &u, sizeof f);
    }
    return f;
}

INLINE vfloat vector_abs(vfloat x) {
    vuint u;
    memcpy(&u, &x, sizeof u);
    u &= 0x7fffffffu;
    memcpy(&x, &u, sizeof x);
    return x;
}

INLINE float lane_total(vfloat x) {
    float s = 0.0f;
    for (int k = 0; k < LANES; k++)
        s += x[k];
    return s;
}

/* a * b + c rounded once, as torch's addcmul computes it on CPUs with fused multiply-adds */
INLINE vfloat vector_fma(vfloat a, vfloat b, vfloat c) {
    vfloat r;
    for (int k = 0; k < LANES; k++)
        r[k] = fmaf(a[k], b[k], c[k]);
    return r;
}

/* float32 -> bfloat16 rounded to nearest even, NaN -> 0x7fc0: torch's (scalar) conversion */
INLINE uint16_t scalar_bf16(float f) {
    if (f != f)
        return 0x7fc0;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + ((u >> 16) & 1) + 0x7fffu) >> 16);
}

INLINE void vector_store(void *p, int64_t i, int kind, vfloat f) {
    if (kind == KIND_F32) {
        memcpy((float *)p + i, &f, sizeof f);
        return;
    }
    vuint u, nan = (vuint)(f != f);
    memcpy(&u, &f, sizeof u);
    u = (u + ((u >> 16) & 1) + 0x7fffu) >> 16;
    u = (u & ~nan) | (0x7fc0u & nan);
    vhalf h = __builtin_convertvector(u, vhalf);
    memcpy((uint16_t *)p + i, &h, sizeof h);
}

INLINE void scalar_store(void *p, int64_t i, int kind, float f) {
    if (kind == KIND_F32)
        ((float *)p)[i] = f;
    else
        ((uint16_t *)p)[i] = scalar_bf16(f);
}

/* out[t, i] = x_t[i] - base[i] (or its absolute value) in float32, base_out[i] = base[i] in float32,
 * l1[t] = sum |out[t, i]|, l2sq[t] = sum out[t, i]^2 (float64); any output pointer may be NULL. */
INLINE void task_vectors_of(
    int kind, const void *base, const void *const *tasks, int num_tasks, int64_t n, float *out,
    float *base_out, double *l1, double *l2sq, int absolute) {
    for (int t = 0; t < num_tasks; t++) {
        if (l1) l1[t] = 0.0;
        if (l2sq) l2sq[t] = 0.0;
    }
    for (int64_t lo = 0; lo < n; lo += CHUNK) {
        int64_t hi = lo + CHUNK < n ? lo + CHUNK : n;
        int64_t body = lo + (hi - lo) / LANES * LANES;
        if (base_out) {
            for (int64_t i = lo; i < body; i += LANES) {
                vfloat b = vector_load(base, i, kind);
                memcpy(base_out + i, &b, sizeof b);
            }
            for (int64_t i = body; i < hi; i++)
                base_out[i] = scalar_load(base, i, kind);
        }
        for (int t = 0; t < num_tasks; t++) {
            const void *x = tasks[t];
            float *o = out ? out + (int64_t)t * n : NULL;
            vfloat sum_abs = {0}, sum_sq = {0};
            for (int64_t i = lo; i < body; i += LANES) {
                vfloat d = vector_load(x, i, kind) - vector_load(base, i, kind);
                vfloat a = vector_abs(d);
                sum_abs += a;
                sum_sq += d * d;
                if (o) memcpy(o + i, absolute ? &a : &d, sizeof d);
            }
            float tail_abs = 0.0f, tail_sq = 0.0f;
            for (int64_t i = body; i < hi; i++) {
                float d = scalar_load(x, i, kind) - scalar_load(base, i, kind);
                tail_abs += fabsf(d);
                tail_sq += d * d;
                if (o) o[i] = absolute ? fabsf(d) : d;
            }
            if (l1) l1[t] += (double)lane_total(sum_abs) + tail_abs;
            if (l2sq) l2sq[t] += (double)lane_total(sum_sq) + tail_sq;
        }
    }
}

VECTOR_CLONES static void task_vectors_f32(const void *base, const void *const *tasks, int num_tasks, int64_t n,
                                           float *out, float *base_out, double *l1, double *l2sq, int absolute) {
    task_vectors_of(KIND_F32, base, tasks, num_tasks, n, out, base_out, l1, l2sq, absolute);
}

VECTOR_CLONES static void task_vectors_bf16(const void *base, const void *const *tasks, int num_tasks, int64_t n,
                                            float *out, float *base_out, double *l1, double *l2sq, int absolute) {
    task_vectors_of(KIND_BF16, base, tasks, num_tasks, n, out, base_out, l1, l2sq, absolute);
}

#define MAX_TASKS 256

/* A merge whose task vector is a fixed combination of the task vectors, without making them: with
 * tau_t = x_t - base, acc = tau_0 * w_0, then acc = fma(tau_t, w_t, acc) for t >= 1 (torch's
 * weighted_sum), delta = acc * scale (or acc / scale when ``divide``), out = base + delta stored as
 * ``out_kind``; l1[t] = sum |tau_t|, l2sq[t] = sum tau_t^2 and delta_sq = sum delta^2 in float64. */
INLINE void combine_of(int kind, int out_kind, const void *base, const void *const *tasks, int num_tasks,
                       const float *weights, int64_t n, float scale, int divide, void *out, double *l1,
                       double *l2sq, double *delta_sq) {
    vfloat sum_abs[MAX_TASKS], sum_sq[MAX_TASKS];
    float tail_abs[MAX_TASKS], tail_sq[MAX_TASKS];
    for (int t = 0; t < num_tasks; t++)
        l1[t] = l2sq[t] = 0.0;
    *delta_sq = 0.0;
    for (int64_t lo = 0; lo < n; lo += CHUNK) {
        int64_t hi = lo + CHUNK < n ? lo + CHUNK : n;
        int64_t body = lo + (hi - lo) / LANES * LANES;
        vfloat delta_sum = {0};
        float delta_tail = 0.0f;
        for (int t = 0; t < num_tasks; t++) {
            sum_abs[t] = sum_sq[t] = (vfloat){0};
            tail_abs[t] = tail_sq[t] = 0.0f;
        }
        for (int64_t i = lo; i < body; i += LANES) {
            vfloat b = vector_load(base, i, kind), acc = {0};
            for (int t = 0; t < num_tasks; t++) {
                vfloat d = vector_load(tasks[t], i, kind) - b;
                sum_abs[t] += vector_abs(d);
                sum_sq[t] += d * d;
                acc = t == 0 ? d * weights[0] : vector_fma(d, (vfloat){0} + weights[t], acc);
            }
            vfloat delta = divide ? acc / scale : acc * scale;
            delta_sum += delta * delta;
            vector_store(out, i, out_kind, b + delta);
        }
        for (int64_t i = body; i < hi; i++) {
            float b = scalar_load(base, i, kind), acc = 0.0f;
            for (int t = 0; t < num_tasks; t++) {
                float d = scalar_load(tasks[t], i, kind) - b;
                tail_abs[t] += fabsf(d);
                tail_sq[t] += d * d;
                acc = t == 0 ? d * weights[0] : fmaf(d, weights[t], acc);
            }
            float delta = divide ? acc / scale : acc * scale;
            delta_tail += delta * delta;
            scalar_store(out, i, out_kind, b + delta);
        }
        for (int t = 0; t < num_tasks; t++) {
            l1[t] += (double)lane_total(sum_abs[t]) + tail_abs[t];
            l2sq[t] += (double)lane_total(sum_sq[t]) + tail_sq[t];
        }
        *delta_sq += (double)lane_total(delta_sum) + delta_tail;
    }
}

#define COMBINE(KIND, OUT_KIND, NAME)                                                                          \
    VECTOR_CLONES static void NAME(const void *base, const void *const *tasks, int num_tasks,                  \
                                   const float *weights, int64_t n, float scale, int divide, void *out,        \
                                   double *l1, double *l2sq, double *delta_sq) {                               \
        combine_of(KIND, OUT_KIND, base, tasks, num_tasks, weights, n, scale, divide, out, l1, l2sq, delta_sq); \
    }
COMBINE(KIND_F32, KIND_F32, combine_f32_f32)
COMBINE(KIND_F32, KIND_BF16, combine_f32_bf16)
COMBINE(KIND_BF16, KIND_F32, combine_bf16_f32)
COMBINE(KIND_BF16, KIND_BF16, combine_bf16_bf16)

typedef void (*combine_fn)(const void *, const void *const *, int, const float *, int64_t, float, int, void *,
                           double *, double *, double *);
static const combine_fn COMBINE_KERNELS[2][2] = {{combine_f32_f32, combine_f32_bf16},
                                                 {combine_bf16_f32, combine_bf16_bf16}};

static int read_pointers(PyObject *tuple, const void **out, Py_ssize_t *count) {
    *count = PyTuple_GET_SIZE(tuple);
    if (*count > MAX_TASKS) {
        PyErr_SetString(PyExc_ValueError, "more than 256 tasks");
        return -1;
    }
    for (Py_ssize_t t = 0; t < *count; t++) {
        out[t] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(tuple, t));
        if (PyErr_Occurred())
            return -1;
    }
    return 0;
}

static int check_kind(int kind) {
    if (kind == KIND_F32 || kind == KIND_BF16)
        return 0;
    PyErr_SetString(PyExc_ValueError, "unknown storage kind");
    return -1;
}

static PyObject *combine(PyObject *self, PyObject *args) {
    (void)self;
    int kind, out_kind, divide;
    unsigned long long base, weights, out, l1, l2sq, delta_sq;
    PyObject *task_list;
    Py_ssize_t n, num_tasks;
    float scale;
    if (!PyArg_ParseTuple(args, "iiKO!KnfpKKKK", &kind, &out_kind, &base, &PyTuple_Type, &task_list, &weights, &n,
                          &scale, &divide, &out, &l1, &l2sq, &delta_sq))
        return NULL;
    const void *tasks[MAX_TASKS];
    if (check_kind(kind) || check_kind(out_kind) || read_pointers(task_list, tasks, &num_tasks))
        return NULL;
    if (num_tasks < 1 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "combine: no task or a negative size");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    COMBINE_KERNELS[kind][out_kind]((const void *)base, tasks, (int)num_tasks, (const float *)weights, (int64_t)n,
                                    scale, divide, (void *)out, (double *)l1, (double *)l2sq, (double *)delta_sq);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *task_vectors(PyObject *self, PyObject *args) {
    (void)self;
    int kind, absolute;
    unsigned long long base, out, base_out, l1, l2sq;
    PyObject *task_list;
    Py_ssize_t n, num_tasks;
    if (!PyArg_ParseTuple(args, "iKO!nKKKKp", &kind, &base, &PyTuple_Type, &task_list, &n, &out, &base_out, &l1,
                          &l2sq, &absolute))
        return NULL;
    const void *tasks[MAX_TASKS];
    if (check_kind(kind) || read_pointers(task_list, tasks, &num_tasks))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "task_vectors: a negative size");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    (kind == KIND_F32 ? task_vectors_f32 : task_vectors_bf16)(
        (const void *)base, tasks, (int)num_tasks, (int64_t)n, (float *)out, (float *)base_out, (double *)l1,
        (double *)l2sq, absolute);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"task_vectors", task_vectors, METH_VARARGS,
     "task_vectors(kind, base, tasks, n, out, base_out, l1, l2sq, absolute): see kernels.py"},
    {"combine", combine, METH_VARARGS,
     "combine(kind, out_kind, base, tasks, weights, n, scale, divide, out, l1, l2sq, delta_sq): see kernels.py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU kernels (see kernels.py).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
