/* Integer GEMMs with 8-bit activations: int8 weights (uint8 x int8) and ternary weights.
 *
 * int8 (Jacob et al. 2018): dot = sum_k (a_k - a_zp) w_k, a uint8, w int8 (weight zero point 0).
 *   The activation is shifted by its zero point once, while it is widened to int16 (a - a_zp lies
 *   in [-255, 255]), so no sum-of-weights correction is needed. Products are formed with vpmaddwd
 *   on int16 pairs: |(a - a_zp) w| <= 255 * 128 = 32640, a pair sum <= 65280 fits int32 exactly,
 *   and the caller bounds K so the full sum fits int32. (vpmaddubsw on the raw bytes would be
 *   faster but is not exact: its int16 pair sum saturates, e.g. 255*127 + 255*127 > 32767.)
 *   Packed path: each row block widens its rows of A into work memory; W is interleaved 16
 *   columns by 2 k (int16); the inner loop broadcasts an int16 pair of one row and multiplies it
 *   with 8 columns per vector, so each int32 lane is one output. Register block 6 rows x 16
 *   columns (12 accumulators). Exact u8 x s8 products cost two operations (vpmaddwd, vpaddd) per
 *   16 on AVX2, which has no VNNI dot-product instruction: that is the ceiling of this path.
 *   Direct path (few rows): A widened once, W rows read as they are (vpmovsxbw), along K.
 *
 * ternary with int8 activations: dot = sum_k a_k t_k, a int8, t int8 in {-1, 0, 1}.
 *   Packed path: vpmaddubsw(a + 128 as uint8, t): every pair sum lies in [-510, 510], exact in
 *   int16, so int16 accumulators take 64 steps (64 * 510 = 32640) before vpmaddwd widens them;
 *   dot = that sum - 128 sum_k t_k (column sums taken while W is packed). Interleave 16 columns by
 *   4 k bytes, register block 6 rows x 16 columns.
 *   Direct path (few rows): vpmaddubsw(|a|, sign(t, a)) = a t exactly (|a| <= 128 as uint8, the
 *   signed factor in {-1, 0, 1}); pair sums <= 256, int16 accumulators flushed every 127 steps.
 */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "lowbit_kernels.h"
#include "transpose.h"

#define DIRECT_MAX_M 4 /* fewer rows than this: direct path */
#define BLOCK_M 48     /* scalar path: rows per parallel block */
#define MR 6           /* register block rows */
#define MIN_MACS_PER_THREAD (1 << 19) /* smaller problems use fewer threads */

typedef struct {
    const void *a, *w; /* raw A [M, K] (uint8 or int8) and W [N, K] (int8) */
    int64_t K, N;
    int32_t azp;
    int16_t *ap;    /* int8 direct path: widened A rows */
    int64_t lda;    /* packed A row length in elements */
    void *wp;       /* packed W (all columns; NULL when each block packs its own columns) */
    int32_t *tsum;  /* ternary packed: sum_k t_k per column */
    int64_t mb;     /* packed paths: rows per block */
} i8ctx;

static int64_t chunk_cols(int64_t N) {
    int64_t nc = (N + 63) / 64 * 64;
    return nc < 256 ? nc : 256;
}

static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* Packed-path blocking: row blocks of up to ~1 MiB of packed A (48 to 192 rows). When one block
 * holds every row, each block packs its own 64 columns of W into its work memory (each W column
 * is then packed once, and used while it is in cache); otherwise W is packed once up front and
 * shared by all row blocks. */
static void plan_blocks(i8ctx *c, int64_t M, int64_t *nc, int64_t N, int64_t a_row_bytes) {
    int64_t mb = (1 << 20) / (a_row_bytes > 0 ? a_row_bytes : 1) / MR * MR;
    mb = mb < 48 ? 48 : (mb > 192 ? 192 : mb);
    if (M <= mb) {
        mb = (M + MR - 1) / MR * MR;
        *nc = 64;
    } else {
        *nc = chunk_cols(N);
    }
    c->mb = mb;
}

static int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* ---------------------------------------------------------------- scalar path */

static void i8_block_scalar(const void *vctx, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                            int32_t *tile, int64_t ldt, void *work) {
    (void)work;
    const i8ctx *c = vctx;
    for (int64_t m = m0; m < m1; m++) {
        const uint8_t *ar = (const uint8_t *)c->a + m * c->K;
        for (int64_t n = n0; n < n1; n++) {
            const int8_t *wr = (const int8_t *)c->w + n * c->K;
            int32_t s = 0;
            for (int64_t k = 0; k < c->K; k++) s += ((int32_t)ar[k] - c->azp) * (int32_t)wr[k];
            tile[(m - m0) * ldt + (n - n0)] = s;
        }
    }
}

static void t8_block_scalar(const void *vctx, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                            int32_t *tile, int64_t ldt, void *work) {
    (void)work;
    const i8ctx *c = vctx;
    for (int64_t m = m0; m < m1; m++) {
        const int8_t *ar = (const int8_t *)c->a + m * c->K;
        for (int64_t n = n0; n < n1; n++) {
            const int8_t *tr = (const int8_t *)c->w + n * c->K;
            int32_t s = 0;
            for (int64_t k = 0; k < c->K; k++) s += (int32_t)ar[k] * (int32_t)tr[k];
            tile[(m - m0) * ldt + (n - n0)] = s;
        }
    }
}

/* ---------------------------------------------------------------- AVX2 helpers */

static AVX2_TARGET ALWAYS_INLINE int32_t hsum32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* Rows [m0, m1) of A shifted by the zero point and widened: dst[m][k] = a[m][k] - azp, zero for
 * K <= k < lda. */
static void widen_rows(const i8ctx *c, int64_t m0, int64_t m1, int16_t *dst) {
    const int64_t K = c->K;
    const int16_t zp = (int16_t)c->azp;
    for (int64_t m = m0; m < m1; m++) {
        const uint8_t *ar = (const uint8_t *)c->a + m * K;
        int16_t *o = dst + (m - m0) * c->lda;
        for (int64_t k = 0; k < K; k++) o[k] = (int16_t)((int16_t)ar[k] - zp);
        for (int64_t k = K; k < c->lda; k++) o[k] = 0;
    }
}

/* ---------------------------------------------------------------- int8 direct (AVX2) */

static AVX2_TARGET void i8_block_direct_avx2(const void *vctx, int64_t m0, int64_t m1, int64_t n0,
                                             int64_t n1, int32_t *tile, int64_t ldt, void *work) {
    (void)work;
    const i8ctx *c = vctx;
    const int64_t K = c->K, K16 = K / 16 * 16;
    for (int64_t n = n0; n < n1; n += 4) {
        const int8_t *wr[4];
        for (int j = 0; j < 4; j++) wr[j] = (const int8_t *)c->w + (n + j < n1 ? n + j : n1 - 1) * K;
        for (int64_t m = m0; m < m1; m++) {
            const int16_t *ar = c->ap + m * c->lda;
            __m256i acc[4];
            for (int j = 0; j < 4; j++) acc[j] = _mm256_setzero_si256();
            for (int64_t k = 0; k < K16; k += 16) {
                __m256i av = _mm256_loadu_si256((const __m256i *)(ar + k));
                for (int j = 0; j < 4; j++) {
                    __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wr[j] + k)));
                    acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(av, wv));
                }
            }
            for (int j = 0; j < 4 && n + j < n1; j++) {
                int32_t s = hsum32(acc[j]);
                for (int64_t k = K16; k < K; k++) s += (int32_t)ar[k] * (int32_t)wr[j][k];
                tile[(m - m0) * ldt + (n + j - n0)] = s;
            }
        }
    }
}

/* ---------------------------------------------------------------- int8 packed (AVX2) */

/* W group g (16 columns) as [Kp/2][16 columns][2 k] int16 into dst, zero outside [N] x [K]:
 * 16 x 16 byte blocks are transposed as 8 x 8 blocks of k pairs (words), then widened. */
static AVX2_TARGET void i8_pack_group(const i8ctx *c, int64_t N, int64_t g, int16_t *dst) {
    const int64_t K = c->K, Kp = c->lda;
    for (int64_t k0 = 0; k0 < Kp; k0 += 16) {
        __m128i x[16];
        load_block16((const uint8_t *)c->w, K, N, K, g * 16, k0, x);
        transpose8x8_epi16(x);
        transpose8x8_epi16(x + 8);
        for (int64_t kk = 0; kk < 8 && k0 + 2 * kk < Kp; kk++) {
            int16_t *o = dst + (k0 / 2 + kk) * 32;
            _mm256_store_si256((__m256i *)o, _mm256_cvtepi8_epi16(x[kk]));
            _mm256_store_si256((__m256i *)(o + 16), _mm256_cvtepi8_epi16(x[8 + kk]));
        }
    }
}

static void i8_pack_w(i8ctx *c, int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < (N + 15) / 16; g++)
        i8_pack_group(c, N, g, (int16_t *)c->wp + g * c->lda * 16);
}

static AVX2_TARGET ALWAYS_INLINE void i8_micro(const int16_t *ap, int64_t lda, const int16_t *wg,
                                               int64_t Kp, const int R, int32_t out[MR][16]) {
    __m256i acc[MR][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t kk = 0; kk < Kp / 2; kk++) {
        __m256i w0 = _mm256_load_si256((const __m256i *)(wg + kk * 32));
        __m256i w1 = _mm256_load_si256((const __m256i *)(wg + kk * 32 + 16));
        for (int r = 0; r < R; r++) {
            __m256i av = _mm256_set1_epi32(load_i32(ap + r * lda + 2 * kk));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, w0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, w1));
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_si256((__m256i *)out[r], acc[r][0]);
        _mm256_storeu_si256((__m256i *)(out[r] + 8), acc[r][1]);
    }
}

static AVX2_TARGET void i8_block_packed_avx2(const void *vctx, int64_t m0, int64_t m1, int64_t n0,
                                             int64_t n1, int32_t *tile, int64_t ldt, void *work) {
    const i8ctx *c = vctx;
    const int64_t Kp = c->lda;
    int16_t *apk = work;
    int16_t *wloc = (int16_t *)((char *)work + round_up(c->mb * Kp * 2, 64));
    widen_rows(c, m0, m1, apk);
    for (int64_t g = n0 / 16; g * 16 < n1; g++) {
        const int16_t *wg = (const int16_t *)c->wp + g * Kp * 16;
        if (!c->wp) {
            wg = wloc;
            i8_pack_group(c, c->N, g, wloc);
        }
        for (int64_t m = m0; m < m1; m += MR) {
            const int R = m1 - m < MR ? (int)(m1 - m) : MR;
            const int16_t *ap = apk + (m - m0) * c->lda;
            int32_t out[MR][16];
            switch (R) {
            case 1: i8_micro(ap, c->lda, wg, Kp, 1, out); break;
            case 2: i8_micro(ap, c->lda, wg, Kp, 2, out); break;
            case 3: i8_micro(ap, c->lda, wg, Kp, 3, out); break;
            case 4: i8_micro(ap, c->lda, wg, Kp, 4, out); break;
            case 5: i8_micro(ap, c->lda, wg, Kp, 5, out); break;
            default: i8_micro(ap, c->lda, wg, Kp, 6, out); break;
            }
            for (int r = 0; r < R; r++)
                for (int i = 0; i < 16 && g * 16 + i < n1; i++)
                    tile[(m - m0 + r) * ldt + (g * 16 + i - n0)] = out[r][i];
        }
    }
}

int lowbit_int8gemm(const uint8_t *a, int32_t a_zp, const int8_t *w, int64_t M, int64_t N,
                    int64_t K, const epilogue *e, int nthreads) {
    i8ctx c = {a, w, K, N, a_zp, NULL, 0, NULL, NULL, 0};
    const int threads = lowbit_threads_for(nthreads, M, N, K, MIN_MACS_PER_THREAD);
    if (!lowbit_use_avx2)
        return lowbit_run_blocks(&c, i8_block_scalar, e, M, N, BLOCK_M, chunk_cols(N), 0,
                                 threads);
    int rc = -1;
    if (M < DIRECT_MAX_M) { /* few rows: widen them once */
        c.lda = round_up(K, 16);
        c.ap = lowbit_alloc((size_t)(M * c.lda) * sizeof(int16_t));
        if (c.ap) {
            widen_rows(&c, 0, M, c.ap);
            rc = lowbit_run_blocks(&c, i8_block_direct_avx2, e, M, N, DIRECT_MAX_M, 64, 0,
                                   threads);
        }
    } else {
        int64_t nc;
        c.lda = round_up(K, 2);
        plan_blocks(&c, M, &nc, N, c.lda * 2);
        const int local = nc == 64 && M <= c.mb;
        if (!local) c.wp = lowbit_alloc((size_t)(round_up(N, 16) * c.lda) * sizeof(int16_t));
        if (local || c.wp) {
            if (!local) i8_pack_w(&c, N, threads);
            rc = lowbit_run_blocks(&c, i8_block_packed_avx2, e, M, N, c.mb, nc,
                                   (size_t)(round_up(c.mb * c.lda * 2, 64) + 16 * c.lda * 2),
                                   threads);
        }
    }
    lowbit_release(c.ap);
    lowbit_release(c.wp);
    return rc;
}

/* ---------------------------------------------------------------- ternary x int8 direct (AVX2) */

static AVX2_TARGET void t8_block_direct_avx2(const void *vctx, int64_t m0, int64_t m1, int64_t n0,
                                             int64_t n1, int32_t *tile, int64_t ldt, void *work) {
    (void)work;
    const i8ctx *c = vctx;
    const int64_t K = c->K, K32 = K / 32 * 32;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t n = n0; n < n1; n += 4) {
        const int8_t *tr[4];
        for (int j = 0; j < 4; j++) tr[j] = (const int8_t *)c->w + (n + j < n1 ? n + j : n1 - 1) * K;
        for (int64_t m = m0; m < m1; m++) {
            const int8_t *ar = (const int8_t *)c->a + m * K;
            __m256i acc[4], acc16[4];
            for (int j = 0; j < 4; j++) acc[j] = acc16[j] = _mm256_setzero_si256();
            for (int64_t k = 0, steps = 0; k < K32; k += 32) {
                __m256i av = _mm256_loadu_si256((const __m256i *)(ar + k));
                __m256i mag = _mm256_abs_epi8(av);
                for (int j = 0; j < 4; j++) {
                    __m256i tv = _mm256_loadu_si256((const __m256i *)(tr[j] + k));
                    __m256i p = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(tv, av));
                    acc16[j] = _mm256_add_epi16(acc16[j], p);
                }
                if (++steps == 127 || k + 32 == K32) {
                    for (int j = 0; j < 4; j++) {
                        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(acc16[j], ones));
                        acc16[j] = _mm256_setzero_si256();
                    }
                    steps = 0;
                }
            }
            for (int j = 0; j < 4 && n + j < n1; j++) {
                int32_t s = hsum32(acc[j]);
                for (int64_t k = K32; k < K; k++) s += (int32_t)ar[k] * (int32_t)tr[j][k];
                tile[(m - m0) * ldt + (n + j - n0)] = s;
            }
        }
    }
}

/* ---------------------------------------------------------------- ternary x int8 packed (AVX2) */

/* Rows [m0, m1) of A as uint8 a + 128, zero for K <= k < lda (the packed weights are 0 there). */
static void t8_pack_rows(const i8ctx *c, int64_t m0, int64_t m1, uint8_t *dst) {
    const int64_t K = c->K;
    for (int64_t m = m0; m < m1; m++) {
        const uint8_t *ar = (const uint8_t *)c->a + m * K;
        uint8_t *o = dst + (m - m0) * c->lda;
        for (int64_t k = 0; k < K; k++) o[k] = ar[k] ^ 0x80;
        for (int64_t k = K; k < c->lda; k++) o[k] = 0;
    }
}

/* W group g (16 columns) as [Kp/4][16 columns][4 k] int8 into dst, zero outside [N] x [K]
 * (16 x 16 byte blocks transposed as 4 x 4 blocks of k quads, i.e. dwords); column sums of t. */
static void t8_pack_group(const i8ctx *c, int64_t N, int64_t g, int8_t *dst) {
    const int64_t K = c->K, Kp = c->lda;
    const int8_t *t = (const int8_t *)c->w;
    for (int64_t k0 = 0; k0 < Kp; k0 += 16) {
        __m128i x[16];
        load_block16((const uint8_t *)t, K, N, K, g * 16, k0, x);
        for (int b = 0; b < 4; b++) {
            transpose4x4_epi32(&x[4 * b], &x[4 * b + 1], &x[4 * b + 2], &x[4 * b + 3]);
            for (int64_t q = 0; q < 4 && k0 + 4 * q < Kp; q++)
                _mm_storeu_si128((__m128i *)(dst + ((k0 / 4 + q) * 16 + 4 * b) * 4), x[4 * b + q]);
        }
    }
    for (int64_t n = g * 16; n < N && n < g * 16 + 16; n++) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) s += t[n * K + k];
        c->tsum[n] = s;
    }
}

static void t8_pack_w(i8ctx *c, int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < (N + 15) / 16; g++)
        t8_pack_group(c, N, g, (int8_t *)c->wp + g * c->lda * 16);
}

static AVX2_TARGET ALWAYS_INLINE void t8_micro(const uint8_t *ap, int64_t lda, const int8_t *wg,
                                               int64_t Kp, const int R, int32_t out[MR][16]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MR][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t q0 = 0; q0 < Kp / 4; q0 += 64) {
        const int64_t q1 = q0 + 64 < Kp / 4 ? q0 + 64 : Kp / 4;
        __m256i a16[MR][2];
        for (int r = 0; r < R; r++) a16[r][0] = a16[r][1] = _mm256_setzero_si256();
        for (int64_t q = q0; q < q1; q++) {
            __m256i w0 = _mm256_load_si256((const __m256i *)(wg + q * 64));
            __m256i w1 = _mm256_load_si256((const __m256i *)(wg + q * 64 + 32));
            for (int r = 0; r < R; r++) {
                __m256i av = _mm256_set1_epi32(load_i32(ap + r * lda + 4 * q));
                a16[r][0] = _mm256_add_epi16(a16[r][0], _mm256_maddubs_epi16(av, w0));
                a16[r][1] = _mm256_add_epi16(a16[r][1], _mm256_maddubs_epi16(av, w1));
            }
        }
        for (int r = 0; r < R; r++)
            for (int h = 0; h < 2; h++)
                acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(a16[r][h], ones));
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_si256((__m256i *)out[r], acc[r][0]);
        _mm256_storeu_si256((__m256i *)(out[r] + 8), acc[r][1]);
    }
}

static AVX2_TARGET void t8_block_packed_avx2(const void *vctx, int64_t m0, int64_t m1, int64_t n0,
                                             int64_t n1, int32_t *tile, int64_t ldt, void *work) {
    const i8ctx *c = vctx;
    const int64_t Kp = c->lda;
    uint8_t *apk = work;
    int8_t *wloc = (int8_t *)work + round_up(c->mb * Kp, 64);
    t8_pack_rows(c, m0, m1, apk);
    for (int64_t g = n0 / 16; g * 16 < n1; g++) {
        const int8_t *wg = (const int8_t *)c->wp + g * Kp * 16;
        if (!c->wp) {
            wg = wloc;
            t8_pack_group(c, c->N, g, wloc);
        }
        for (int64_t m = m0; m < m1; m += MR) {
            const int R = m1 - m < MR ? (int)(m1 - m) : MR;
            const uint8_t *ap = apk + (m - m0) * c->lda;
            int32_t out[MR][16];
            switch (R) {
            case 1: t8_micro(ap, c->lda, wg, Kp, 1, out); break;
            case 2: t8_micro(ap, c->lda, wg, Kp, 2, out); break;
            case 3: t8_micro(ap, c->lda, wg, Kp, 3, out); break;
            case 4: t8_micro(ap, c->lda, wg, Kp, 4, out); break;
            case 5: t8_micro(ap, c->lda, wg, Kp, 5, out); break;
            default: t8_micro(ap, c->lda, wg, Kp, 6, out); break;
            }
            for (int r = 0; r < R; r++)
                for (int i = 0; i < 16 && g * 16 + i < n1; i++) {
                    int64_t n = g * 16 + i;
                    /* modulo 2^32: the sum of (a + 128) t may wrap for huge K, the result does not */
                    tile[(m - m0 + r) * ldt + (n - n0)] =
                        (int32_t)((uint32_t)out[r][i] - 128u * (uint32_t)c->tsum[n]);
                }
        }
    }
}

int lowbit_ternary_int8gemm(const int8_t *a, const int8_t *t, int64_t M, int64_t N, int64_t K,
                            const epilogue *e, int nthreads) {
    i8ctx c = {a, t, K, N, 0, NULL, 0, NULL, NULL, 0};
    const int threads = lowbit_threads_for(nthreads, M, N, K, MIN_MACS_PER_THREAD);
    if (!lowbit_use_avx2)
        return lowbit_run_blocks(&c, t8_block_scalar, e, M, N, BLOCK_M, chunk_cols(N), 0,
                                 threads);
    if (M < DIRECT_MAX_M)
        return lowbit_run_blocks(&c, t8_block_direct_avx2, e, M, N, DIRECT_MAX_M, 64, 0, threads);
    int64_t nc;
    c.lda = round_up(K, 4);
    plan_blocks(&c, M, &nc, N, c.lda);
    const int local = nc == 64 && M <= c.mb;
    if (!local) c.wp = lowbit_alloc((size_t)(round_up(N, 16) * c.lda));
    c.tsum = lowbit_alloc((size_t)N * sizeof(int32_t));
    int rc = -1;
    if ((local || c.wp) && c.tsum) {
        if (!local) t8_pack_w(&c, N, threads);
        rc = lowbit_run_blocks(&c, t8_block_packed_avx2, e, M, N, c.mb, nc,
                               (size_t)(round_up(c.mb * c.lda, 64) + 16 * c.lda), threads);
    }
    lowbit_release(c.wp);
    lowbit_release(c.tsum);
    return rc;
}
