/* The fused engine's interpreter: runs a program of steps (see engine.h) in one call.
 *
 * Element-wise loops are plain integer C compiled for several ISAs (target_clones: the CPU's
 * best clone runs; integer results do not depend on the clone). The GEMM's ISA is the one the
 * plan packed the weights for (field F_R0 of a CONV step), chosen at load.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine.h"
#include "lowbit_kernels.h"

#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define PTR(v) ((void *)(intptr_t)(v))

static int64_t rup(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- element-wise blocks */

/* Element-wise steps run over blocks of EW values widened to int64: load, rescale, store are
 * separate branch-free loops the compiler vectorises. */
#define EW 512

static ALWAYS_INLINE void load_blk(const void *p, int64_t t, int64_t i0, int64_t n, int64_t *v) {
    if (t) {
        const int32_t *q = (const int32_t *)p + i0;
        for (int64_t j = 0; j < n; j++) v[j] = q[j];
    } else {
        const uint8_t *q = (const uint8_t *)p + i0;
        for (int64_t j = 0; j < n; j++) v[j] = q[j];
    }
}

static ALWAYS_INLINE void store_blk(void *p, int64_t t, int64_t i0, int64_t n, const int64_t *v) {
    if (t) {
        int32_t *q = (int32_t *)p + i0;
        for (int64_t j = 0; j < n; j++) q[j] = (int32_t)v[j];
    } else {
        uint8_t *q = (uint8_t *)p + i0;
        for (int64_t j = 0; j < n; j++) q[j] = (uint8_t)v[j];
    }
}

static inline int64_t ld(const void *p, int64_t t, int64_t i) {
    return t ? (int64_t)((const int32_t *)p)[i] : (int64_t)((const uint8_t *)p)[i];
}

static inline void st(void *p, int64_t t, int64_t i, int64_t v) {
    if (t)
        ((int32_t *)p)[i] = (int32_t)v;
    else
        ((uint8_t *)p)[i] = (uint8_t)v;
}

static inline int64_t clamp_i32(int64_t x) {
    return x < INT32_MIN ? INT32_MIN : (x > INT32_MAX ? INT32_MAX : x);
}

/* Codes moved from one grid to another (lowbit.runtime.integer.rescale), in place: r[0] source
 * zero point, r[1] mode, r[2] pow2 shift or m0 (>= 0), r[3] left shift, r[4] right shift (both
 * for the multiplier), r[5] destination zero point, r[6], r[7] clamp bounds. The centred code
 * saturates to int32 before a pow2 shift or a multiplier (which round as gemmlowp does); mode
 * RS_NONE only moves the zero point and clamps (ReLU, clamp, identity). */
static ALWAYS_INLINE void rescale_blk(int64_t *v, int64_t n, const int64_t *r) {
    const int64_t z0 = r[0], z1 = r[5], lo = r[6], hi = r[7];
    if (r[1] == RS_POW2) {
        const int64_t e = r[2], mask = (int64_t)(((uint64_t)1 << e) - 1), half = mask >> 1;
        for (int64_t j = 0; j < n; j++) {
            const int64_t c = clamp_i32(v[j] - z0);
            const int64_t y = (c >> e) + ((c & mask) > half + (c < 0));
            v[j] = clamp64(y + z1, lo, hi);
        }
    } else if (r[1] == RS_MULT) {
        const int32_t m0 = (int32_t)r[2]; /* in [0, 2^31) */
        const int64_t ls = r[3], e = r[4];
        const int64_t mask = (int64_t)(((uint64_t)1 << e) - 1), half = mask >> 1;
        for (int64_t j = 0; j < n; j++) {
            const int32_t c = (int32_t)clamp_i32(clamp_i32(v[j] - z0) * ((int64_t)1 << ls));
            const int32_t x = (int32_t)(((int64_t)c * m0 + ((int64_t)1 << 30)) >> 31);
            const int64_t y = (x >> e) + ((x & mask) > half + (x < 0));
            v[j] = clamp64(y + z1, lo, hi);
        }
    } else {
        for (int64_t j = 0; j < n; j++) v[j] = clamp64(v[j] - z0 + z1, lo, hi);
    }
}

/* ---------------------------------------------------------------- CONV */

#define AVX512_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq")))

/* The exact stage (see conv_output) on 8 channels at a time: 32x32->64-bit vpmuldq, variable
 * 64-bit shifts, 64-bit clamps; codes written as uint8 or int32. */
static AVX512_TARGET void exact_row_avx512(const int64_t *s, const int32_t *t, void *out) {
    const int64_t N = s[F_OC];
    const int32_t *c = PTR(s[F_P1]), *m0 = PTR(s[F_P2]), *rsh = PTR(s[F_P4]);
    const int64_t *bq = PTR(s[F_P3]);
    const __m512i lo = _mm512_set1_epi64(s[F_X4]), hi = _mm512_set1_epi64(s[F_X5]);
    const __m512i zp = _mm512_set1_epi64(s[F_X6]), one = _mm512_set1_epi64(1);
    for (int64_t n = 0; n < N; n += 8) {
        const __mmask8 k = N - n >= 8 ? 0xFF : (__mmask8)((1u << (N - n)) - 1);
        const __m256i acc = _mm256_add_epi32(_mm256_maskz_loadu_epi32(k, t + n),
                                             _mm256_maskz_loadu_epi32(k, c + n));
        const __m512i a = _mm512_cvtepi32_epi64(acc);
        const __m512i m = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(k, m0 + n));
        const __m512i e = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(k, rsh + n));
        const __m512i v = _mm512_add_epi64(_mm512_mul_epi32(a, m), _mm512_maskz_loadu_epi64(k, bq + n));
        const __m512i hm1 = _mm512_sub_epi64(_mm512_sllv_epi64(one, _mm512_sub_epi64(e, one)), one);
        const __m512i odd = _mm512_and_si512(_mm512_srav_epi64(v, e), one);
        __m512i o = _mm512_srav_epi64(_mm512_add_epi64(_mm512_add_epi64(v, hm1), odd), e);
        o = _mm512_add_epi64(_mm512_min_epi64(_mm512_max_epi64(o, lo), hi), zp);
        if (s[F_TO])
            _mm256_mask_storeu_epi32((int32_t *)out + n, k, _mm512_cvtepi64_epi32(o));
        else
            _mm_mask_storeu_epi8((uint8_t *)out + n, k, _mm512_cvtepi64_epi8(o));
    }
}

/* The same on 4 channels at a time with AVX2 (64-bit arithmetic shifts and clamps emulated);
 * returns the first channel left for the scalar loop. */
static AVX2_TARGET int64_t exact_row_avx2(const int64_t *s, const int32_t *t, void *out) {
    const int64_t N = s[F_OC];
    const int32_t *c = PTR(s[F_P1]), *m0 = PTR(s[F_P2]), *rsh = PTR(s[F_P4]);
    const int64_t *bq = PTR(s[F_P3]);
    const __m256i lo = _mm256_set1_epi64x(s[F_X4]), hi = _mm256_set1_epi64x(s[F_X5]);
    const __m256i zp = _mm256_set1_epi64x(s[F_X6]), one = _mm256_set1_epi64x(1);
    const __m256i zero = _mm256_setzero_si256(), low = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) {
        const __m128i acc = _mm_add_epi32(_mm_loadu_si128((const __m128i *)(t + n)),
                                          _mm_loadu_si128((const __m128i *)(c + n)));
        const __m256i m = _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)(m0 + n)));
        const __m256i e = _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)(rsh + n)));
        const __m256i v = _mm256_add_epi64(_mm256_mul_epi32(_mm256_cvtepi32_epi64(acc), m),
                                           _mm256_loadu_si256((const __m256i *)(bq + n)));
        const __m256i hm1 = _mm256_sub_epi64(_mm256_sllv_epi64(one, _mm256_sub_epi64(e, one)), one);
        __m256i sign = _mm256_cmpgt_epi64(zero, v);
        const __m256i q = _mm256_xor_si256(_mm256_srlv_epi64(_mm256_xor_si256(v, sign), e), sign);
        const __m256i w = _mm256_add_epi64(_mm256_add_epi64(v, hm1), _mm256_and_si256(q, one));
        sign = _mm256_cmpgt_epi64(zero, w);
        __m256i o = _mm256_xor_si256(_mm256_srlv_epi64(_mm256_xor_si256(w, sign), e), sign);
        o = _mm256_blendv_epi8(o, lo, _mm256_cmpgt_epi64(lo, o));
        o = _mm256_blendv_epi8(o, hi, _mm256_cmpgt_epi64(o, hi));
        const __m128i d = _mm256_castsi256_si128(
            _mm256_permutevar8x32_epi32(_mm256_add_epi64(o, zp), low));
        if (s[F_TO]) {
            _mm_storeu_si128((__m128i *)((int32_t *)out + n), d);
        } else {
            const int32_t b = _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packus_epi32(d, d), d));
            memcpy((uint8_t *)out + n, &b, 4);
        }
    }
    return n;
}

/* Output stage of rows x N accumulators (tile, row stride ldt) into out (row stride N). */
CLONES static void conv_output(const int64_t *s, const int32_t *tile, int64_t ldt, int64_t rows,
                               void *out) {
    const int64_t N = s[F_OC], L = s[F_X2];
    const int32_t *c = PTR(s[F_P1]), *m0 = PTR(s[F_P2]), *lsh = PTR(s[F_P3]),
                  *rsh = PTR(s[F_P4]); /* CONV_EXACT: P3 is the int64 bias */
    const int32_t lo = (int32_t)s[F_X4], hi = (int32_t)s[F_X5], zp = (int32_t)s[F_X6];
    const int64_t esize = s[F_TO] ? 4 : 1;
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *t = tile + r * ldt;
        void *orow = (char *)out + r * N * esize;
        if (s[F_X7] == CONV_ACC) {
            int32_t *o = (int32_t *)out + r * N;
            for (int64_t n = 0; n < N; n++) o[n] = (int32_t)((uint32_t)t[n] + (uint32_t)c[n]);
            continue;
        }
        if (s[F_X7] == CONV_EXACT && s[F_R0] == ENG_ISA_AVX512VNNI) {
            exact_row_avx512(s, t, orow);
            continue;
        }
        int32_t y[N];
        int64_t n0 = 0;
        if (s[F_X7] == CONV_EXACT && s[F_R0] == ENG_ISA_AVX2) n0 = exact_row_avx2(s, t, orow);
        if (s[F_X7] == CONV_EXACT) {
            const int64_t *bq = PTR(s[F_P3]);
            for (int64_t n = n0; n < N; n++) {
                const int32_t acc = (int32_t)((uint32_t)t[n] + (uint32_t)c[n]);
                const int64_t v = (int64_t)acc * m0[n] + bq[n], e = rsh[n];
                /* (v + half - 1 + odd(floor(v / 2^e))) >> e rounds half to even */
                int64_t o = (v + (((int64_t)1 << (e - 1)) - 1) + ((v >> e) & 1)) >> e;
                o = o < lo ? lo : (o > hi ? hi : o);
                y[n] = (int32_t)o + zp;
            }
        } else {
            for (int64_t n = 0; n < N; n++) {
                /* gemmlowp: exact while |(raw - zp colsum) 2^L + bias| < 2^31 (checked by the plan) */
                const int32_t v = (int32_t)(((uint32_t)t[n] << L) + (uint32_t)c[n]);
                int64_t w = (int64_t)v << lsh[n];
                w = w < INT32_MIN ? INT32_MIN : (w > INT32_MAX ? INT32_MAX : w);
                const int32_t x = (int32_t)(uint32_t)((uint64_t)(w * m0[n] + (1LL << 30)) >> 31);
                const int32_t e = rsh[n], mask = (int32_t)((1u << e) - 1u);
                int32_t q = (x >> e) + ((x & mask) > ((mask >> 1) + (x < 0)));
                q = q < lo ? lo : (q > hi ? hi : q);
                y[n] = q + zp;
            }
        }
        if (s[F_TO]) {
            memcpy((int32_t *)orow + n0, y + n0, (size_t)(N - n0) * sizeof(int32_t));
        } else {
            for (int64_t n = n0; n < N; n++) ((uint8_t *)orow)[n] = (uint8_t)y[n];
        }
    }
}

/* n bytes from s to d in 16-byte pieces (the runs here are a few channels long: a libc call
 * per run would cost more than the copy). */
static inline void copy_run(uint8_t *d, const uint8_t *s, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm_storeu_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
    for (; i < n; i++) d[i] = s[i];
}

/* im2col rows [m0, m0 + rows) of a NHWC uint8 input into a (row stride Kp, zero past K). */
static void gather(const int64_t *s, int64_t m0, int64_t rows, uint8_t *a) {
    const uint8_t *in = PTR(s[F_IN0]);
    const int64_t H = s[F_H], W = s[F_W], C = s[F_C], OH = s[F_OH], OW = s[F_OW];
    const int64_t KH = s[F_KH], KW = s[F_KW], K = s[F_X0], Kp = s[F_X1];
    const int pad = (int)s[F_X3];
    for (int64_t r = 0; r < rows; r++) {
        const int64_t m = m0 + r, b = m / (OH * OW), oy = m / OW % OH, ox = m % OW;
        uint8_t *d = a + r * Kp;
        const int64_t ix0 = ox * s[F_SW] - s[F_PW];
        for (int64_t ky = 0; ky < KH; ky++) {
            const int64_t iy = oy * s[F_SH] - s[F_PH] + ky;
            if (iy >= 0 && iy < H && ix0 >= 0 && ix0 + KW <= W) { /* one run of KW pixels */
                copy_run(d, in + ((b * H + iy) * W + ix0) * C, KW * C);
                d += KW * C;
                continue;
            }
            for (int64_t kx = 0; kx < KW; kx++, d += C) {
                const int64_t ix = ix0 + kx;
                if (iy < 0 || iy >= H || ix < 0 || ix >= W)
                    memset(d, pad, (size_t)C);
                else
                    copy_run(d, in + ((b * H + iy) * W + ix) * C, C);
            }
        }
        memset(d, 0, (size_t)(Kp - K));
    }
}

static void step_conv(const int64_t *s) {
    const int64_t M = s[F_B] * s[F_OH] * s[F_OW], N = s[F_OC], Kp = s[F_X1];
    const int64_t ldt = rup(N, 16), blocks = (M + ENG_MB - 1) / ENG_MB;
    const int isa = (int)s[F_R0], direct = (int)s[F_R1];
    const size_t esize = s[F_TO] ? 4 : 1;
    char *scratch = PTR(s[F_SCRATCH]);
#pragma omp parallel for num_threads((int)s[F_THREADS]) schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        char *mine = scratch + (int64_t)thread_id() * s[F_SCRATCH_BYTES];
        uint8_t *a = (uint8_t *)mine;
        int32_t *tile = (int32_t *)(mine + rup(ENG_MB * Kp, 64));
        void *work = (char *)tile + rup(ENG_MB * ldt * 4, 64);
        const int64_t m0 = blk * ENG_MB, rows = M - m0 < ENG_MB ? M - m0 : ENG_MB;
        const uint8_t *rowsp = a;
        if (direct)
            rowsp = (const uint8_t *)PTR(s[F_IN0]) + m0 * Kp;
        else
            gather(s, m0, rows, a);
        lowbit_engine_gemm_block(isa, rowsp, rows, Kp, PTR(s[F_P0]), N, tile, work);
        conv_output(s, tile, ldt, rows, (char *)PTR(s[F_OUT]) + m0 * N * esize);
    }
}

/* ---------------------------------------------------------------- element-wise */

static int64_t elements(const int64_t *s) { return s[F_B] * s[F_H] * s[F_W] * s[F_C]; }

CLONES static void step_rescale(const int64_t *s) {
    const int64_t n = elements(s);
#pragma omp parallel for num_threads((int)s[F_THREADS]) schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += EW) {
        int64_t v[EW];
        const int64_t m = n - i0 < EW ? n - i0 : EW;
        load_blk(PTR(s[F_IN0]), s[F_T0], i0, m, v);
        rescale_blk(v, m, s + F_R0);
        store_blk(PTR(s[F_OUT]), s[F_TO], i0, m, v);
    }
}

/* out = rescale_R(clip(rescale_Q(a) + rescale_U(b) - Z, lo, hi)): both operands brought to the
 * common grid (zero point Z), added, clipped to it, and moved to the output grid; out2, when
 * set, = rescale_V(out) (the copy on another grid a later step reads). */
CLONES static void step_add(const int64_t *s) {
    const int64_t n = elements(s), z = s[F_X0], lo = s[F_X1], hi = s[F_X2];
#pragma omp parallel for num_threads((int)s[F_THREADS]) schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += EW) {
        int64_t a[EW], b[EW];
        const int64_t m = n - i0 < EW ? n - i0 : EW;
        load_blk(PTR(s[F_IN0]), s[F_T0], i0, m, a);
        rescale_blk(a, m, s + F_Q0);
        load_blk(PTR(s[F_IN1]), s[F_T1], i0, m, b);
        rescale_blk(b, m, s + F_U0);
        for (int64_t j = 0; j < m; j++) a[j] = clamp64(a[j] + b[j] - z, lo, hi);
        rescale_blk(a, m, s + F_R0);
        store_blk(PTR(s[F_OUT]), s[F_TO], i0, m, a);
        if (s[F_OUT2]) {
            rescale_blk(a, m, s + F_V0);
            store_blk(PTR(s[F_OUT2]), s[F_T2], i0, m, a);
        }
    }
}

static void step_quant(const int64_t *s) {
    const float *x = PTR(s[F_IN0]);
    void *out = PTR(s[F_OUT]);
    const int64_t B = s[F_B], H = s[F_H], W = s[F_W], C = s[F_C], to = s[F_TO];
    float inv;
    const int32_t bits = (int32_t)s[F_X0];
    memcpy(&inv, &bits, sizeof inv);
    const float lo = (float)s[F_X1], hi = (float)s[F_X2];
    const int64_t zp = s[F_X3];
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t p = 0; p < H * W; p++) {
                float q = nearbyintf(x[(b * C + c) * H * W + p] * inv);
                q = q < lo ? lo : (q > hi ? hi : q);
                st(out, to, (b * H * W + p) * C + c, (int64_t)q + zp);
            }
}

static void step_dequant(const int64_t *s) {
    const int32_t *acc = PTR(s[F_IN0]);
    float *out = PTR(s[F_OUT]);
    const double *scale = PTR(s[F_P0]), *bias = PTR(s[F_P1]);
    const int64_t rows = s[F_B] * s[F_H] * s[F_W], N = s[F_C];
    for (int64_t m = 0; m < rows; m++)
        for (int64_t n = 0; n < N; n++) {
            double v = (double)acc[m * N + n] * scale[n];
            v = v + bias[n];
            out[m * N + n] = (float)v;
        }
}

/* ---------------------------------------------------------------- pooling and layout */

/* q = Z + round_half_even(sum / count) of an exact integer sum. */
static inline int64_t div_half_even(int64_t num, int64_t den) {
    int64_t q = num / den, r = num % den;
    if (r < 0) {
        q -= 1;
        r += den;
    }
    return q + (2 * r > den || (2 * r == den && (q & 1)));
}

CLONES static void step_pool(const int64_t *s, int avg) {
    const void *in = PTR(s[F_IN0]);
    void *out = PTR(s[F_OUT]);
    const int64_t B = s[F_B], H = s[F_H], W = s[F_W], C = s[F_C], OH = s[F_OH], OW = s[F_OW];
    const int64_t t = s[F_T0], to = s[F_TO];
#pragma omp parallel for num_threads((int)s[F_THREADS]) schedule(static)
    for (int64_t m = 0; m < B * OH * OW; m++) {
        const int64_t b = m / (OH * OW), oy = m / OW % OH, ox = m % OW;
        const int64_t y0 = oy * s[F_SH] - s[F_PH], x0 = ox * s[F_SW] - s[F_PW];
        for (int64_t c = 0; c < C; c++) {
            int64_t acc = avg ? 0 : INT64_MIN, inside = 0;
            for (int64_t y = y0; y < y0 + s[F_KH]; y++)
                for (int64_t x = x0; x < x0 + s[F_KW]; x++) {
                    if (y < 0 || y >= H || x < 0 || x >= W) continue;
                    const int64_t v = ld(in, t, ((b * H + y) * W + x) * C + c);
                    inside++;
                    if (avg)
                        acc += v - s[F_X0];
                    else
                        acc = v > acc ? v : acc;
                }
            int64_t q = acc;
            if (avg) {
                const int64_t count = s[F_X1] ? s[F_KH] * s[F_KW] : inside;
                q = clamp64(div_half_even(acc, count) + s[F_X2], s[F_X3], s[F_X4]);
            }
            st(out, to, m * C + c, q);
        }
    }
}

static void step_slice(const int64_t *s) {
    const char *in = PTR(s[F_IN0]);
    char *out = PTR(s[F_OUT]);
    const int64_t H = s[F_H], W = s[F_W], C = s[F_C], OH = s[F_OH], OW = s[F_OW], OC = s[F_OC];
    const int64_t sc = s[F_X7];
    const size_t e = s[F_T0] ? 4 : 1;
    for (int64_t b = 0; b < s[F_B]; b++)
        for (int64_t y = 0; y < OH; y++)
            for (int64_t x = 0; x < OW; x++) {
                const int64_t iy = s[F_X1] + y * s[F_X5], ix = s[F_X2] + x * s[F_X6];
                const int64_t src = ((b * H + iy) * W + ix) * C + s[F_X3];
                const int64_t dst = ((b * OH + y) * OW + x) * OC;
                if (sc == 1) {
                    memcpy(out + dst * e, in + src * e, OC * e);
                } else if (e == 4) {
                    for (int64_t c = 0; c < OC; c++)
                        ((int32_t *)out)[dst + c] = ((const int32_t *)in)[src + c * sc];
                } else {
                    for (int64_t c = 0; c < OC; c++)
                        ((uint8_t *)out)[dst + c] = ((const uint8_t *)in)[src + c * sc];
                }
            }
}

static void step_pad(const int64_t *s) {
    const char *in = PTR(s[F_IN0]);
    char *out = PTR(s[F_OUT]);
    const int64_t H = s[F_H], W = s[F_W], C = s[F_C], OH = s[F_OH], OW = s[F_OW], OC = s[F_OC];
    const int64_t t = s[F_T0];
    const size_t e = t ? 4 : 1;
    for (int64_t b = 0; b < s[F_B]; b++)
        for (int64_t y = 0; y < OH; y++)
            for (int64_t x = 0; x < OW; x++) {
                const int64_t iy = y - s[F_X0], ix = x - s[F_X2];
                const int64_t o = ((b * OH + y) * OW + x) * OC;
                for (int64_t c = 0; c < OC; c++) st(out, t, o + c, s[F_X6]);
                if (iy >= 0 && iy < H && ix >= 0 && ix < W)
                    memcpy(out + (o + s[F_X4]) * e, in + ((b * H + iy) * W + ix) * C * e, C * e);
            }
}

static void step_flatten(const int64_t *s) {
    const char *in = PTR(s[F_IN0]);
    char *out = PTR(s[F_OUT]);
    const int64_t H = s[F_H], W = s[F_W], C = s[F_C];
    const size_t e = s[F_T0] ? 4 : 1;
    for (int64_t b = 0; b < s[F_B]; b++)
        for (int64_t p = 0; p < H * W; p++)
            for (int64_t c = 0; c < C; c++)
                memcpy(out + ((b * C + c) * H * W + p) * e, in + ((b * H * W + p) * C + c) * e, e);
}

int lowbit_engine_run(const int64_t *steps, int64_t nsteps) {
    for (int64_t i = 0; i < nsteps; i++) {
        const int64_t *s = steps + i * ENG_FIELDS;
        switch (s[F_OP]) {
        case OP_QUANT: step_quant(s); break;
        case OP_CONV: step_conv(s); break;
        case OP_RESCALE: step_rescale(s); break;
        case OP_ADD: step_add(s); break;
        case OP_MAXPOOL: step_pool(s, 0); break;
        case OP_AVGPOOL: step_pool(s, 1); break;
        case OP_SLICE: step_slice(s); break;
        case OP_PAD: step_pad(s); break;
        case OP_FLATTEN: step_flatten(s); break;
        case OP_DEQUANT: step_dequant(s); break;
        default: return (int)(i + 1);
        }
    }
    return 0;
}
