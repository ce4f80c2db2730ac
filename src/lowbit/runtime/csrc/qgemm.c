/* The fused engine's uint8 x int8 GEMM on one row block, per ISA, and its weight layouts.
 *
 * raw[r][n] = sum_k a[r][k] w[n][k] with a uint8 (codes plus an offset) and w int8; the engine's
 * output stage removes the zero point (a constant per column, folded into the bias). K is
 * padded to Kp = round_up(K, 4) with zero weights. Every path is exact: no instruction here
 * saturates.
 *
 *   scalar      W as [N][Kp] int8, plain loops.
 *   AVX2        W as [N/16][Kp/2][16][2] int16; the row block widened to int16 in work memory;
 *               vpmaddwd on int16 pairs (|a w| <= 255 * 128, a pair sum fits int32), register
 *               block 6 rows x 16 columns. (vpmaddubsw would saturate on full-range codes.)
 *   AVX-512     W as [N/16][Kp/4][16][4] int8; vpdpbusd (uint8 x int8, four products summed
 *   VNNI        into each int32 lane, no saturation), register block 6 rows x 32 columns
 *               (16 when a 32-column group does not exist).
 */
#include <immintrin.h>
#include <string.h>

#include "engine.h"
#include "lowbit_kernels.h"

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define MR 6

static int64_t rup(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

static ALWAYS_INLINE int32_t ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

int lowbit_engine_cpu_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return ENG_ISA_AVX512VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ENG_ISA_AVX2;
    return ENG_ISA_SCALAR;
}

int64_t lowbit_engine_kpad(int isa, int64_t K) {
    (void)isa;
    return rup(K, 4);
}

int64_t lowbit_engine_packed_bytes(int isa, int64_t N, int64_t K) {
    const int64_t Kp = lowbit_engine_kpad(isa, K);
    switch (isa) {
    case ENG_ISA_AVX2: return rup(N, 16) * Kp * 2;
    case ENG_ISA_AVX512VNNI: return rup(N, 16) * Kp;
    default: return N * Kp;
    }
}

int64_t lowbit_engine_conv_scratch(int isa, int64_t N, int64_t K) {
    const int64_t Kp = lowbit_engine_kpad(isa, K);
    int64_t bytes = rup(ENG_MB * Kp, 64) + rup(ENG_MB * rup(N, 16) * 4, 64);
    if (isa == ENG_ISA_AVX2) bytes += rup(ENG_MB * Kp * 2, 64);
    return bytes;
}

void lowbit_engine_pack(int isa, const int8_t *w, int64_t N, int64_t K, void *dst) {
    const int64_t Kp = lowbit_engine_kpad(isa, K);
    memset(dst, 0, (size_t)lowbit_engine_packed_bytes(isa, N, K));
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            const int8_t v = w[n * K + k];
            const int64_t g = n / 16, i = n % 16;
            switch (isa) {
            case ENG_ISA_AVX2:
                ((int16_t *)dst)[((g * (Kp / 2) + k / 2) * 16 + i) * 2 + k % 2] = v;
                break;
            case ENG_ISA_AVX512VNNI:
                ((int8_t *)dst)[((g * (Kp / 4) + k / 4) * 16 + i) * 4 + k % 4] = v;
                break;
            default: ((int8_t *)dst)[n * Kp + k] = v;
            }
        }
}

/* ---------------------------------------------------------------- scalar */

static void gemm_scalar(const uint8_t *a, int64_t rows, int64_t Kp, const int8_t *w, int64_t N,
                        int32_t *tile) {
    const int64_t ldt = rup(N, 16);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *ar = a + r * Kp;
            const int8_t *wr = w + n * Kp;
            int32_t s = 0;
            for (int64_t k = 0; k < Kp; k++) s += (int32_t)ar[k] * (int32_t)wr[k];
            tile[r * ldt + n] = s;
        }
}

/* ---------------------------------------------------------------- AVX2 */

static AVX2_TARGET ALWAYS_INLINE void avx2_micro(const int16_t *a, int64_t Kp, const int16_t *wg,
                                                 const int R, int32_t *tile, int64_t ldt) {
    __m256i acc[MR][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t kk = 0; kk < Kp / 2; kk++) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wg + kk * 32));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wg + kk * 32 + 16));
        for (int r = 0; r < R; r++) {
            const __m256i av = _mm256_set1_epi32(ld32(a + r * Kp + 2 * kk));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, w0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, w1));
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_si256((__m256i *)(tile + r * ldt), acc[r][0]);
        _mm256_storeu_si256((__m256i *)(tile + r * ldt + 8), acc[r][1]);
    }
}

static AVX2_TARGET void gemm_avx2(const uint8_t *a, int64_t rows, int64_t Kp, const int16_t *w,
                                  int64_t N, int32_t *tile, int16_t *a16) {
    const int64_t ldt = rup(N, 16);
    for (int64_t i = 0; i < rows * Kp; i += 16) /* Kp is a multiple of 4; rows * Kp of 16 */
        if (i + 16 <= rows * Kp)
            _mm256_storeu_si256((__m256i *)(a16 + i),
                                _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(a + i))));
        else
            for (int64_t j = i; j < rows * Kp; j++) a16[j] = a[j];
    for (int64_t g = 0; g < ldt / 16; g++) {
        const int16_t *wg = w + g * Kp * 16;
        for (int64_t r = 0; r < rows; r += MR) {
            const int R = rows - r < MR ? (int)(rows - r) : MR;
            const int16_t *ar = a16 + r * Kp;
            int32_t *t = tile + r * ldt + g * 16;
            switch (R) {
            case 1: avx2_micro(ar, Kp, wg, 1, t, ldt); break;
            case 2: avx2_micro(ar, Kp, wg, 2, t, ldt); break;
            case 3: avx2_micro(ar, Kp, wg, 3, t, ldt); break;
            case 4: avx2_micro(ar, Kp, wg, 4, t, ldt); break;
            case 5: avx2_micro(ar, Kp, wg, 5, t, ldt); break;
            default: avx2_micro(ar, Kp, wg, 6, t, ldt); break;
            }
        }
    }
}

/* ---------------------------------------------------------------- AVX-512 VNNI */

static VNNI_TARGET ALWAYS_INLINE void vnni_micro(const uint8_t *a, int64_t Kp, const int8_t *wg,
                                                 const int R, const int NV, int32_t *tile,
                                                 int64_t ldt) {
    __m512i acc[MR][2];
    const int8_t *wg1 = wg + Kp * 16;
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    for (int64_t q = 0; q < Kp / 4; q++) {
        const __m512i w0 = _mm512_loadu_si512((const void *)(wg + q * 64));
        const __m512i w1 = NV > 1 ? _mm512_loadu_si512((const void *)(wg1 + q * 64)) : w0;
        for (int r = 0; r < R; r++) {
            const __m512i av = _mm512_set1_epi32(ld32(a + r * Kp + 4 * q));
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, w0);
            if (NV > 1) acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, w1);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_si512((void *)(tile + r * ldt), acc[r][0]);
        if (NV > 1) _mm512_storeu_si512((void *)(tile + r * ldt + 16), acc[r][1]);
    }
}

#define VNNI_CASES(NV)                                                                            \
    switch (R) {                                                                                  \
    case 1: vnni_micro(ar, Kp, wg, 1, NV, t, ldt); break;                                         \
    case 2: vnni_micro(ar, Kp, wg, 2, NV, t, ldt); break;                                         \
    case 3: vnni_micro(ar, Kp, wg, 3, NV, t, ldt); break;                                         \
    case 4: vnni_micro(ar, Kp, wg, 4, NV, t, ldt); break;                                         \
    case 5: vnni_micro(ar, Kp, wg, 5, NV, t, ldt); break;                                         \
    default: vnni_micro(ar, Kp, wg, 6, NV, t, ldt); break;                                        \
    }

static VNNI_TARGET void gemm_vnni(const uint8_t *a, int64_t rows, int64_t Kp, const int8_t *w,
                                  int64_t N, int32_t *tile) {
    const int64_t ldt = rup(N, 16), groups = ldt / 16;
    for (int64_t g = 0; g < groups; g += 2) {
        const int8_t *wg = w + g * Kp * 16;
        const int pair = g + 1 < groups;
        for (int64_t r = 0; r < rows; r += MR) {
            const int R = rows - r < MR ? (int)(rows - r) : MR;
            const uint8_t *ar = a + r * Kp;
            int32_t *t = tile + r * ldt + g * 16;
            if (pair) {
                VNNI_CASES(2)
            } else {
                VNNI_CASES(1)
            }
        }
    }
}

void lowbit_engine_gemm_block(int isa, const uint8_t *a, int64_t rows, int64_t Kp,
                              const void *wpacked, int64_t N, int32_t *tile, void *work) {
    switch (isa) {
    case ENG_ISA_AVX512VNNI: gemm_vnni(a, rows, Kp, wpacked, N, tile); break;
    case ENG_ISA_AVX2: gemm_avx2(a, rows, Kp, wpacked, N, tile, work); break;
    default: gemm_scalar(a, rows, Kp, wpacked, N, tile);
    }
}
