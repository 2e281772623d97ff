/* The one-pass linear merge (see fused.py, which compiles this file with the machine's C compiler and loads it
 * with ctypes). For each element: load every input's stored value (bfloat16, float16 or float32), convert to
 * float32, sum the weighted terms in registers, divide when normalizing, fold |value| into the overflow check,
 * round to the output dtype and store. Only plain C: no Python headers, no libraries.
 *
 * Two builds of the sum, because the bits must be torch's: `linear_fma` adds each term after the first as one
 * fused multiply-add (what torch's vectorised CPU addcmul_ does on FMA hardware), `linear_mul_add` as a product
 * then a sum (compiled with -ffp-contract=off, so the compiler cannot fuse them). fused.py keeps whichever agrees
 * with torch on probe values. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define SUB 2048 /* float32 partial sums kept in the L1 cache */

enum { BF16 = 0, F16 = 1, F32 = 2 };

static inline float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

#ifdef __FLT16_MAX__
#define HAVE_F16 1
static inline float f16_load(const void *p, int64_t i) { _Float16 h; memcpy(&h, (const char *)p + 2 * i, 2); return (float)h; }
static inline void f16_store(void *p, int64_t i, float v) { _Float16 h = (_Float16)v; memcpy((char *)p + 2 * i, &h, 2); }
#else
#define HAVE_F16 0
static inline float f16_load(const void *p, int64_t i) { (void)p; (void)i; return NAN; }
static inline void f16_store(void *p, int64_t i, float v) { (void)p; (void)i; (void)v; }
#endif

int lorafold_has_f16(void) { return HAVE_F16; }

static inline float bf16_load(const void *p, int64_t i) {
    uint16_t h; memcpy(&h, (const char *)p + 2 * i, 2); return from_bits((uint32_t)h << 16);
}
static inline float f32_load(const void *p, int64_t i) { float f; memcpy(&f, (const char *)p + 4 * i, 4); return f; }

/* Round to nearest even, as c10::BFloat16 does (a NaN may come out as another NaN: the caller's check fails it). */
static inline void bf16_store(void *p, int64_t i, float v) {
    uint32_t u = to_bits(v);
    uint16_t h = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    memcpy((char *)p + 2 * i, &h, 2);
}
static inline void f32_store(void *p, int64_t i, float v) { memcpy((char *)p + 4 * i, &v, 4); }

/* m stored values from element s of p, as float32. */
static inline void load_block(const void *p, int kind, int64_t s, int64_t m, float *dst) {
    if (kind == BF16) for (int64_t j = 0; j < m; j++) dst[j] = bf16_load(p, s + j);
    else if (kind == F16) for (int64_t j = 0; j < m; j++) dst[j] = f16_load(p, s + j);
    else for (int64_t j = 0; j < m; j++) dst[j] = f32_load(p, s + j);
}

/* The end of every kernel's block: fold the largest |value| (as bits: a NaN above every number) into `top`, then round
 * the m float32 results to the output dtype and store them at element s. */
static inline uint32_t store_block(const float *acc, int64_t m, void *out, int out_kind, int64_t s, uint32_t top) {
    for (int64_t j = 0; j < m; j++) {
        uint32_t u = to_bits(acc[j]) & 0x7FFFFFFFu;
        top = u > top ? u : top;
    }
    if (out_kind == BF16) for (int64_t j = 0; j < m; j++) bf16_store(out, s + j, acc[j]);
    else if (out_kind == F16) for (int64_t j = 0; j < m; j++) f16_store(out, s + j, acc[j]);
    else for (int64_t j = 0; j < m; j++) f32_store(out, s + j, acc[j]);
    return top;
}

#define LOAD_LOOP(LOAD, EXPR)                                 \
    for (int64_t j = 0; j < m; j++) {                         \
        float x = LOAD(a, s + j);                             \
        acc[j] = EXPR;                                        \
    }

#define BODY(NAME, TERM)                                                                                          \
    uint32_t NAME(const void *const *inputs, int64_t k, int kind, const float *weights, float divisor,            \
                  void *out, int out_kind, int64_t n) {                                                           \
        float acc[SUB];                                                                                           \
        uint32_t top = 0;                                                                                         \
        for (int64_t s = 0; s < n; s += SUB) {                                                                    \
            int64_t m = n - s < SUB ? n - s : SUB;                                                                \
            for (int64_t i = 0; i < k; i++) {                                                                     \
                const void *a = inputs[i];                                                                        \
                float w = weights[i];                                                                             \
                if (i == 0) {                                                                                     \
                    if (kind == BF16) LOAD_LOOP(bf16_load, x * w)                                                 \
                    else if (kind == F16) LOAD_LOOP(f16_load, x * w)                                              \
                    else LOAD_LOOP(f32_load, x * w)                                                               \
                } else {                                                                                          \
                    if (kind == BF16) LOAD_LOOP(bf16_load, TERM)                                                  \
                    else if (kind == F16) LOAD_LOOP(f16_load, TERM)                                               \
                    else LOAD_LOOP(f32_load, TERM)                                                                \
                }                                                                                                 \
            }                                                                                                     \
            if (divisor != 1.0f)                                                                                  \
                for (int64_t j = 0; j < m; j++) acc[j] = acc[j] / divisor;                                        \
            top = store_block(acc, m, out, out_kind, s, top);                                                     \
        }                                                                                                         \
        return top;                                                                                               \
    }

/* The first term is x·w in both (torch: 0 + x·w rounds once, as x·w does). The weights and divisor are float32. */
BODY(linear_fma, fmaf(x, w, acc[j]))
BODY(linear_mul_add, acc[j] + x * w)

/* Task arithmetic at density 1 (task_arithmetic, dare_linear): base + λ·(Σ w_i·(x_i − base)) [/ divisor].
 * inputs[0] is the base, inputs[1..k) the models, weights[i-1] theirs. Each delta is rounded, then scaled
 * (methods.task_arithmetic's `x - base`, `*= w`), the deltas summed in order (from +0 when `zero_start`, as a
 * reduction may start), divided, scaled by λ and added to the base: every step one float32 rounding, in the
 * order of the eager ops. fused.py keeps the variant that equals them on this machine. */
uint32_t task_arithmetic(const void *const *inputs, int64_t k, int kind, const float *weights, float divisor,
                         float lam, int zero_start, void *out, int out_kind, int64_t n) {
    float acc[SUB], b[SUB];
    uint32_t top = 0;
    for (int64_t s = 0; s < n; s += SUB) {
        int64_t m = n - s < SUB ? n - s : SUB;
        load_block(inputs[0], kind, s, m, b);
        for (int64_t i = 1; i < k; i++) {
            const void *a = inputs[i];
            float w = weights[i - 1];
            int first = i == 1 && !zero_start;
#define TA_LOOP(LOAD)                                                      \
            for (int64_t j = 0; j < m; j++) {                              \
                float d = (LOAD(a, s + j) - b[j]) * w;                     \
                acc[j] = first ? d : (i == 1 ? 0.0f + d : acc[j] + d);     \
            }
            if (kind == BF16) TA_LOOP(bf16_load)
            else if (kind == F16) TA_LOOP(f16_load)
            else TA_LOOP(f32_load)
#undef TA_LOOP
        }
        if (k == 1) for (int64_t j = 0; j < m; j++) acc[j] = 0.0f;
        if (divisor != 1.0f) for (int64_t j = 0; j < m; j++) acc[j] = acc[j] / divisor;
        if (lam != 1.0f) for (int64_t j = 0; j < m; j++) acc[j] = acc[j] * lam;
        for (int64_t j = 0; j < m; j++) acc[j] = acc[j] + b[j];
        top = store_block(acc, m, out, out_kind, s, top);
    }
    return top;
}

/* TIES' sign election at density 1 (ties, dare_ties): base + λ·(Σ_i δ_i·a_i) [/ Σ_i w_i·a_i], δ_i = (x_i − base)·w_i,
 * where a_i is 1 when sign(δ_i) equals the sign of Σ_i δ_i (+1 for a sum ≥ 0) and 0 otherwise, and a divisor of 0
 * becomes 1. The steps of methods.task_arithmetic under consensus, in its order and its float32 roundings: δ·a is
 * a product (so a NaN δ stays NaN), each of the three sums over the models is taken in order (from +0 when
 * `zero_start`, as torch's reduction over the models' dimension starts). Room for TIES_MAXK models; fused.py asks
 * for at most MAX_MODELS (above, torch sums some columns in another order) and keeps the variant that equals torch. */
#define TIES_SUB 1024
#define TIES_MAXK 15

/* sign(x) == majority (±1) as a float 0/1, branch-free so that the loops vectorise: a zero or NaN x agrees with
 * neither sign, as torch.sign(x) (0 or NaN) equals neither 1 nor -1. */
static inline float ties_agree(float x, float majority) {
    return (float)(((x > 0.0f) & (majority > 0.0f)) | ((x < 0.0f) & (majority < 0.0f)));
}

uint32_t ties(const void *const *inputs, int64_t k, int kind, const float *weights, int normalize,
              float lam, int zero_start, void *out, int out_kind, int64_t n) {
    float b[TIES_SUB], d[TIES_MAXK][TIES_SUB], sum[TIES_SUB], mixed[TIES_SUB], divisor[TIES_SUB];
    uint32_t top = 0;
    int64_t models = k - 1;
    if (models < 1 || models > TIES_MAXK) return 0xFFFFFFFFu; /* never asked (fused.py checks): a NaN's bits */
    for (int64_t s = 0; s < n; s += TIES_SUB) {
        int64_t m = n - s < TIES_SUB ? n - s : TIES_SUB;
        load_block(inputs[0], kind, s, m, b);
        for (int64_t i = 0; i < models; i++) {
            const void *a = inputs[i + 1];
            float w = weights[i], *di = d[i];
            if (kind == BF16) for (int64_t j = 0; j < m; j++) di[j] = (bf16_load(a, s + j) - b[j]) * w;
            else if (kind == F16) for (int64_t j = 0; j < m; j++) di[j] = (f16_load(a, s + j) - b[j]) * w;
            else for (int64_t j = 0; j < m; j++) di[j] = (f32_load(a, s + j) - b[j]) * w;
        }
        /* the election: Σ δ_i, its sign */
        if (zero_start) for (int64_t j = 0; j < m; j++) sum[j] = 0.0f + d[0][j];
        else for (int64_t j = 0; j < m; j++) sum[j] = d[0][j];
        for (int64_t i = 1; i < models; i++) for (int64_t j = 0; j < m; j++) sum[j] = sum[j] + d[i][j];
        for (int64_t j = 0; j < m; j++) sum[j] = sum[j] >= 0.0f ? 1.0f : -1.0f;
        /* Σ δ_i·a_i and Σ w_i·a_i */
        float w0 = weights[0];
        for (int64_t j = 0; j < m; j++) {
            float a = ties_agree(d[0][j], sum[j]);
            float t = d[0][j] * a, u = a * w0;
            mixed[j] = zero_start ? 0.0f + t : t;
            divisor[j] = zero_start ? 0.0f + u : u;
        }
        for (int64_t i = 1; i < models; i++) {
            float wi = weights[i], *di = d[i];
            for (int64_t j = 0; j < m; j++) {
                float a = ties_agree(di[j], sum[j]);
                mixed[j] = mixed[j] + di[j] * a;
                divisor[j] = divisor[j] + a * wi;
            }
        }
        if (normalize)
            for (int64_t j = 0; j < m; j++) mixed[j] = mixed[j] / (divisor[j] + (divisor[j] == 0.0f ? 1.0f : 0.0f));
        if (lam != 1.0f) for (int64_t j = 0; j < m; j++) mixed[j] = mixed[j] * lam;
        for (int64_t j = 0; j < m; j++) mixed[j] = mixed[j] + b[j];
        top = store_block(mixed, m, out, out_kind, s, top);
    }
    return top;
}
