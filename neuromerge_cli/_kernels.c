/* Fused CPU kernels for the merge engine's hottest sweeps (see kernels.py, which calls them).
 *
 * Each kernel reads its inputs once and does in one pass what takes several eager torch passes, with
 * the GIL released and, for the big ones, a block split over threads. Every float32 result is the
 * IEEE operation torch does, in its order (compiled with -ffp-contract=off: no contraction; the
 * weighted sums use an explicit fused multiply-add, as torch's addcmul does on CPUs that have one, so
 * on a CPU without FMA the bytes could differ from torch's there), so tensors come out bit for bit as
 * torch makes them; only float64 sums differ, in their last digits, as they are added in another order. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifndef _WIN32
#include <pthread.h>
#endif

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi" /* vectors passed between inlined helpers only */
#endif
#define INLINE static inline __attribute__((always_inline))

/* On x86-64 the kernels are compiled for x86-64-v3 (AVX2, FMA, F16C) and run only where the CPU has it
 * (FULL_SPEED): generic x86-64 code would do each fused multiply-add through libm, slower than the torch
 * path. The Python glue stays generic, so the module loads anywhere. Elsewhere (aarch64: FMA is baseline)
 * the kernels are generic code. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define X86_64_V3 1
#define KERNEL_TARGET __attribute__((target("arch=x86-64-v3")))
#else
#define X86_64_V3 0
#define KERNEL_TARGET
#endif
#ifndef __has_builtin
#define __has_builtin(x) 0
#endif

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2 }; /* how a tensor's entries are stored */

#define LANES 8
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef uint32_t vuint __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));
typedef uint16_t vhalf __attribute__((vector_size(LANES * 2)));
typedef uint16_t vhalf2 __attribute__((vector_size(LANES * 4))); /* a vfloat's bits as 16-bit halves */
typedef uint8_t vbyte __attribute__((vector_size(LANES)));

/* Entries whose float32 lane sums are added into float64 at a time: short enough that a lane's sum
 * of CHUNK / LANES values stays accurate, long enough that the float64 additions cost nothing. */
#define CHUNK 4096

/* float16 <-> float32 in integer and float32 operations only, written once for scalars and vectors: for the
 * scalar tails, for kernels not compiled for x86-64-v3 (gcc converts _Float16 vectors one lane at a time), and
 * to test against F16C (float16_instructions). */

/* The float32 bits of a float16 (its bits widened to 32): exact; subnormals through an integer conversion, so
 * that a flush-to-zero mode cannot touch them. The magnitude is signed (S) so that vector compares and the
 * int -> float conversion are single instructions. */
#define HALF_TO_FLOAT_BITS(T, S, F, h) ({                                                                       \
    S em_ = (S)((h) & 0x7fffu);                                                                                \
    T sign_ = ((h) ^ (T)em_) << 16;                                                                            \
    S normal_ = (em_ << 13) + 0x38000000;                /* exponent rebased from 15 to 127 */                  \
    normal_ += SELECT(em_ > 0x7bff, (S){0} + 0x38000000, (S){0}); /* inf and NaN: exponent 255, payload kept */ \
    F sub_ = CONVERT(em_, F) * 0x1p-24f;                 /* subnormal: m * 2^-24, a normal float32 */            \
    S sub_bits_;                                                                                               \
    memcpy(&sub_bits_, &sub_, sizeof sub_bits_);                                                               \
    (T)SELECT(em_ < 0x0400, sub_bits_, normal_) | sign_; })

/* The float16 bits (in the low 16) of a float32 given as its bits ``x``: rounded to nearest even,
 * overflow to inf, NaN to 0x7e00 with its sign, as torch's conversion (after F. Giesen's float_to_half_fast3_rtne) */
#define FLOAT_BITS_TO_HALF(T, F, x) ({                                                                        \
    T sign_ = (x) & 0x80000000u, a_ = (x) ^ sign_;                                                             \
    T big_ = SELECT(a_ > 0x7f800000u, (T){0} + 0x7e00u, (T){0} + 0x7c00u);  /* >= 65536: inf; NaN */          \
    F a_f_;                                                                                                    \
    memcpy(&a_f_, &a_, sizeof a_f_);                                                                           \
    F magic_f_ = a_f_ + 0.5f;                            /* below 2^-14: the float add rounds to the subnormal */\
    T small_;                                                                                                  \
    memcpy(&small_, &magic_f_, sizeof small_);                                                                 \
    small_ -= 0x3f000000u;                                                                                     \
    T normal_ = (a_ + 0xc8000fffu + ((a_ >> 13) & 1u)) >> 13;  /* rebased exponent, + 0xfff + odd: RNE */       \
    SELECT(a_ >= 0x47800000u, big_, SELECT(a_ < 0x38800000u, small_, normal_)) | (sign_ >> 16); })

#define CONVERT(x, F) ((F)(x))
#define SELECT(c, a, b) ((c) ? (a) : (b))
INLINE uint32_t half_bits_to_float_bits_1(uint32_t h) { return HALF_TO_FLOAT_BITS(uint32_t, int32_t, float, h); }
INLINE uint32_t float_bits_to_half_bits_1(uint32_t x) { return FLOAT_BITS_TO_HALF(uint32_t, float, x); }
#undef CONVERT
#undef SELECT
#define CONVERT(x, F) __builtin_convertvector(x, F)
#define SELECT(c, a, b) ((__typeof__(a))vselect((vuint)(c), (vuint)(a), (vuint)(b)))
INLINE vuint vselect(vuint mask, vuint a, vuint b) { return (a & mask) | (b & ~mask); }
INLINE vuint half_bits_to_float_bits_8(vuint h) { return HALF_TO_FLOAT_BITS(vuint, vint, vfloat, h); }
INLINE vuint float_bits_to_half_bits_8(vuint x) { return FLOAT_BITS_TO_HALF(vuint, vfloat, x); }
#undef CONVERT
#undef SELECT
#define half_bits_to_float_bits(h) _Generic((h), vuint: half_bits_to_float_bits_8, default: half_bits_to_float_bits_1)(h)
#define float_bits_to_half_bits(x) _Generic((x), vuint: float_bits_to_half_bits_8, default: float_bits_to_half_bits_1)(x)

/* In the x86-64-v3 kernels, 8 float16 <-> float32 conversions are one F16C instruction each (inlined helpers).
 * Same values as the integer conversions (F16C loads are exact, stores round to nearest even), but for the
 * payload of a NaN; float16_instructions switches between the two to test both. */
static int use_f16c = X86_64_V3;
#if X86_64_V3
#include <immintrin.h>
KERNEL_TARGET static inline void f16c_load(const uint16_t *p, float *out) {
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
}
KERNEL_TARGET static inline void f16c_store(uint16_t *p, const float *x) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(_mm256_loadu_ps(x), _MM_FROUND_TO_NEAREST_INT));
}
#endif

INLINE float scalar_load(const void *p, int64_t i, int kind) {
    if (kind == KIND_F32)
        return ((const float *)p)[i];
    if (kind == KIND_F16) {
        float f;
        uint32_t u = half_bits_to_float_bits(((const uint16_t *)p)[i]);
        memcpy(&f, &u, 4);
        return f;
    }
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE vfloat vector_load(const void *p, int64_t i, int kind) {
    vfloat f;
    if (kind == KIND_F32) {
        memcpy(&f, (const float *)p + i, sizeof f);
    } else if (kind == KIND_F16) {
#if X86_64_V3
        if (use_f16c) {
            f16c_load((const uint16_t *)p + i, (float *)&f);
            return f;
        }
#endif
        vhalf h;
        memcpy(&h, (const uint16_t *)p + i, sizeof h);
        vuint u = half_bits_to_float_bits(__builtin_convertvector(h, vuint));
        memcpy(&f, &u, sizeof f);
    } else {
        vhalf h;
        memcpy(&h, (const uint16_t *)p + i, sizeof h);
        /* each bfloat16 as the high half of its float32, the low half 0 (interleaved with zeros: gcc 12
         * makes two narrow widenings and an insert of __builtin_convertvector(h, vuint) << 16; gcc 11 has
         * no __builtin_shufflevector) */
#if __has_builtin(__builtin_shufflevector)
        vhalf2 u = __builtin_shufflevector(h, (vhalf){0}, 8, 0, 8, 1, 8, 2, 8, 3, 8, 4, 8, 5, 8, 6, 8, 7);
#else
        vuint u = __builtin_convertvector(h, vuint) << 16;
#endif
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
    if (kind == KIND_F16) {
#if X86_64_V3
        if (use_f16c) {
            f16c_store((uint16_t *)p + i, (const float *)&f);
            return;
        }
#endif
        vuint u;
        memcpy(&u, &f, sizeof u);
        vhalf h = __builtin_convertvector(float_bits_to_half_bits(u), vhalf);
        memcpy((uint16_t *)p + i, &h, sizeof h);
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
    if (kind == KIND_F32) {
        ((float *)p)[i] = f;
        return;
    }
    if (kind == KIND_F16) {
        uint32_t u;
        memcpy(&u, &f, 4);
        ((uint16_t *)p)[i] = (uint16_t)float_bits_to_half_bits(u);
        return;
    }
    ((uint16_t *)p)[i] = scalar_bf16(f);
}

/* out[t * stride + i] = x_t[i] - base[i] (or its absolute value) in float32, base_out[i] = base[i] in float32,
 * l1[t] = sum |tau_t|, l2sq[t] = sum tau_t^2 (float64); any output pointer may be NULL. A scalar tail
 * rather than padded_load/padded_store: their per-vector test cost this memory-bound sweep 20 %. */
INLINE void task_vectors_of(
    int kind, const void *base, const void *const *tasks, int num_tasks, int64_t n, float *out, int64_t stride,
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
            float *o = out ? out + (int64_t)t * stride : NULL;
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

KERNEL_TARGET static void task_vectors_f32(const void *base, const void *const *tasks, int num_tasks, int64_t n,
                                           float *out, int64_t stride, float *base_out, double *l1, double *l2sq,
                                           int absolute) {
    task_vectors_of(KIND_F32, base, tasks, num_tasks, n, out, stride, base_out, l1, l2sq, absolute);
}

KERNEL_TARGET static void task_vectors_bf16(const void *base, const void *const *tasks, int num_tasks, int64_t n,
                                            float *out, int64_t stride, float *base_out, double *l1, double *l2sq,
                                            int absolute) {
    task_vectors_of(KIND_BF16, base, tasks, num_tasks, n, out, stride, base_out, l1, l2sq, absolute);
}

KERNEL_TARGET static void task_vectors_f16(const void *base, const void *const *tasks, int num_tasks, int64_t n,
                                           float *out, int64_t stride, float *base_out, double *l1, double *l2sq,
                                           int absolute) {
    task_vectors_of(KIND_F16, base, tasks, num_tasks, n, out, stride, base_out, l1, l2sq, absolute);
}
typedef void (*task_vectors_fn)(const void *, const void *const *, int, int64_t, float *, int64_t, float *, double *,
                                double *, int);
static const task_vectors_fn TASK_VECTORS_KERNELS[3] = {task_vectors_f32, task_vectors_bf16, task_vectors_f16};

#define MAX_TASKS 256

enum { FN_SUM = 0, FN_MEAN = 1, FN_ELECT_SUM = 2, FN_ELECT_MEAN = 3 }; /* elect.MERGE_FUNCTIONS */

INLINE vfloat as_float(vuint mask) { /* 1.0 where the comparison's lane is true, else 0.0 */
    vfloat one = (vfloat){0} + 1.0f, f;
    vuint u;
    memcpy(&u, &one, sizeof u);
    u &= mask;
    memcpy(&f, &u, sizeof f);
    return f;
}

INLINE vfloat blend(vuint mask, vfloat a, vfloat b) { /* a where mask, else b */
    vuint ua, ub;
    memcpy(&ua, &a, sizeof ua);
    memcpy(&ub, &b, sizeof ub);
    ua = (ua & mask) | (ub & ~mask); /* 0.0 is all zero bits: with a = 0, one and-not */
    memcpy(&a, &ua, sizeof a);
    return a;
}

INLINE int any_lane(vuint mask) { /* whether a comparison's lane is true (memcmp is not inlined everywhere) */
    typedef uint64_t vhalves __attribute__((vector_size(LANES * 2))); /* the two halves, OR-ed in one step */
    vhalves low, high;
    memcpy(&low, &mask, sizeof low);
    memcpy(&high, (const char *)&mask + sizeof low, sizeof high);
    low |= high;
    uint64_t any = 0;
    for (int k = 0; k < LANES / 4; k++)
        any |= low[k];
    return any != 0;
}

/* bit k set where lane k of a comparison's result is true (all ones) */
#if X86_64_V3
KERNEL_TARGET static inline unsigned lane_bits(vint mask) { return (unsigned)_mm256_movemask_ps((__m256)mask); }
#else
INLINE unsigned lane_bits(vint mask) {
    unsigned bits = 0;
    for (int k = 0; k < LANES; k++)
        bits |= (unsigned)(mask[k] < 0) << k;
    return bits;
}
#endif

INLINE vfloat vector_sign(vfloat x) { /* torch.sign: 0 for ±0 and NaN */
    return as_float((vuint)(x > 0)) - as_float((vuint)(x < 0));
}

/* LANES entries of p from i on, of which the first ``valid`` are read (the others are 0) */
INLINE vfloat padded_load(const void *p, int64_t i, int kind, int valid) {
    if (valid == LANES)
        return vector_load(p, i, kind);
    float lanes[LANES] = {0};
    for (int k = 0; k < valid; k++)
        lanes[k] = scalar_load(p, i + k, kind);
    vfloat f;
    memcpy(&f, lanes, sizeof f);
    return f;
}

/* LANES bytes of a 0/1 mask from i on (``valid`` of them read, the others 0) as 1.0 / 0.0 */
INLINE vfloat mask_load(const uint8_t *p, int64_t i, int valid) {
    uint8_t lanes[LANES] = {0};
    memcpy(lanes, p + i, (size_t)valid);
    vbyte b;
    memcpy(&b, lanes, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(b, vuint), vfloat);
}

INLINE void padded_store(void *p, int64_t i, int kind, vfloat f, int valid) {
    if (valid == LANES) {
        vector_store(p, i, kind, f);
        return;
    }
    for (int k = 0; k < valid; k++)
        scalar_store(p, i + k, kind, f[k]);
}

typedef struct {
    const float *weights;    /* w_t */
    const float *thresholds; /* trim: keep |tau_t| >= thresholds[t]; NULL: no trim */
    int fn;                  /* FN_* */
    float divisor;           /* FN_MEAN: sum of the weights */
    float majority;          /* the sign where an election's sum is 0 */
    float scale;             /* delta = psi * scale */
    int conflicts;           /* count the sign conflicts of the (trimmed) task values */
    const uint8_t *const *drops; /* DARE: tau_t kept (0/1 bytes) where drops[t][i] is 1, scaled by 1 / keep */
    float keep;
} merge_params;

typedef struct {
    double *l1, *l2sq; /* per task: sum |tau_t|, sum tau_t^2 */
    double delta_sq;   /* sum delta^2 */
    int64_t sign_total, conflicts, tie_count;
    int64_t *ties; /* NULL, or room for n positions where an election ties with a non-zero value */
} merge_sums;

/* merge_params as the loop reads them: copied into the sweep's own memory, which no store to the output
 * (through memcpy, which may alias anything) can change, so they stay in registers instead of being
 * loaded again after every vector; the weights and thresholds already broadcast to every lane. */
typedef struct {
    const void *tasks[MAX_TASKS];
    const uint8_t *drops[MAX_TASKS];
    vfloat weights[MAX_TASKS], thresholds[MAX_TASKS];
    vfloat divisor, majority, scale, keep;
    int fn, elect, trim, conflicts;
} merge_loop;

/* What one chunk's vectors add up, in lanes (merge_of adds them into merge_sums after each chunk). */
typedef struct {
    vfloat sum_abs[MAX_TASKS], sum_sq[MAX_TASKS];
    vfloat delta_sum, signs; /* signs: exact, |lane sum| <= CHUNK / LANES */
    vuint conflicts;
} merge_lanes;

/* An election's sum: v_t = x_t w_t (stored back into x), summed in task order from 0 (elect.merge_values) */
INLINE vfloat weighted_total(vfloat *x, const vfloat *weights, int num_tasks) {
    vfloat total = {0};
    for (int t = 0; t < num_tasks; t++) {
        x[t] = x[t] * weights[t];
        total = total + x[t];
    }
    return total;
}

/* The LANES entries from i on, of which the first ``valid`` exist (merge_of's loop body: called with
 * valid = LANES, a constant, for every whole vector, so the padding's tests leave the loop). */
INLINE void merge_vector(int kind, int out_kind, const void *base, int num_tasks, int64_t i, int valid,
                         const merge_loop *c, void *out, merge_sums *r, int dropping, merge_lanes *acc) {
    if (num_tasks < 1) /* check_inputs takes 1 to MAX_TASKS: x[0] is always set (gcc cannot see it) */
        __builtin_unreachable();
    vfloat x[MAX_TASKS];
    const vfloat zero = {0}, one = zero + 1.0f, tiny = zero + 1e-30f;
    vfloat b = padded_load(base, i, kind, valid), psi;
    for (int t = 0; t < num_tasks; t++) {
        vfloat d = padded_load(c->tasks[t], i, kind, valid) - b;
        acc->sum_abs[t] += vector_abs(d);
        acc->sum_sq[t] += d * d;
        if (dropping) /* DARE: (m * tau) / keep + 0, as common.dare_drop */
            d = mask_load(c->drops[t], i, valid) * d / c->keep + zero;
        x[t] = c->trim ? as_float((vuint)(vector_abs(d) >= c->thresholds[t])) * d + zero : d;
    }
    if (c->conflicts) { /* sign conflicts of the (trimmed) task values */
        vfloat hi_v = x[0], lo_v = x[0];
        vuint nan = (vuint)(x[0] != x[0]);
        for (int t = 1; t < num_tasks; t++) {
            hi_v = blend((vuint)(x[t] > hi_v), x[t], hi_v);
            lo_v = blend((vuint)(x[t] < lo_v), x[t], lo_v);
            nan |= (vuint)(x[t] != x[t]);
        }
        acc->conflicts -= (vuint)(hi_v > 0) & (vuint)(lo_v < 0) & ~nan; /* padding lanes hold 0: none */
    }
    if (!c->elect) {
        psi = x[0] * c->weights[0];
        for (int t = 1; t < num_tasks; t++)
            psi = vector_fma(x[t], c->weights[t], psi);
        if (c->fn == FN_MEAN)
            psi = psi / c->divisor;
    } else {
        vfloat total = weighted_total(x, c->weights, num_tasks), mass = zero;
        for (int t = 0; t < num_tasks; t++)
            mass = mass + vector_abs(x[t]);
        vfloat s = vector_sign(total);
        vuint tie = (vuint)(s == 0) & (vuint)(mass > 0);
        acc->signs += s; /* padding lanes: 0 */
        if (any_lane(tie)) /* rare: keep the positions */
            for (int k = 0; k < valid; k++)
                if (tie[k]) {
                    if (r->ties)
                        r->ties[r->tie_count] = i + k;
                    r->tie_count++;
                }
        if (!out) /* the signs only (a majority sign's sweep): no values, no delta */
            return;
        s = s + (one - vector_abs(s)) * c->majority;
        vfloat magnitude = zero, count = zero;
        for (int t = 0; t < num_tasks; t++) {
            vfloat a = x[t] * s;
            a = blend((vuint)(a < 0), zero, a); /* max(a, 0), NaN kept */
            magnitude = magnitude + a;
            if (c->fn == FN_ELECT_MEAN) { /* sign(a) is 1 or 0 here (0 for NaN) */
                vfloat agree = as_float((vuint)(a > 0));
                count = t == 0 ? agree * c->weights[0] : vector_fma(agree, c->weights[t], count);
            }
        }
        if (c->fn == FN_ELECT_MEAN)
            magnitude = magnitude / blend((vuint)(count < tiny), tiny, count);
        psi = magnitude * s + zero;
    }
    vfloat delta = psi * c->scale;
    acc->delta_sum += delta * delta;
    if (out) /* NULL: the sums only */
        padded_store(out, i, out_kind, b + delta, valid);
}

/* One fused merge sweep, the float32 operations of the torch path in their order (stats.TrimStat.mask,
 * elect.merge_values, elect.sign_conflict_rate, engine.merge_piece): for each entry,
 *   tau_t = x_t - base;  tau_t = (m_t * tau_t) / keep + 0  (with a DARE drop m_t);
 *   x_t = (|tau_t| >= thr_t) * tau_t + 0  (with a trim);
 *   sum:  psi = x_0 w_0, then fma(x_t, w_t, psi);  mean: that / divisor;
 *   elect: v_t = x_t w_t, s = sign(sum_t v_t) (a tie where s = 0 while some v_t != 0), s' = s + (1 - |s|) m,
 *          a_t = max(v_t s', 0), psi = (sum_t a_t) [/ max(sum of sign(a_t) w_t, 1e-30)] * s' + 0;
 *   out = base + psi * scale, stored as ``out_kind``.
 * A conflict is an entry whose trimmed values include one above and one below 0 (and no NaN). */
INLINE void merge_of(int kind, int out_kind, const void *base, const void *const *tasks, int num_tasks, int64_t n,
                     const merge_params *p, void *out, merge_sums *r, int dropping) {
    const vfloat zero = {0};
    merge_loop c;
    merge_lanes acc;
    for (int t = 0; t < num_tasks; t++) {
        c.tasks[t] = tasks[t];
        c.drops[t] = dropping ? p->drops[t] : NULL;
        c.weights[t] = zero + p->weights[t];
        c.thresholds[t] = zero + (p->thresholds ? p->thresholds[t] : 0.0f);
    }
    c.divisor = zero + p->divisor;
    c.majority = zero + p->majority;
    c.scale = zero + p->scale;
    c.keep = zero + p->keep;
    c.fn = p->fn;
    c.elect = p->fn == FN_ELECT_SUM || p->fn == FN_ELECT_MEAN;
    c.trim = p->thresholds != NULL;
    c.conflicts = p->conflicts;
    for (int t = 0; t < num_tasks; t++)
        r->l1[t] = r->l2sq[t] = 0.0;
    r->delta_sq = 0.0;
    r->sign_total = r->conflicts = r->tie_count = 0;
    for (int64_t lo = 0; lo < n; lo += CHUNK) {
        int64_t hi = lo + CHUNK < n ? lo + CHUNK : n, i = lo;
        acc.delta_sum = acc.signs = zero;
        acc.conflicts = (vuint){0};
        for (int t = 0; t < num_tasks; t++)
            acc.sum_abs[t] = acc.sum_sq[t] = zero;
        for (; i + LANES <= hi; i += LANES)
            merge_vector(kind, out_kind, base, num_tasks, i, LANES, &c, out, r, dropping, &acc);
        if (i < hi)
            merge_vector(kind, out_kind, base, num_tasks, i, (int)(hi - i), &c, out, r, dropping, &acc);
        for (int t = 0; t < num_tasks; t++) {
            r->l1[t] += (double)lane_total(acc.sum_abs[t]);
            r->l2sq[t] += (double)lane_total(acc.sum_sq[t]);
        }
        r->delta_sq += (double)lane_total(acc.delta_sum);
        r->sign_total += (int64_t)lane_total(acc.signs);
        for (int k = 0; k < LANES; k++)
            r->conflicts += acc.conflicts[k];
    }
}

/* Compiled for each storage kind, with or without a drop, and, for bfloat16 inputs (the common case),
 * with 2-4 tasks as constants: the per-task values then stay in registers (a third faster); every
 * flag that is a constant takes its branches out of the loop. */
#define MERGE_TASKS(KIND, OUT_KIND, DROP)                                                                          \
    switch (KIND == KIND_BF16 ? num_tasks : 0) {                                                                   \
    case 2: merge_of(KIND, OUT_KIND, base, tasks, 2, n, p, out, r, DROP); break;                                  \
    case 3: merge_of(KIND, OUT_KIND, base, tasks, 3, n, p, out, r, DROP); break;                                  \
    case 4: merge_of(KIND, OUT_KIND, base, tasks, 4, n, p, out, r, DROP); break;                                  \
    default: merge_of(KIND, OUT_KIND, base, tasks, num_tasks, n, p, out, r, DROP);                                \
    }
#define MERGE(KIND, OUT_KIND, NAME)                                                                                \
    KERNEL_TARGET static void NAME(const void *base, const void *const *tasks, int num_tasks, int64_t n,           \
                                   const merge_params *p, void *out, merge_sums *r) {                              \
        if (p->drops) {                                                                                           \
            MERGE_TASKS(KIND, OUT_KIND, 1)                                                                         \
        } else {                                                                                                  \
            MERGE_TASKS(KIND, OUT_KIND, 0)                                                                         \
        }                                                                                                         \
    }
MERGE(KIND_F32, KIND_F32, merge_f32_f32)
MERGE(KIND_F32, KIND_BF16, merge_f32_bf16)
MERGE(KIND_BF16, KIND_F32, merge_bf16_f32)
MERGE(KIND_BF16, KIND_BF16, merge_bf16_bf16)
MERGE(KIND_F32, KIND_F16, merge_f32_f16)
MERGE(KIND_BF16, KIND_F16, merge_bf16_f16)
MERGE(KIND_F16, KIND_F32, merge_f16_f32)
MERGE(KIND_F16, KIND_BF16, merge_f16_bf16)
MERGE(KIND_F16, KIND_F16, merge_f16_f16)

typedef void (*merge_fn)(const void *, const void *const *, int, int64_t, const merge_params *, void *, merge_sums *);
static const merge_fn MERGE_KERNELS[3][3] = {{merge_f32_f32, merge_f32_bf16, merge_f32_f16},
                                             {merge_bf16_f32, merge_bf16_bf16, merge_bf16_f16},
                                             {merge_f16_f32, merge_f16_bf16, merge_f16_f16}};

typedef double vdouble4 __attribute__((vector_size(32))); /* two of these hold a vfloat in float64 */
typedef double vdouble8 __attribute__((vector_size(64)));

/* Conversions between a vfloat and float64 go through a whole vdouble8: gcc 12 then makes one wide
 * conversion per half, but two narrow ones and a shuffle for each half converted on its own. */
INLINE vdouble4 half_as_double(vfloat v, int half) { /* lanes [4 half, 4 half + 4) of v in float64 */
    vdouble8 d = __builtin_convertvector(v, vdouble8);
    vdouble4 h;
    memcpy(&h, (const char *)&d + half * sizeof h, sizeof h);
    return h;
}

INLINE vfloat halves_as_float(vdouble4 lo, vdouble4 hi) { /* each rounded to nearest */
    vdouble8 d;
    memcpy(&d, &lo, sizeof lo);
    memcpy((char *)&d + sizeof lo, &hi, sizeof hi);
    return __builtin_convertvector(d, vfloat);
}

INLINE void add_as_double(vdouble4 *acc, vfloat v) {
    vdouble4 d[2];
    vdouble8 w = __builtin_convertvector(v, vdouble8);
    memcpy(d, &w, sizeof w);
    acc[0] += d[0];
    acc[1] += d[1];
}

/* |tau| of LANES entries from i on (a scalar for one): |x - base| in float32, |x| when base is NULL */
INLINE vfloat vector_magnitude(int kind, const void *base, const void *x, int64_t i) {
    vfloat v = vector_load(x, i, kind);
    return vector_abs(base ? v - vector_load(base, i, kind) : v);
}

INLINE float scalar_magnitude(int kind, const void *base, const void *x, int64_t i) {
    float v = scalar_load(x, i, kind);
    return fabsf(base ? v - scalar_load(base, i, kind) : v);
}

/* x, or |x - base| in float32 when base is not NULL (a row of magnitudes from the stored inputs) */
INLINE vfloat vector_operand(int kind, const void *base, const void *x, int64_t i) {
    return base ? vector_magnitude(kind, base, x, i) : vector_load(x, i, kind);
}

INLINE float scalar_operand(int kind, const void *base, const void *x, int64_t i) {
    return base ? scalar_magnitude(kind, base, x, i) : scalar_load(x, i, kind);
}

INLINE double lanes_total(const vdouble4 *sum) {
    return (sum[0][0] + sum[1][0]) + (sum[0][1] + sum[1][1]) + ((sum[0][2] + sum[1][2]) + (sum[0][3] + sum[1][3]));
}

/* Over x_i (as vector_operand): with ``counting``, below = #{x_i < value}, equal = #{x_i == value} (NaN is
 * neither); with ``summing``, total = sum x_i and capped = sum min(x_i, value) in float64 (NaN stays NaN) */
INLINE void scan_of(int kind, const void *base, const void *x, int64_t n, float value, int counting, int summing,
                    int64_t *below, int64_t *equal, double *total, double *capped) {
    vdouble4 all[2] = {{0}, {0}}, low[2] = {{0}, {0}};
    double tail_all = 0.0, tail_low = 0.0;
    *below = *equal = 0;
    for (int64_t lo = 0; lo < n; lo += CHUNK) { /* lane counters of one chunk cannot overflow */
        int64_t hi = lo + CHUNK < n ? lo + CHUNK : n, i = lo;
        vuint less = {0}, same = {0};
        for (; i + LANES <= hi; i += LANES) {
            vfloat v = vector_operand(kind, base, x, i);
            if (counting) {
                less -= (vuint)(v < value); /* a true lane is ~0, i.e. -1 */
                same -= (vuint)(v == value);
            }
            if (summing) {
                add_as_double(all, v);
                add_as_double(low, blend((vuint)(v > value), (vfloat){0} + value, v));
            }
        }
        for (; i < hi; i++) {
            float v = scalar_operand(kind, base, x, i);
            *below += v < value;
            *equal += v == value;
            tail_all += v;
            tail_low += v > value ? value : v;
        }
        for (int k = 0; k < LANES; k++) {
            *below += less[k];
            *equal += same[k];
        }
    }
    *total = lanes_total(all) + tail_all;
    *capped = lanes_total(low) + tail_low;
}

#define SCAN(KIND, COUNTING, SUMMING, NAME)                                                                        \
    KERNEL_TARGET static void NAME(const void *base, const void *x, int64_t n, float value, int64_t *below,        \
                                   int64_t *equal, double *total, double *capped) {                                \
        scan_of(KIND, base, x, n, value, COUNTING, SUMMING, below, equal, total, capped);                          \
    }
SCAN(KIND_F32, 1, 0, count_f32)
SCAN(KIND_BF16, 1, 0, count_bf16)
SCAN(KIND_F32, 0, 1, sums_f32)
SCAN(KIND_BF16, 0, 1, sums_bf16)
SCAN(KIND_F32, 1, 1, count_and_sums_f32)
SCAN(KIND_BF16, 1, 1, count_and_sums_bf16)
SCAN(KIND_F16, 1, 0, count_f16)
SCAN(KIND_F16, 0, 1, sums_f16)
SCAN(KIND_F16, 1, 1, count_and_sums_f16)
typedef void (*scan_fn)(const void *, const void *, int64_t, float, int64_t *, int64_t *, double *, double *);
static const scan_fn SCAN_KERNELS[3][3] = { /* [what - 1][kind]: what = 1 count, 2 sums, 3 both */
    {count_f32, count_bf16, count_f16}, {sums_f32, sums_bf16, sums_f16},
    {count_and_sums_f32, count_and_sums_bf16, count_and_sums_f16}};

/* For each task t, over n entries of |tau_t| (vector_magnitude), with u = the float32 bits of |tau_t|, each added
 * to what the accumulators hold:
 * - ``coarse`` (counts, l1): counts[t * 65536 + (u >> 16)] += 1 and l1[t] += |tau_t| (float64);
 * - ``window`` (starts, width, fine, below): where starts[t] <= u < starts[t] + width, fine[t * width + u -
 *   starts[t]] += 1; where u < starts[t], below[t] += |tau_t|.
 * NaN lands in its own coarse bin and makes l1 NaN. A CHUNK of the base is read for every task while it is in the
 * cache. The window of one coarse bin b (starts b << 16, width 65536) is the second read of a global trim; a
 * window of a few bins beside the coarse counts finds the threshold in one read (topk.StreamingTopK.aim).
 * With ``order`` u is instead the order key (order_key) of x itself (rows of values, no base) or of |tau_t|, and
 * nothing is added to l1 or below. */
/* topk.order_keys: keys that order like the float32 values of any sign, -0.0 as +0.0 */
INLINE vuint order_key(vfloat v) {
    vuint u;
    v += 0.0f;
    memcpy(&u, &v, sizeof u);
    return u ^ ((vuint)((vint)u >> 31) | 0x80000000u);
}

INLINE uint32_t scalar_order_key(float v) {
    uint32_t u;
    v += 0.0f;
    memcpy(&u, &v, 4);
    return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
}

INLINE void magnitude_counts_of(int kind, int order, int coarse, int window, const void *base, const void *const *tasks,
                                int num_tasks, int64_t n, int64_t *counts, double *l1, const int64_t *starts,
                                int64_t width, int64_t *fine, double *below) {
    for (int64_t lo = 0; lo < n; lo += CHUNK) {
        int64_t hi = lo + CHUNK < n ? lo + CHUNK : n;
        for (int t = 0; t < num_tasks; t++) {
            int64_t *bins = coarse ? counts + ((int64_t)t << 16) : NULL, *in = window ? fine + t * width : NULL, i = lo;
            uint32_t start = window ? (uint32_t)starts[t] : 0, keys = (uint32_t)width;
            vdouble4 sum[2] = {{0}, {0}}, under[2] = {{0}, {0}};
            for (; i + LANES <= hi; i += LANES) {
                vfloat v = order && !base ? vector_load(tasks[t], i, kind) : vector_magnitude(kind, base, tasks[t], i);
                vuint u;
                if (order)
                    u = order_key(v);
                else
                    memcpy(&u, &v, sizeof u);
                if (coarse) {
                    vuint high = u >> 16;
                    for (int k = 0; k < LANES; k++)
                        bins[high[k]]++;
                    if (!order)
                        add_as_double(sum, v);
                }
                if (window) {
                    vuint off = u - start;
                    if (!order)
                        add_as_double(under, blend((vuint)(u < start), v, (vfloat){0}));
                    for (unsigned lanes = lane_bits((vint)(off < keys)); lanes; lanes &= lanes - 1)
                        in[off[__builtin_ctz(lanes)]]++; /* a few bins' share of the entries */
                }
            }
            double tail = 0.0, tail_under = 0.0;
            for (; i < hi; i++) {
                float v = order && !base ? scalar_load(tasks[t], i, kind) : scalar_magnitude(kind, base, tasks[t], i);
                uint32_t u;
                if (order)
                    u = scalar_order_key(v);
                else
                    memcpy(&u, &v, 4);
                if (coarse) {
                    bins[u >> 16]++;
                    tail += order ? 0.0f : v;
                }
                if (window) {
                    if (u - start < keys)
                        in[u - start]++;
                    else if (u < start && !order)
                        tail_under += v;
                }
            }
            if (coarse)
                l1[t] += lanes_total(sum) + tail;
            if (window)
                below[t] += lanes_total(under) + tail_under;
        }
    }
}

#define MAGNITUDE_COUNTS(name, kind, order, coarse, window)                                                         \
    KERNEL_TARGET static void name(const void *base, const void *const *tasks, int num_tasks, int64_t n,             \
                                   int64_t *counts, double *l1, const int64_t *starts, int64_t width, int64_t *fine, \
                                   double *below) {                                                                  \
        magnitude_counts_of(kind, order, coarse, window, base, tasks, num_tasks, n, counts, l1, starts, width, fine,  \
                            below);                                                                                  \
    }
MAGNITUDE_COUNTS(magnitude_coarse_f32, KIND_F32, 0, 1, 0)
MAGNITUDE_COUNTS(magnitude_coarse_bf16, KIND_BF16, 0, 1, 0)
MAGNITUDE_COUNTS(magnitude_coarse_f16, KIND_F16, 0, 1, 0)
MAGNITUDE_COUNTS(magnitude_window_f32, KIND_F32, 0, 0, 1)
MAGNITUDE_COUNTS(magnitude_window_bf16, KIND_BF16, 0, 0, 1)
MAGNITUDE_COUNTS(magnitude_window_f16, KIND_F16, 0, 0, 1)
MAGNITUDE_COUNTS(magnitude_both_f32, KIND_F32, 0, 1, 1)
MAGNITUDE_COUNTS(magnitude_both_bf16, KIND_BF16, 0, 1, 1)
MAGNITUDE_COUNTS(magnitude_both_f16, KIND_F16, 0, 1, 1)
MAGNITUDE_COUNTS(order_coarse_f32, KIND_F32, 1, 1, 0)
MAGNITUDE_COUNTS(order_coarse_bf16, KIND_BF16, 1, 1, 0)
MAGNITUDE_COUNTS(order_coarse_f16, KIND_F16, 1, 1, 0)
MAGNITUDE_COUNTS(order_window_f32, KIND_F32, 1, 0, 1)
MAGNITUDE_COUNTS(order_window_bf16, KIND_BF16, 1, 0, 1)
MAGNITUDE_COUNTS(order_window_f16, KIND_F16, 1, 0, 1)
MAGNITUDE_COUNTS(order_both_f32, KIND_F32, 1, 1, 1)
MAGNITUDE_COUNTS(order_both_bf16, KIND_BF16, 1, 1, 1)
MAGNITUDE_COUNTS(order_both_f16, KIND_F16, 1, 1, 1)

typedef void (*magnitude_counts_fn)(const void *, const void *const *, int, int64_t, int64_t *, double *,
                                    const int64_t *, int64_t, int64_t *, double *);
static const magnitude_counts_fn MAGNITUDE_COUNTS_KERNELS[3][3] = { /* [coarse + 2 * window - 1][kind] */
    {magnitude_coarse_f32, magnitude_coarse_bf16, magnitude_coarse_f16},
    {magnitude_window_f32, magnitude_window_bf16, magnitude_window_f16},
    {magnitude_both_f32, magnitude_both_bf16, magnitude_both_f16}};
static const magnitude_counts_fn ORDER_COUNTS_KERNELS[3][3] = {{order_coarse_f32, order_coarse_bf16, order_coarse_f16},
                                                               {order_window_f32, order_window_bf16, order_window_f16},
                                                               {order_both_f32, order_both_bf16, order_both_f16}};

/* NeuroMerging's neurons (methods/subspaces.py): rows of ``width`` entries, Q = [tau_1; ...; tau_T; w0] per row,
 * tau_t = x_t - w0 in float32, trimmed as in merge_of; the float64 work four lanes at a time. Its float64 sums
 * come in another order than torch's BLAS, so a float32 result rounded from one could differ by one unit in
 * the last place (none did on the 0.47B benchmark or in the tests). */
#define NEURON_MAX_TASKS 16
#define NEURON_PAIRS ((NEURON_MAX_TASKS + 1) * (NEURON_MAX_TASKS + 2) / 2)

/* The row kernels' inputs as their loops read them: in the sweep's own memory, which no store to the output
 * (through memcpy) can change, so they stay in registers (see merge_loop). */
typedef struct {
    const void *base, *tasks[NEURON_MAX_TASKS];
    vfloat thresholds[NEURON_MAX_TASKS];
    int trim;
} neuron_loop;

INLINE void neuron_loop_of(neuron_loop *c, const void *base, const void *const *tasks, int num_tasks,
                           const float *thresholds) {
    c->base = base;
    for (int t = 0; t < num_tasks; t++) {
        c->tasks[t] = tasks[t];
        c->thresholds[t] = (vfloat){0} + (thresholds ? thresholds[t] : 0.0f);
    }
    c->trim = thresholds != NULL;
}

/* x[0..T-1] = the (trimmed) task values of LANES entries of a row from i on (the first ``valid`` of them
 * read, the others 0), x[T] = w0; their |tau_t| and tau_t^2 (before the trim) added to sum_abs and sum_sq
 * unless those are NULL */
INLINE void neuron_values(int kind, const neuron_loop *c, int num_tasks, int64_t i, int valid, vfloat *x,
                          vfloat *sum_abs, vfloat *sum_sq) {
    const vfloat zero = {0};
    vfloat b = padded_load(c->base, i, kind, valid);
    for (int t = 0; t < num_tasks; t++) {
        vfloat d = padded_load(c->tasks[t], i, kind, valid) - b;
        if (sum_abs) {
            sum_abs[t] += vector_abs(d);
            sum_sq[t] += d * d;
        }
        x[t] = c->trim ? as_float((vuint)(vector_abs(d) >= c->thresholds[t])) * d + zero : d;
    }
    x[num_tasks] = b;
}

/* One vector of neuron_gram_of's row: the products of its values added into acc. */
INLINE void gram_vector(int kind, const neuron_loop *c, int num_tasks, int64_t i, int valid, vdouble4 *acc,
                        vfloat *sum_abs, vfloat *sum_sq) {
    const int q = num_tasks + 1;
    vfloat x[NEURON_MAX_TASKS + 1];
    vdouble4 v[NEURON_MAX_TASKS + 1];
    neuron_values(kind, c, num_tasks, i, valid, x, sum_abs, sum_sq);
    for (int half = 0; half < 2; half++) { /* padding lanes hold 0: they add nothing */
        for (int s = 0; s < q; s++)
            v[s] = half_as_double(x[s], half);
        for (int s = 0, k = 0; s < q; s++)
            for (int t = s; t < q; t++, k++)
                acc[k] += v[s] * v[t];
    }
}

/* With more than 6 rows in Q (T > 5), the accumulators do not fit in registers: a row's values are converted to
 * float64 GRAM_VECTORS vectors at a time (a buffer in L1), then the accumulators are swept GRAM_GROUP at a
 * time over the buffer, in registers. Each accumulator adds its products in gram_vector's order (vector by
 * vector, the low half first): the same sums. */
#define GRAM_VECTORS 16
#define GRAM_GROUP 6

/* acc[g] += buf[s] * buf[t + g] for g < m, over the ``count`` buffered vectors, both halves of each in turn */
INLINE void gram_run(vdouble4 (*buf)[GRAM_VECTORS][2], int count, int s, int t, int m, vdouble4 *acc) {
    vdouble4 a[GRAM_GROUP];
    for (int g = 0; g < m; g++)
        a[g] = acc[g];
    for (int v = 0; v < count; v++)
        for (int half = 0; half < 2; half++) {
            vdouble4 xs = buf[s][v][half];
            for (int g = 0; g < m; g++)
                a[g] += xs * buf[t + g][v][half];
        }
    for (int g = 0; g < m; g++)
        acc[g] = a[g];
}

/* gram_run with m a constant (its accumulators in registers) */
INLINE void gram_group(vdouble4 (*buf)[GRAM_VECTORS][2], int count, int s, int t, int m, vdouble4 *acc) {
    switch (m) {
    case 1: gram_run(buf, count, s, t, 1, acc); break;
    case 2: gram_run(buf, count, s, t, 2, acc); break;
    case 3: gram_run(buf, count, s, t, 3, acc); break;
    case 4: gram_run(buf, count, s, t, 4, acc); break;
    case 5: gram_run(buf, count, s, t, 5, acc); break;
    default: gram_run(buf, count, s, t, GRAM_GROUP, acc);
    }
}

/* The vectors of a row from i to end (neuron_gram_of's chunk) added into acc through the float64 buffer. */
INLINE void gram_buffered(int kind, const neuron_loop *c, int num_tasks, int64_t i, int64_t end, vdouble4 *acc,
                          vfloat *sum_abs, vfloat *sum_sq) {
    const int q = num_tasks + 1;
    vfloat x[NEURON_MAX_TASKS + 1];
    vdouble4 buf[NEURON_MAX_TASKS + 1][GRAM_VECTORS][2];
    while (i < end) {
        int64_t left = (end - i + LANES - 1) / LANES;
        int count = left < GRAM_VECTORS ? (int)left : GRAM_VECTORS;
        for (int v = 0; v < count; v++) {
            int64_t at = i + (int64_t)v * LANES;
            if (at + LANES <= end)
                neuron_values(kind, c, num_tasks, at, LANES, x, sum_abs, sum_sq);
            else /* padding lanes hold 0: they add nothing */
                neuron_values(kind, c, num_tasks, at, (int)(end - at), x, sum_abs, sum_sq);
            for (int s = 0; s < q; s++) {
                vdouble8 w = __builtin_convertvector(x[s], vdouble8);
#if __has_builtin(__builtin_shufflevector)
                buf[s][v][0] = __builtin_shufflevector(w, w, 0, 1, 2, 3);
                buf[s][v][1] = __builtin_shufflevector(w, w, 4, 5, 6, 7);
#else
                memcpy(buf[s][v], &w, sizeof w); /* both halves (gcc 11: slower, with a store and reloads) */
#endif
            }
        }
        i += (int64_t)count * LANES;
        for (int s = 0, k = 0; s < q; k += q - s, s++)
            for (int t = s; t < q; t += GRAM_GROUP)
                gram_group(buf, count, s, t, q - t < GRAM_GROUP ? q - t : GRAM_GROUP, acc + k + (t - s));
    }
}

/* gram[r] = Q Q^T ((T+1) x (T+1), float64) of each row r (the products of float32 values are exact; only the
 * order of the sums is the kernel's), l1[t] += sum |tau_t| and l2sq[t] += sum tau_t^2 of the untrimmed tau_t */
INLINE void neuron_gram_of(int kind, const void *base, const void *const *tasks, int num_tasks, int64_t rows,
                           int64_t width, const float *thresholds, double *gram, double *l1, double *l2sq) {
    const int q = num_tasks + 1;
    neuron_loop c;
    vfloat sum_abs[NEURON_MAX_TASKS], sum_sq[NEURON_MAX_TASKS];
    vdouble4 acc[NEURON_PAIRS];
    neuron_loop_of(&c, base, tasks, num_tasks, thresholds);
    for (int64_t r = 0; r < rows; r++) {
        int64_t row = r * width;
        for (int k = 0; k < q * (q + 1) / 2; k++)
            acc[k] = (vdouble4){0};
        for (int64_t lo = 0; lo < width; lo += CHUNK) {
            int64_t hi = lo + CHUNK < width ? lo + CHUNK : width, i = row + lo, end = row + hi;
            for (int t = 0; t < num_tasks; t++)
                sum_abs[t] = sum_sq[t] = (vfloat){0};
            if (q > 6) {
                gram_buffered(kind, &c, num_tasks, i, end, acc, sum_abs, sum_sq);
            } else {
                for (; i + LANES <= end; i += LANES)
                    gram_vector(kind, &c, num_tasks, i, LANES, acc, sum_abs, sum_sq);
                if (i < end)
                    gram_vector(kind, &c, num_tasks, i, (int)(end - i), acc, sum_abs, sum_sq);
            }
            for (int t = 0; t < num_tasks; t++) {
                l1[t] += (double)lane_total(sum_abs[t]);
                l2sq[t] += (double)lane_total(sum_sq[t]);
            }
        }
        double *g = gram + r * q * q;
        for (int s = 0, k = 0; s < q; s++)
            for (int t = s; t < q; t++, k++)
                g[s * q + t] = g[t * q + s] = (acc[k][0] + acc[k][1]) + (acc[k][2] + acc[k][3]);
    }
}

/* One vector of neuron_output_of's row r (its z row zr and coefficient c), stored; its squares added up. */
INLINE void output_vector(int kind, int out_kind, const neuron_loop *c, int num_tasks, int64_t i, int valid,
                          const vdouble4 *zr, vfloat coefficient, vfloat lambda1, vfloat lambda2, void *out,
                          vfloat *delta_sq, vfloat *par_sq, vfloat *orth_sq) {
    const int q = num_tasks + 1;
    vfloat x[NEURON_MAX_TASKS + 1];
    neuron_values(kind, c, num_tasks, i, valid, x, NULL, NULL);
    vdouble4 o[2];
    for (int half = 0; half < 2; half++) {
        o[half] = zr[0] * half_as_double(x[0], half);
        for (int s = 1; s < q; s++)
            o[half] = o[half] + zr[s] * half_as_double(x[s], half);
    }
    vfloat orthogonal = halves_as_float(o[0], o[1]), parallel = coefficient * x[num_tasks];
    vfloat delta = parallel * lambda1 + orthogonal * lambda2;
    *delta_sq += delta * delta;
    *par_sq += parallel * parallel;
    *orth_sq += orthogonal * orthogonal;
    padded_store(out, i, out_kind, x[num_tasks] + delta, valid);
}

/* For each row r: orthogonal = (float)(sum_s z[r][s] Q_s) (float64 sums), parallel = coefficient[r] * w0,
 * delta = parallel * lambda1 + orthogonal * lambda2, out = w0 + delta stored as ``out_kind``: the float32
 * operations of neuron_merge and engine.merge_piece. sums += (sum delta^2, sum parallel^2, sum orthogonal^2). */
INLINE void neuron_output_of(int kind, int out_kind, const void *base, const void *const *tasks, int num_tasks,
                             int64_t rows, int64_t width, const float *thresholds, const double *z,
                             const float *coefficient, float lambda1, float lambda2, void *out, double *sums) {
    const int q = num_tasks + 1;
    const vfloat l1 = (vfloat){0} + lambda1, l2 = (vfloat){0} + lambda2;
    neuron_loop c;
    vdouble4 zr[NEURON_MAX_TASKS + 1];
    neuron_loop_of(&c, base, tasks, num_tasks, thresholds);
    for (int64_t r = 0; r < rows; r++) {
        int64_t row = r * width;
        for (int s = 0; s < q; s++)
            zr[s] = (vdouble4){0} + z[r * q + s];
        vfloat cr = (vfloat){0} + coefficient[r];
        for (int64_t lo = 0; lo < width; lo += CHUNK) {
            int64_t hi = lo + CHUNK < width ? lo + CHUNK : width, i = row + lo, end = row + hi;
            vfloat delta_sq = {0}, par_sq = {0}, orth_sq = {0};
            for (; i + LANES <= end; i += LANES)
                output_vector(kind, out_kind, &c, num_tasks, i, LANES, zr, cr, l1, l2, out, &delta_sq, &par_sq,
                              &orth_sq);
            if (i < end)
                output_vector(kind, out_kind, &c, num_tasks, i, (int)(end - i), zr, cr, l1, l2, out, &delta_sq,
                              &par_sq, &orth_sq);
            sums[0] += (double)lane_total(delta_sq);
            sums[1] += (double)lane_total(par_sq);
            sums[2] += (double)lane_total(orth_sq);
        }
    }
}

/* Compiled for each storage kind with 2-5 tasks as constants (the accumulators then stay in registers, or
 * mostly: at T = 5 twice as fast as with T a variable; more tasks go through gram_buffered). */
#define NEURON_TASKS(CALL)                                                                                         \
    switch (num_tasks) {                                                                                           \
    case 2: { const int T = 2; CALL; break; }                                                                      \
    case 3: { const int T = 3; CALL; break; }                                                                      \
    case 4: { const int T = 4; CALL; break; }                                                                      \
    case 5: { const int T = 5; CALL; break; }                                                                      \
    default: { const int T = num_tasks; CALL; }                                                                    \
    }
#define NEURON_GRAM(KIND, NAME)                                                                                    \
    KERNEL_TARGET static void NAME(const void *base, const void *const *tasks, int num_tasks, int64_t rows,        \
                                   int64_t width, const float *thresholds, double *gram, double *l1, double *l2sq) { \
        NEURON_TASKS(neuron_gram_of(KIND, base, tasks, T, rows, width, thresholds, gram, l1, l2sq))                \
    }
NEURON_GRAM(KIND_F32, neuron_gram_f32)
NEURON_GRAM(KIND_BF16, neuron_gram_bf16)
NEURON_GRAM(KIND_F16, neuron_gram_f16)
#define NEURON_OUTPUT(KIND, OUT_KIND, NAME)                                                                        \
    KERNEL_TARGET static void NAME(const void *base, const void *const *tasks, int num_tasks, int64_t rows,        \
                                   int64_t width, const float *thresholds, const double *z, const float *coefficient, \
                                   float lambda1, float lambda2, void *out, double *sums) {                        \
        NEURON_TASKS(neuron_output_of(KIND, OUT_KIND, base, tasks, T, rows, width, thresholds, z, coefficient,     \
                                      lambda1, lambda2, out, sums))                                                \
    }
NEURON_OUTPUT(KIND_F32, KIND_F32, neuron_output_f32_f32)
NEURON_OUTPUT(KIND_F32, KIND_BF16, neuron_output_f32_bf16)
NEURON_OUTPUT(KIND_BF16, KIND_F32, neuron_output_bf16_f32)
NEURON_OUTPUT(KIND_BF16, KIND_BF16, neuron_output_bf16_bf16)
NEURON_OUTPUT(KIND_F32, KIND_F16, neuron_output_f32_f16)
NEURON_OUTPUT(KIND_BF16, KIND_F16, neuron_output_bf16_f16)
NEURON_OUTPUT(KIND_F16, KIND_F32, neuron_output_f16_f32)
NEURON_OUTPUT(KIND_F16, KIND_BF16, neuron_output_f16_bf16)
NEURON_OUTPUT(KIND_F16, KIND_F16, neuron_output_f16_f16)

typedef void (*neuron_gram_fn)(const void *, const void *const *, int, int64_t, int64_t, const float *, double *,
                               double *, double *);
static const neuron_gram_fn NEURON_GRAM_KERNELS[3] = {neuron_gram_f32, neuron_gram_bf16, neuron_gram_f16};
typedef void (*neuron_output_fn)(const void *, const void *const *, int, int64_t, int64_t, const float *,
                                 const double *, const float *, float, float, void *, double *);
static const neuron_output_fn NEURON_OUTPUT_KERNELS[3][3] = {
    {neuron_output_f32_f32, neuron_output_f32_bf16, neuron_output_f32_f16},
    {neuron_output_bf16_f32, neuron_output_bf16_bf16, neuron_output_bf16_f16},
    {neuron_output_f16_f32, neuron_output_f16_bf16, neuron_output_f16_f16}};

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
    if (kind == KIND_F32 || kind == KIND_BF16 || kind == KIND_F16)
        return 0;
    PyErr_SetString(PyExc_ValueError, "unknown storage kind");
    return -1;
}

/* A kernel's stored inputs checked: a known kind, 1 to ``most`` task pointers (into tasks[]), a size >= 0 */
static int check_inputs(const char *kernel, int kind, PyObject *task_list, Py_ssize_t n, int most, const void **tasks,
                        Py_ssize_t *num_tasks) {
    if (check_kind(kind) || read_pointers(task_list, tasks, num_tasks))
        return -1;
    if (*num_tasks < 1 || *num_tasks > most || n < 0) {
        PyErr_Format(PyExc_ValueError, "%s: 1 to %d tasks, and a size >= 0", kernel, most);
        return -1;
    }
    return 0;
}

/* merge(kind, out_kind, base, tasks, n, weights, thresholds, fn, divisor, majority, scale, conflicts, drops, keep,
 *       out, l1, l2sq, ties, threads)
 * -> (delta_sq, sign_total, conflicts, tie_count); pointers as integers (0: none, for thresholds and ties) */
/* Work split into parts of whole CHUNKs: a part is the unit of the results (its float64 sums are added to the
 * others' in part order) and its bounds depend on the size alone, so results are the same bytes whatever the
 * number of threads. Threads (the calling one and up to ``threads`` - 1 more; none on Windows) take the parts in
 * turn as they come free: a thread slowed by another (the reader's copies, the writer's) does not hold the others
 * up at the end of the call, as an equal share per thread would. Every entry's value depends on that entry alone;
 * only the float64 sums are added in another order than torch's. */
#define MAX_PARTS 64
#define MIN_PART (1 << 18) /* entries: below this a part costs more than it balances */

typedef void (*part_fn)(void *ctx, int part, int worker, int64_t lo, int64_t hi);

typedef struct {
    part_fn fn;
    void *ctx;
    const int64_t *bounds;
    int parts, worker;
    int *next; /* the next part to take, shared */
} worker_call;

static void *run_worker(void *arg) {
    worker_call *w = (worker_call *)arg;
    for (;;) {
#ifndef _WIN32
        int k = __atomic_fetch_add(w->next, 1, __ATOMIC_RELAXED);
#else
        int k = (*w->next)++;
#endif
        if (k >= w->parts)
            return NULL;
        w->fn(w->ctx, k, w->worker, w->bounds[k], w->bounds[k + 1]);
    }
}

/* Runs fn over [0, n) in parts of whole ``grain``s, each of at least ``least`` (but one), on up to ``threads``
 * threads (fn's ``worker``: 0 to threads - 1); returns the number of parts, whose bounds are in bounds[] */
static int run_parts(int64_t n, int64_t grain, int64_t least, int threads, part_fn fn, void *ctx, int64_t *bounds) {
    int64_t grains = (n + grain - 1) / grain;
    int parts = n / least >= MAX_PARTS ? MAX_PARTS : n / least > 1 ? (int)(n / least) : 1;
    int workers = threads < 1 ? 1 : threads > parts ? parts : threads;
#ifdef _WIN32
    workers = 1;
#endif
    for (int k = 0; k <= parts; k++) {
        int64_t b = grains * k / parts * grain;
        bounds[k] = b < n ? b : n;
    }
    int next = 0;
    worker_call calls[MAX_PARTS];
    for (int k = 0; k < workers; k++)
        calls[k] = (worker_call){fn, ctx, bounds, parts, k, &next};
#ifndef _WIN32
    pthread_t ids[MAX_PARTS];
    int started[MAX_PARTS] = {0};
    for (int k = 1; k < workers; k++) /* a thread that cannot be had leaves its parts to the others */
        started[k] = pthread_create(&ids[k], NULL, run_worker, &calls[k]) == 0;
    run_worker(&calls[0]);
    for (int k = 1; k < workers; k++)
        if (started[k])
            pthread_join(ids[k], NULL);
#else
    run_worker(&calls[0]);
#endif
    return parts;
}

typedef struct {
    int kind, out_kind, num_tasks;
    const void *base, **tasks;
    const merge_params *p;
    void *out;
    int64_t *ties;
    merge_sums sums[MAX_PARTS];
    double l1[MAX_PARTS][MAX_TASKS], l2sq[MAX_PARTS][MAX_TASKS];
} merge_job;

static const int64_t KIND_BYTES[3] = {4, 2, 2};

static void merge_part(void *ctx, int part, int worker, int64_t lo, int64_t hi) {
    merge_job *j = (merge_job *)ctx;
    const void *tasks[MAX_TASKS], *drops[MAX_TASKS];
    int64_t in = KIND_BYTES[j->kind], out = KIND_BYTES[j->out_kind];
    merge_params p = *j->p;
    for (int t = 0; t < j->num_tasks; t++) {
        tasks[t] = (const char *)j->tasks[t] + lo * in;
        if (p.drops)
            drops[t] = p.drops[t] + lo;
    }
    if (p.drops)
        p.drops = (const uint8_t *const *)drops;
    merge_sums *r = &j->sums[part];
    *r = (merge_sums){j->l1[part], j->l2sq[part], 0.0, 0, 0, 0, j->ties ? j->ties + lo : NULL};
    MERGE_KERNELS[j->kind][j->out_kind]((const char *)j->base + lo * in, tasks, j->num_tasks, hi - lo, &p,
                                        j->out ? (char *)j->out + lo * out : NULL, r);
}

static PyObject *merge(PyObject *self, PyObject *args) {
    (void)self;
    int kind, out_kind, fn;
    unsigned long long base, weights, thresholds, out, l1, l2sq, ties;
    PyObject *task_list;
    Py_ssize_t n, num_tasks;
    merge_params p;
    PyObject *drop_list;
    int threads;
    if (!PyArg_ParseTuple(args, "iiKO!nKKifffpO!fKKKKi", &kind, &out_kind, &base, &PyTuple_Type, &task_list, &n,
                          &weights, &thresholds, &fn, &p.divisor, &p.majority, &p.scale, &p.conflicts, &PyTuple_Type,
                          &drop_list, &p.keep, &out, &l1, &l2sq, &ties, &threads))
        return NULL;
    const void *tasks[MAX_TASKS], *drops[MAX_TASKS];
    Py_ssize_t num_drops;
    if (check_inputs("merge", kind, task_list, n, MAX_TASKS, tasks, &num_tasks) || check_kind(out_kind) ||
        read_pointers(drop_list, drops, &num_drops))
        return NULL;
    if (num_drops && num_drops != num_tasks) {
        PyErr_SetString(PyExc_ValueError, "merge: one drop mask per task, or none");
        return NULL;
    }
    p.drops = num_drops ? (const uint8_t *const *)drops : NULL;
    if (fn < FN_SUM || fn > FN_ELECT_MEAN) {
        PyErr_SetString(PyExc_ValueError, "merge: an unknown merge function");
        return NULL;
    }
    p.weights = (const float *)weights;
    p.thresholds = (const float *)thresholds;
    p.fn = fn;
    merge_job *j = PyMem_RawMalloc(sizeof(merge_job));
    if (!j)
        return PyErr_NoMemory();
    *j = (merge_job){.kind = kind, .out_kind = out_kind, .num_tasks = (int)num_tasks, .base = (const void *)base,
                     .tasks = tasks, .p = &p, .out = (void *)out, .ties = (int64_t *)ties};
    merge_sums total = {(double *)l1, (double *)l2sq, 0.0, 0, 0, 0, (int64_t *)ties};
    Py_BEGIN_ALLOW_THREADS
    int64_t bounds[MAX_PARTS + 1];
    int parts = run_parts((int64_t)n, CHUNK, MIN_PART, threads, merge_part, j, bounds);
    for (int t = 0; t < num_tasks; t++)
        total.l1[t] = total.l2sq[t] = 0.0;
    for (int k = 0; k < parts; k++) { /* in order: the tie positions stay ascending */
        merge_sums *r = &j->sums[k];
        for (int t = 0; t < num_tasks; t++) {
            total.l1[t] += r->l1[t];
            total.l2sq[t] += r->l2sq[t];
        }
        total.delta_sq += r->delta_sq;
        total.sign_total += r->sign_total;
        total.conflicts += r->conflicts;
        if (total.ties)
            for (int64_t i = 0; i < r->tie_count; i++)
                total.ties[total.tie_count + i] = r->ties[i] + bounds[k];
        total.tie_count += r->tie_count;
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(j);
    return Py_BuildValue("dLLL", total.delta_sq, (long long)total.sign_total, (long long)total.conflicts,
                         (long long)total.tie_count);
}

typedef struct {
    int kind, num_tasks, absolute;
    const void *base, **tasks;
    float *out, *base_out;
    int64_t n;
    double l1[MAX_PARTS][MAX_TASKS], l2sq[MAX_PARTS][MAX_TASKS];
} task_vectors_job;

static void task_vectors_part(void *ctx, int part, int worker, int64_t lo, int64_t hi) {
    task_vectors_job *j = (task_vectors_job *)ctx;
    const void *tasks[MAX_TASKS];
    int64_t in = KIND_BYTES[j->kind];
    for (int t = 0; t < j->num_tasks; t++)
        tasks[t] = (const char *)j->tasks[t] + lo * in;
    TASK_VECTORS_KERNELS[j->kind](
        (const char *)j->base + lo * in, tasks, j->num_tasks, hi - lo, j->out ? j->out + lo : NULL, j->n,
        j->base_out ? j->base_out + lo : NULL, j->l1[part], j->l2sq[part], j->absolute);
}

static PyObject *task_vectors(PyObject *self, PyObject *args) {
    (void)self;
    int kind, absolute;
    unsigned long long base, out, base_out, l1, l2sq;
    PyObject *task_list;
    Py_ssize_t n, num_tasks;
    int threads;
    if (!PyArg_ParseTuple(args, "iKO!nKKKKpi", &kind, &base, &PyTuple_Type, &task_list, &n, &out, &base_out, &l1,
                          &l2sq, &absolute, &threads))
        return NULL;
    const void *tasks[MAX_TASKS];
    if (check_inputs("task_vectors", kind, task_list, n, MAX_TASKS, tasks, &num_tasks))
        return NULL;
    task_vectors_job *j = PyMem_RawMalloc(sizeof(task_vectors_job));
    if (!j)
        return PyErr_NoMemory();
    *j = (task_vectors_job){.kind = kind, .num_tasks = (int)num_tasks, .absolute = absolute,
                            .base = (const void *)base, .tasks = tasks, .out = (float *)out,
                            .base_out = (float *)base_out, .n = (int64_t)n};
    Py_BEGIN_ALLOW_THREADS
    int64_t bounds[MAX_PARTS + 1];
    int parts = run_parts((int64_t)n, CHUNK, MIN_PART, threads, task_vectors_part, j, bounds);
    for (int t = 0; t < num_tasks; t++) {
        double a = 0.0, b = 0.0;
        for (int k = 0; k < parts; k++) {
            a += j->l1[k][t];
            b += j->l2sq[k][t];
        }
        ((double *)l1)[t] = a;
        ((double *)l2sq)[t] = b;
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(j);
    Py_RETURN_NONE;
}

/* DARE's keep masks: numpy's PCG64 (a 128-bit LCG with the XSL-RR output), drawn as numpy's random_raw does,
 * in parts over threads (the LCG jumps ahead to each part in log steps) and in interleaved streams within a
 * part (independent multiply chains instead of one that waits on each multiply) */
typedef __uint128_t u128;
#define PCG_MULTIPLIER (((u128)2549297995355413924ULL << 64) | 4865540595714422341ULL)
#define PCG_STREAMS 4

/* the state after ``delta`` more steps */
static u128 pcg_advance(u128 state, u128 inc, uint64_t delta) {
    u128 mult = 1, plus = 0, step_mult = PCG_MULTIPLIER, step_plus = inc;
    for (; delta; delta >>= 1) {
        if (delta & 1) {
            mult *= step_mult;
            plus = plus * step_mult + step_plus;
        }
        step_plus = (step_mult + 1) * step_plus;
        step_mult *= step_mult;
    }
    return mult * state + plus;
}

INLINE uint64_t pcg_output(u128 state) {
    uint64_t x = (uint64_t)(state >> 64) ^ (uint64_t)state;
    unsigned r = (unsigned)(state >> 122);
    return (x >> r) | (x << ((64 - r) & 63));
}

INLINE void pcg_keep_draw(u128 *state, u128 inc, int64_t j, uint32_t bound, uint8_t *keep) {
    *state = *state * PCG_MULTIPLIER + inc;
    uint64_t draw = pcg_output(*state);
    keep[2 * j] = (uint32_t)draw < bound;
    keep[2 * j + 1] = (uint32_t)(draw >> 32) < bound;
}

/* keep[2j] = (low 32 bits of draw j < bound), keep[2j + 1] = (its high 32 bits < bound), for draws [lo, hi) of
 * the stream whose state is ``state`` before draw 0 (``keep`` has room for 2 hi entries) */
static void pcg_keep_draws(u128 state, u128 inc, int64_t lo, int64_t hi, uint32_t bound, uint8_t *keep) {
    u128 s[PCG_STREAMS];
    int64_t step = (hi - lo) / PCG_STREAMS, rest = lo + step * PCG_STREAMS;
    for (int k = 0; k < PCG_STREAMS; k++)
        s[k] = pcg_advance(state, inc, (uint64_t)(lo + k * step));
    for (int64_t i = 0; i < step; i++)
        for (int k = 0; k < PCG_STREAMS; k++)
            pcg_keep_draw(&s[k], inc, lo + k * step + i, bound, keep);
    u128 tail = pcg_advance(state, inc, (uint64_t)rest); /* the last (hi - lo) % PCG_STREAMS draws */
    for (int64_t j = rest; j < hi; j++)
        pcg_keep_draw(&tail, inc, j, bound, keep);
}

typedef struct {
    u128 state, inc;
    uint32_t bound;
    uint8_t *keep;
} keep_job;

static void keep_part(void *ctx, int part, int worker, int64_t lo, int64_t hi) {
    (void)part;
    keep_job *j = (keep_job *)ctx;
    pcg_keep_draws(j->state, j->inc, lo, hi, j->bound, j->keep);
}

/* dare_keep(state_high, state_low, inc_high, inc_low, length, bound, keep, threads): see kernels.py; ``keep``
 * has room for an even number of entries (the high half of the last draw) */
static PyObject *dare_keep(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long state_high, state_low, inc_high, inc_low, keep;
    Py_ssize_t length;
    unsigned long bound;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKnkKi", &state_high, &state_low, &inc_high, &inc_low, &length, &bound, &keep,
                          &threads))
        return NULL;
    if (length < 0 || bound > 0xffffffffUL) {
        PyErr_SetString(PyExc_ValueError, "dare_keep: a negative length or a bound of 2^32 or more");
        return NULL;
    }
    keep_job j = {((u128)state_high << 64) | state_low, ((u128)inc_high << 64) | inc_low, (uint32_t)bound,
                  (uint8_t *)keep};
    int64_t bounds[MAX_PARTS + 1];
    Py_BEGIN_ALLOW_THREADS
    run_parts(((int64_t)length + 1) / 2, CHUNK, MIN_PART / 2, threads, keep_part, &j, bounds);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* scan (count_around, capped_sums, or both at once) over threads: each part's counts or sums, added in order */
typedef struct {
    int kind, what;       /* what: 1 counts, 2 sums, 3 both */
    const void *base, *x; /* base NULL: x holds the values; else they are |x - base| */
    float value;          /* the value counted around, and the cap of the sums */
    int64_t below[MAX_PARTS], equal[MAX_PARTS];
    double total[MAX_PARTS], capped[MAX_PARTS];
} scan_job;

static void scan_part(void *ctx, int part, int worker, int64_t lo, int64_t hi) {
    scan_job *j = (scan_job *)ctx;
    int64_t in = KIND_BYTES[j->kind] * lo;
    const void *base = j->base ? (const char *)j->base + in : NULL, *x = (const char *)j->x + in;
    SCAN_KERNELS[j->what - 1][j->kind](base, x, hi - lo, j->value, &j->below[part], &j->equal[part],
                                       &j->total[part], &j->capped[part]);
}

/* scan(kind, base, x, n, value, what, threads) -> (below, equal, total, capped); pointers as integers (base 0:
 * x holds the values); what: 1 counts, 2 sums, 3 both (the others come back 0) */
static PyObject *scan(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long base, x;
    Py_ssize_t n;
    int threads;
    scan_job j = {0};
    if (!PyArg_ParseTuple(args, "iKKnfii", &j.kind, &base, &x, &n, &j.value, &j.what, &threads) ||
        check_kind(j.kind))
        return NULL;
    if (n < 0 || j.what < 1 || j.what > 3) {
        PyErr_SetString(PyExc_ValueError, "scan: a negative size or an unknown request");
        return NULL;
    }
    j.base = (const void *)base;
    j.x = (const void *)x;
    int parts;
    int64_t bounds[MAX_PARTS + 1], below = 0, equal = 0;
    double total = 0.0, capped = 0.0;
    Py_BEGIN_ALLOW_THREADS
    parts = run_parts((int64_t)n, CHUNK, MIN_PART, threads, scan_part, &j, bounds);
    for (int k = 0; k < parts; k++) {
        below += j.below[k];
        equal += j.equal[k];
        total += j.total[k];
        capped += j.capped[k];
    }
    Py_END_ALLOW_THREADS
    if (!(j.what & 1))
        below = equal = 0;
    if (!(j.what & 2))
        total = capped = 0.0;
    return Py_BuildValue("LLdd", (long long)below, (long long)equal, total, capped);
}

/* The histogram kernels over threads: each thread but the calling one counts into its own row of the caller's spare
 * counts, kept across calls and added to the counts by the caller once (the counts are the same whatever the
 * split): no copy is made, zeroed and added up per call. */
typedef struct {
    int kind, order, num_tasks;
    const void *base, *tasks[MAX_TASKS];
    const int64_t *starts;
    int64_t width, coarse_cells, window_cells; /* cells 0: that count is off */
    int64_t *counts, *fine, *spare;            /* spare row k - 1: part k's coarse cells, then its window cells */
    double l1[MAX_PARTS][MAX_TASKS], below[MAX_PARTS][MAX_TASKS];
} histogram_job;

static void histogram_part(void *ctx, int part, int worker, int64_t lo, int64_t hi) {
    histogram_job *j = (histogram_job *)ctx;
    int64_t in = KIND_BYTES[j->kind], *counts = j->counts, *fine = j->fine;
    if (worker > 0) {
        counts = j->spare + (worker - 1) * (j->coarse_cells + j->window_cells);
        fine = counts + j->coarse_cells;
    }
    const void *tasks[MAX_TASKS];
    for (int t = 0; t < j->num_tasks; t++)
        tasks[t] = (const char *)j->tasks[t] + lo * in;
    const void *base = j->base ? (const char *)j->base + lo * in : NULL;
    int which = (j->coarse_cells > 0) + 2 * (j->window_cells > 0) - 1;
    magnitude_counts_fn fn = (j->order ? ORDER_COUNTS_KERNELS : MAGNITUDE_COUNTS_KERNELS)[which][j->kind];
    fn(base, tasks, j->num_tasks, hi - lo, counts, j->l1[part], j->starts, j->width, fine, j->below[part]);
}

/* magnitude_counts(kind, base, tasks, n, counts, l1, starts, width, fine, below, spare, spares, order): the coarse
 * count where counts is not 0, the window's where starts is not 0 (magnitude_counts_of), in up to spares + 1
 * parts; pointers as integers, base 0 for rows of values; order: order keys (of float32 rows, or of |tau_t|) */
static PyObject *magnitude_counts(PyObject *self, PyObject *args) {
    (void)self;
    int kind, spares, order;
    unsigned long long base, counts, l1, starts, fine, below, spare;
    long long width;
    PyObject *task_list;
    Py_ssize_t n, num_tasks;
    if (!PyArg_ParseTuple(args, "iKO!nKKKLKKKii", &kind, &base, &PyTuple_Type, &task_list, &n, &counts, &l1, &starts,
                          &width, &fine, &below, &spare, &spares, &order))
        return NULL;
    const void *tasks[MAX_TASKS];
    if (check_inputs("magnitude_counts", kind, task_list, n, MAX_TASKS, tasks, &num_tasks))
        return NULL;
    if ((!counts && !starts) || (starts && (width < 1 || width >= ((int64_t)1 << 32))) || spares < 0 ||
        (spares && !spare) || (order && kind != KIND_F32 && !base)) {
        PyErr_SetString(PyExc_ValueError, "magnitude_counts: no count asked for, a window width out of range, no "
                                          "spare counts, or order keys of rows of other than float32 values");
        return NULL;
    }
    histogram_job *j = PyMem_RawCalloc(1, sizeof(histogram_job));
    if (!j)
        return PyErr_NoMemory();
    j->kind = kind;
    j->order = order;
    j->num_tasks = (int)num_tasks;
    j->base = (const void *)base;
    memcpy(j->tasks, tasks, (size_t)num_tasks * sizeof(void *));
    j->counts = (int64_t *)counts;
    j->starts = (const int64_t *)starts;
    j->width = starts ? width : 0;
    j->fine = (int64_t *)fine;
    j->spare = (int64_t *)spare;
    j->coarse_cells = counts ? (int64_t)num_tasks << 16 : 0;
    j->window_cells = starts ? (int64_t)num_tasks * width : 0;
    Py_BEGIN_ALLOW_THREADS
    int64_t bounds[MAX_PARTS + 1];
    int parts = run_parts((int64_t)n, CHUNK, MIN_PART, spares + 1, histogram_part, j, bounds);
    for (int t = 0; t < num_tasks; t++)
        for (int k = 0; k < parts; k++) {
            if (counts)
                ((double *)l1)[t] += j->l1[k][t];
            if (starts)
                ((double *)below)[t] += j->below[k][t];
        }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(j);
    Py_RETURN_NONE;
}

typedef struct {
    int kind, out_kind, num_tasks;
    const void *base, *tasks[NEURON_MAX_TASKS];
    int64_t width;
    const float *thresholds, *coefficient;
    double *gram;
    const double *z;
    float lambda1, lambda2;
    void *out;
    double l1[MAX_PARTS][NEURON_MAX_TASKS], l2sq[MAX_PARTS][NEURON_MAX_TASKS], sums[MAX_PARTS][3];
} neuron_job;

/* the job's inputs (and output) from row ``lo`` on */
static void neuron_rows(const neuron_job *j, int64_t lo, const void **base, const void **tasks, void **out) {
    int64_t in = KIND_BYTES[j->kind] * j->width * lo;
    *base = (const char *)j->base + in;
    for (int t = 0; t < j->num_tasks; t++)
        tasks[t] = (const char *)j->tasks[t] + in;
    if (out)
        *out = (char *)j->out + KIND_BYTES[j->out_kind] * j->width * lo;
}

static void neuron_gram_part(void *ctx, int part, int worker, int64_t lo, int64_t hi) {
    neuron_job *j = (neuron_job *)ctx;
    const void *base, *tasks[NEURON_MAX_TASKS];
    neuron_rows(j, lo, &base, tasks, NULL);
    int q = j->num_tasks + 1;
    NEURON_GRAM_KERNELS[j->kind](base, tasks, j->num_tasks, hi - lo, j->width, j->thresholds, j->gram + lo * q * q,
                                 j->l1[part], j->l2sq[part]);
}

static void neuron_output_part(void *ctx, int part, int worker, int64_t lo, int64_t hi) {
    neuron_job *j = (neuron_job *)ctx;
    const void *base, *tasks[NEURON_MAX_TASKS];
    void *out;
    neuron_rows(j, lo, &base, tasks, &out);
    NEURON_OUTPUT_KERNELS[j->kind][j->out_kind](base, tasks, j->num_tasks, hi - lo, j->width, j->thresholds,
                                                j->z + lo * (j->num_tasks + 1), j->coefficient + lo, j->lambda1,
                                                j->lambda2, out, j->sums[part]);
}

/* The neuron kernels' common arguments: (kind, base, tasks, rows, width, thresholds) into a zeroed job */
static neuron_job *neuron_job_of(int kind, unsigned long long base, PyObject *task_list, Py_ssize_t rows,
                                 Py_ssize_t width, unsigned long long thresholds) {
    const void *tasks[MAX_TASKS];
    Py_ssize_t num_tasks;
    if (check_inputs("neuron kernels", kind, task_list, rows < 0 || width < 0 ? -1 : rows * width, NEURON_MAX_TASKS,
                     tasks, &num_tasks))
        return NULL;
    neuron_job *j = PyMem_RawCalloc(1, sizeof(neuron_job)); /* zeroed: the parts' sums start at 0 */
    if (!j)
        return (neuron_job *)PyErr_NoMemory();
    j->kind = kind;
    j->num_tasks = (int)num_tasks;
    j->base = (const void *)base;
    memcpy(j->tasks, tasks, (size_t)num_tasks * sizeof(void *));
    j->width = (int64_t)width;
    j->thresholds = (const float *)thresholds;
    return j;
}

/* Rows per part: at least MIN_PART entries, as for the flat kernels */
static int64_t least_rows(int64_t width) { return width > 0 && MIN_PART / width > 1 ? MIN_PART / width : 1; }

/* neuron_gram(kind, base, tasks, rows, width, thresholds, gram, l1, l2sq, threads); pointers as integers */
static PyObject *neuron_gram(PyObject *self, PyObject *args) {
    (void)self;
    int kind, threads;
    unsigned long long base, thresholds, gram, l1, l2sq;
    PyObject *task_list;
    Py_ssize_t rows, width;
    if (!PyArg_ParseTuple(args, "iKO!nnKKKKi", &kind, &base, &PyTuple_Type, &task_list, &rows, &width, &thresholds,
                          &gram, &l1, &l2sq, &threads))
        return NULL;
    neuron_job *j = neuron_job_of(kind, base, task_list, rows, width, thresholds);
    if (!j)
        return NULL;
    j->gram = (double *)gram;
    Py_BEGIN_ALLOW_THREADS
    int64_t bounds[MAX_PARTS + 1];
    int parts = run_parts((int64_t)rows, 1, least_rows(j->width), threads, neuron_gram_part, j, bounds);
    for (int t = 0; t < j->num_tasks; t++) {
        ((double *)l1)[t] = ((double *)l2sq)[t] = 0.0;
        for (int k = 0; k < parts; k++) {
            ((double *)l1)[t] += j->l1[k][t];
            ((double *)l2sq)[t] += j->l2sq[k][t];
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(j);
    Py_RETURN_NONE;
}

/* neuron_output(kind, out_kind, base, tasks, rows, width, thresholds, z, coefficient, lambda1, lambda2, out, threads)
 * -> (delta_sq, parallel_sq, orthogonal_sq) */
static PyObject *neuron_output(PyObject *self, PyObject *args) {
    (void)self;
    int kind, out_kind, threads;
    unsigned long long base, thresholds, z, coefficient, out;
    PyObject *task_list;
    Py_ssize_t rows, width;
    float lambda1, lambda2;
    if (!PyArg_ParseTuple(args, "iiKO!nnKKKffKi", &kind, &out_kind, &base, &PyTuple_Type, &task_list, &rows, &width,
                          &thresholds, &z, &coefficient, &lambda1, &lambda2, &out, &threads))
        return NULL;
    if (check_kind(out_kind))
        return NULL;
    neuron_job *j = neuron_job_of(kind, base, task_list, rows, width, thresholds);
    if (!j)
        return NULL;
    j->out_kind = out_kind;
    j->z = (const double *)z;
    j->coefficient = (const float *)coefficient;
    j->lambda1 = lambda1;
    j->lambda2 = lambda2;
    j->out = (void *)out;
    double sums[3] = {0.0, 0.0, 0.0};
    Py_BEGIN_ALLOW_THREADS
    int64_t bounds[MAX_PARTS + 1];
    int parts = run_parts((int64_t)rows, 1, least_rows(j->width), threads, neuron_output_part, j, bounds);
    for (int k = 0; k < parts; k++)
        for (int s = 0; s < 3; s++)
            sums[s] += j->sums[k][s];
    Py_END_ALLOW_THREADS
    PyMem_RawFree(j);
    return Py_BuildValue("ddd", sums[0], sums[1], sums[2]);
}

/* float16_instructions(on): float16 conversions with F16C where the kernels are x86-64-v3 code (on = 1) or in
 * integer operations (on = 0, as elsewhere); returns whether F16C is used now. Not while a kernel runs. */
static PyObject *float16_instructions(PyObject *self, PyObject *args) {
    (void)self;
    int on;
    if (!PyArg_ParseTuple(args, "p", &on))
        return NULL;
    use_f16c = on && X86_64_V3;
    return PyBool_FromLong(use_f16c);
}

static PyMethodDef methods[] = {
    {"task_vectors", task_vectors, METH_VARARGS,
     "task_vectors(kind, base, tasks, n, out, base_out, l1, l2sq, absolute, threads): see kernels.py"},
    {"merge", merge, METH_VARARGS,
     "merge(kind, out_kind, base, tasks, n, weights, thresholds, fn, divisor, majority, scale, conflicts, drops, keep, "
     "out, l1, l2sq, ties, threads): see kernels.py"},
    {"scan", scan, METH_VARARGS,
     "scan(kind, base, x, n, value, what, threads) -> (below, equal, total, capped): see kernels.py"},
    {"float16_instructions", float16_instructions, METH_VARARGS, "float16_instructions(on): see kernels.py"},
    {"magnitude_counts", magnitude_counts, METH_VARARGS,
     "magnitude_counts(kind, base, tasks, n, counts, l1, starts, width, fine, below, spare, spares, order): see "
     "kernels.py"},
    {"neuron_gram", neuron_gram, METH_VARARGS,
     "neuron_gram(kind, base, tasks, rows, width, thresholds, gram, l1, l2sq, threads): see kernels.py"},
    {"neuron_output", neuron_output, METH_VARARGS,
     "neuron_output(kind, out_kind, base, tasks, rows, width, thresholds, z, coefficient, lambda1, lambda2, out, "
     "threads) -> (delta_sq, parallel_sq, orthogonal_sq): see kernels.py"},
    {"dare_keep", dare_keep, METH_VARARGS,
     "dare_keep(state_high, state_low, inc_high, inc_low, length, bound, keep, threads): see kernels.py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU kernels (see kernels.py).", -1,
                                    methods};

static int full_speed(void) {
#if X86_64_V3
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("movbe") &&
           __builtin_cpu_supports("popcnt"); /* x86-64-v3 (gcc 11 does not name ISA levels) */
#elif defined(__x86_64__) || defined(_M_X64)
    return 0; /* kernels not compiled for x86-64-v3: slower than torch */
#else
    return 1;
#endif
}

/* Where the kernels cannot run (or would run slower than torch), the module has FULL_SPEED = 0 and no kernel. */
PyMODINIT_FUNC PyInit__kernels(void) {
    int fast = full_speed();
    if (!fast)
        module.m_methods = NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "FULL_SPEED", fast) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
