/* Parallel block driver and the shared output stage (epilogue) of every GEMM. */
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "lowbit_kernels.h"

int lowbit_use_avx2 = 0;

int lowbit_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int lowbit_threads_for(int nthreads, int64_t M, int64_t N, int64_t K, int64_t min_macs) {
    int threads = nthreads > 0 ? nthreads : lowbit_max_threads();
    double useful = (double)M * (double)N * (double)(K > 0 ? K : 1) / (double)min_macs;
    if (useful < threads) threads = useful < 1 ? 1 : (int)useful;
    return threads;
}

/* Every block carries its capacity in a 64-byte header in front of the returned pointer. */
#define HEADER 64
#define POOL_SLOTS 8

static struct {
    pthread_mutex_t lock;
    void *blocks[POOL_SLOTS]; /* returned pointers, NULL = empty slot */
} pool = {PTHREAD_MUTEX_INITIALIZER, {NULL}};

static size_t capacity(void *p) { return *(size_t *)((char *)p - HEADER); }

void *lowbit_alloc(size_t bytes) {
    if (bytes == 0) bytes = 64;
    void *best = NULL;
    int slot = -1;
    pthread_mutex_lock(&pool.lock);
    for (int i = 0; i < POOL_SLOTS; i++) /* the smallest pooled block that fits */
        if (pool.blocks[i] && capacity(pool.blocks[i]) >= bytes &&
            (!best || capacity(pool.blocks[i]) < capacity(best))) {
            best = pool.blocks[i];
            slot = i;
        }
    if (best) pool.blocks[slot] = NULL;
    pthread_mutex_unlock(&pool.lock);
    if (best) return best;
    size_t rounded = (bytes + 63) / 64 * 64;
    char *raw = aligned_alloc(64, rounded + HEADER);
    if (!raw) return NULL;
    *(size_t *)raw = rounded;
    return raw + HEADER;
}

void lowbit_release(void *p) {
    if (!p) return;
    pthread_mutex_lock(&pool.lock);
    int slot = -1;
    for (int i = 0; i < POOL_SLOTS && slot < 0; i++)
        if (!pool.blocks[i]) slot = i;
    if (slot < 0) { /* full: replace the smallest block if p is larger */
        slot = 0;
        for (int i = 1; i < POOL_SLOTS; i++)
            if (capacity(pool.blocks[i]) < capacity(pool.blocks[slot])) slot = i;
        if (capacity(pool.blocks[slot]) >= capacity(p)) {
            pthread_mutex_unlock(&pool.lock);
            free((char *)p - HEADER);
            return;
        }
        free((char *)pool.blocks[slot] - HEADER);
    }
    pool.blocks[slot] = p;
    pthread_mutex_unlock(&pool.lock);
}

void lowbit_drop_pool(void) {
    pthread_mutex_lock(&pool.lock);
    for (int i = 0; i < POOL_SLOTS; i++) {
        if (pool.blocks[i]) free((char *)pool.blocks[i] - HEADER);
        pool.blocks[i] = NULL;
    }
    pthread_mutex_unlock(&pool.lock);
}

/* ---------------------------------------------------------------- requantisation (scalar) */

/* gemmlowp SaturatingRoundingDoublingHighMul: round(a b / 2^31), halves up; the only overflow
 * (a = b = INT32_MIN) saturates. (a b + 2^30) >> 31 with a floor shift equals gemmlowp's
 * truncating division of a b + nudge, nudge = 2^30 or 1 - 2^30 by the sign of a b. */
static int32_t srdhm(int32_t a, int32_t b) {
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
    int64_t ab = (int64_t)a * (int64_t)b;
    return (int32_t)((ab + ((int64_t)1 << 30)) >> 31);
}

/* gemmlowp RoundingDivideByPOT: x / 2^e rounded, halves away from zero, e in [0, 31]. */
static int32_t rdbpot(int32_t x, int32_t e) {
    int32_t mask = (int32_t)(((int64_t)1 << e) - 1);
    int32_t rem = x & mask;
    int32_t thr = (mask >> 1) + (x < 0);
    return (x >> e) + (rem > thr);
}

static int32_t shl_saturate(int32_t x, int32_t s) {
    if (x > (INT32_MAX >> s)) return INT32_MAX;
    if (x < (INT32_MIN >> s)) return INT32_MIN;
    return (int32_t)((uint32_t)x << s);
}

int32_t lowbit_requant1(const epilogue *e, int32_t acc, int64_t n) {
    int32_t x = shl_saturate((int32_t)((uint32_t)acc + (uint32_t)e->ibias[n]), e->lshift[n]);
    int32_t q = rdbpot(srdhm(x, e->m0[n]), e->rshift[n]);
    q = q < e->lo ? e->lo : (q > e->hi ? e->hi : q);
    return q + e->zp;
}

/* ---------------------------------------------------------------- epilogue (scalar) */

static void epi_scalar(const epilogue *e, const int32_t *tile, int64_t ldt, int64_t m0,
                       int64_t rows, int64_t n0, int64_t cols) {
    const int64_t N = e->N;
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *d = tile + r * ldt;
        int64_t m = m0 + r;
        switch (e->mode) { /* EPI_INT32 never gets here: the driver writes it directly */
        case EPI_SCALE: {
            float *o = (float *)e->out + m * N + n0;
            for (int64_t c = 0; c < cols; c++) {
                float prod = (float)d[c] * e->scale[n0 + c];
                o[c] = prod + e->fbias[n0 + c];
            }
            break;
        }
        case EPI_REQUANT: {
            uint8_t *o = (uint8_t *)e->out + m * N + n0;
            for (int64_t c = 0; c < cols; c++) o[c] = (uint8_t)lowbit_requant1(e, d[c], n0 + c);
            break;
        }
        case EPI_THRESHOLD: {
            const int64_t ldw = (N + 63) / 64;
            uint64_t *o = (uint64_t *)e->out + m * ldw + n0 / 64;
            for (int64_t c0 = 0; c0 < cols; c0 += 64) {
                uint64_t word = 0;
                int64_t cend = cols - c0 < 64 ? cols - c0 : 64;
                for (int64_t c = 0; c < cend; c++)
                    word |= (uint64_t)(d[c0 + c] >= e->thr[n0 + c0 + c]) << c;
                uint64_t valid = cend == 64 ? ~(uint64_t)0 : (((uint64_t)1 << cend) - 1);
                o[c0 / 64] = (word ^ e->flip[(n0 + c0) / 64]) & valid;
            }
            break;
        }
        }
    }
}

/* ---------------------------------------------------------------- epilogue (AVX2) */

/* Eight lanes of lowbit_requant1 for columns n .. n+7 (same arithmetic, see the scalar code). */
static AVX2_TARGET ALWAYS_INLINE __m256i requant8(const epilogue *e, __m256i acc, int64_t n) {
    const __m256i imax = _mm256_set1_epi32(INT32_MAX), imin = _mm256_set1_epi32(INT32_MIN);
    const __m256i one = _mm256_set1_epi32(1);
    __m256i x = _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i *)(e->ibias + n)));
    /* saturating left shift */
    __m256i ls = _mm256_loadu_si256((const __m256i *)(e->lshift + n));
    __m256i sh = _mm256_sllv_epi32(x, ls);
    sh = _mm256_blendv_epi8(sh, imax, _mm256_cmpgt_epi32(x, _mm256_srav_epi32(imax, ls)));
    sh = _mm256_blendv_epi8(sh, imin, _mm256_cmpgt_epi32(_mm256_srav_epi32(imin, ls), x));
    /* high multiply: (a b + 2^30) >> 31 per lane, even and odd lanes separately */
    __m256i m = _mm256_loadu_si256((const __m256i *)(e->m0 + n));
    const __m256i half = _mm256_set1_epi64x((int64_t)1 << 30);
    __m256i ev = _mm256_mul_epi32(sh, m);
    __m256i od = _mm256_mul_epi32(_mm256_srli_epi64(sh, 32), _mm256_srli_epi64(m, 32));
    ev = _mm256_srli_epi64(_mm256_add_epi64(ev, half), 31); /* low dword is the result */
    od = _mm256_slli_epi64(_mm256_srli_epi64(_mm256_add_epi64(od, half), 31), 32);
    __m256i y = _mm256_blend_epi32(ev, od, 0xAA);
    __m256i ovf = _mm256_and_si256(_mm256_cmpeq_epi32(sh, imin), _mm256_cmpeq_epi32(m, imin));
    y = _mm256_blendv_epi8(y, imax, ovf);
    /* rounding divide by 2^e */
    __m256i ex = _mm256_loadu_si256((const __m256i *)(e->rshift + n));
    __m256i mask = _mm256_sub_epi32(_mm256_sllv_epi32(one, ex), one);
    __m256i rem = _mm256_and_si256(y, mask);
    __m256i thr = _mm256_add_epi32(_mm256_srli_epi32(mask, 1),
                                   _mm256_and_si256(_mm256_srai_epi32(y, 31), one));
    __m256i q = _mm256_sub_epi32(_mm256_srav_epi32(y, ex), _mm256_cmpgt_epi32(rem, thr));
    q = _mm256_min_epi32(_mm256_max_epi32(q, _mm256_set1_epi32(e->lo)), _mm256_set1_epi32(e->hi));
    return _mm256_add_epi32(q, _mm256_set1_epi32(e->zp));
}

static AVX2_TARGET void epi_avx2(const epilogue *e, const int32_t *tile, int64_t ldt, int64_t m0,
                                 int64_t rows, int64_t n0, int64_t cols) {
    const int64_t N = e->N, cols8 = cols / 8 * 8;
    if (cols8 == 0) {
        epi_scalar(e, tile, ldt, m0, rows, n0, cols);
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *d = tile + r * ldt;
        int64_t m = m0 + r;
        if (e->mode == EPI_THRESHOLD) {
            const int64_t ldw = (N + 63) / 64;
            uint64_t *o = (uint64_t *)e->out + m * ldw + n0 / 64;
            for (int64_t c0 = 0; c0 < cols; c0 += 64) {
                int64_t cend = cols - c0 < 64 ? cols - c0 : 64;
                uint64_t word = 0;
                int64_t c = 0;
                for (; c + 8 <= cend; c += 8) {
                    __m256i dv = _mm256_loadu_si256((const __m256i *)(d + c0 + c));
                    __m256i tv = _mm256_loadu_si256((const __m256i *)(e->thr + n0 + c0 + c));
                    unsigned lt = (unsigned)_mm256_movemask_ps(
                        _mm256_castsi256_ps(_mm256_cmpgt_epi32(tv, dv)));
                    word |= (uint64_t)(~lt & 0xFFu) << c;
                }
                for (; c < cend; c++) word |= (uint64_t)(d[c0 + c] >= e->thr[n0 + c0 + c]) << c;
                uint64_t valid = cend == 64 ? ~(uint64_t)0 : (((uint64_t)1 << cend) - 1);
                o[c0 / 64] = (word ^ e->flip[(n0 + c0) / 64]) & valid;
            }
        } else if (e->mode == EPI_SCALE) {
            float *o = (float *)e->out + m * N + n0;
            for (int64_t c = 0; c < cols8; c += 8) {
                __m256 dv = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(d + c)));
                __m256 prod = _mm256_mul_ps(dv, _mm256_loadu_ps(e->scale + n0 + c));
                _mm256_storeu_ps(o + c, _mm256_add_ps(prod, _mm256_loadu_ps(e->fbias + n0 + c)));
            }
        } else { /* EPI_REQUANT */
            uint8_t *o = (uint8_t *)e->out + m * N + n0;
            const __m256i gather = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
            for (int64_t c = 0; c < cols8; c += 8) {
                __m256i q = requant8(e, _mm256_loadu_si256((const __m256i *)(d + c)), n0 + c);
                __m256i w16 = _mm256_packs_epi32(q, q);      /* lane-wise: q0-3 q0-3 | q4-7 .. */
                __m256i b8 = _mm256_packus_epi16(w16, w16);  /* dword 0 = q0-3, dword 4 = q4-7 */
                b8 = _mm256_permutevar8x32_epi32(b8, gather);
                _mm_storel_epi64((__m128i *)(o + c), _mm256_castsi256_si128(b8));
            }
        }
    }
    if (e->mode != EPI_THRESHOLD && cols8 < cols)
        epi_scalar(e, tile + cols8, ldt, m0, rows, n0 + cols8, cols - cols8);
}

/* ---------------------------------------------------------------- driver */

int lowbit_run_blocks(const void *ctx, block_fn fn, const epilogue *e, int64_t M, int64_t N,
                      int64_t mb, int64_t nc, size_t work_bytes, int nthreads) {
    if (M <= 0 || N <= 0) return 0;
    const int64_t n_mb = (M + mb - 1) / mb, n_nc = (N + nc - 1) / nc, total = n_mb * n_nc;
    int threads = nthreads > 0 ? nthreads : lowbit_max_threads();
    if (threads > total) threads = (int)total;
    if (threads < 1) threads = 1;
    const size_t tile_bytes = ((size_t)(mb * nc) * sizeof(int32_t) + 63) & ~(size_t)63;
    const size_t work_rounded = (work_bytes + 63) & ~(size_t)63;
    char *scratch = lowbit_alloc((size_t)threads * (tile_bytes + work_rounded));
    if (!scratch) return -1;
    const int avx2 = lowbit_use_avx2;
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        int32_t *tile = (int32_t *)(scratch + (size_t)t * (tile_bytes + work_rounded));
        void *work = (char *)tile + tile_bytes;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < total; i++) {
            int64_t m0 = (i % n_mb) * mb, n0 = (i / n_mb) * nc;
            int64_t m1 = m0 + mb < M ? m0 + mb : M, n1 = n0 + nc < N ? n0 + nc : N;
            if (e->mode == EPI_INT32) { /* dots go straight to the output */
                fn(ctx, m0, m1, n0, n1, (int32_t *)e->out + m0 * N + n0, N, work);
                continue;
            }
            fn(ctx, m0, m1, n0, n1, tile, nc, work);
            if (avx2)
                epi_avx2(e, tile, nc, m0, m1 - m0, n0, n1 - n0);
            else
                epi_scalar(e, tile, nc, m0, m1 - m0, n0, n1 - n0);
        }
    }
    lowbit_release(scratch);
    return 0;
}
