/* Small SSE2 block transposes used to re-lay weight matrices for the packed GEMM paths. */
#ifndef LOWBIT_TRANSPOSE_H
#define LOWBIT_TRANSPOSE_H

#include <emmintrin.h>
#include <stdint.h>
#include <string.h>

/* Rows [n0, n0+16) x bytes [k0, k0+16) of a byte matrix (row stride `stride`, `nrows` rows of
 * `len` valid bytes) into x[0..15]; bytes outside the matrix read as 0. */
static inline void load_block16(const uint8_t *base, int64_t stride, int64_t nrows, int64_t len,
                                int64_t n0, int64_t k0, __m128i x[16]) {
    for (int i = 0; i < 16; i++) {
        const int64_t n = n0 + i;
        if (n < nrows && k0 + 16 <= len) {
            x[i] = _mm_loadu_si128((const __m128i *)(base + n * stride + k0));
        } else {
            uint8_t tmp[16] = {0};
            if (n < nrows && k0 < len) memcpy(tmp, base + n * stride + k0, (size_t)(len - k0));
            x[i] = _mm_loadu_si128((const __m128i *)tmp);
        }
    }
}

/* In place: [a b c d] rows of 4 dwords -> their columns. */
static inline void transpose4x4_epi32(__m128i *a, __m128i *b, __m128i *c, __m128i *d) {
    __m128i t0 = _mm_unpacklo_epi32(*a, *b), t1 = _mm_unpacklo_epi32(*c, *d);
    __m128i t2 = _mm_unpackhi_epi32(*a, *b), t3 = _mm_unpackhi_epi32(*c, *d);
    *a = _mm_unpacklo_epi64(t0, t1);
    *b = _mm_unpackhi_epi64(t0, t1);
    *c = _mm_unpacklo_epi64(t2, t3);
    *d = _mm_unpackhi_epi64(t2, t3);
}

/* In place: 8 rows of 8 words -> x[k] = word k of rows 0..7. */
static inline void transpose8x8_epi16(__m128i x[8]) {
    __m128i a[8], b[8];
    for (int i = 0; i < 4; i++) {
        a[2 * i] = _mm_unpacklo_epi16(x[2 * i], x[2 * i + 1]);
        a[2 * i + 1] = _mm_unpackhi_epi16(x[2 * i], x[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 2; i++) {
            b[4 * h + 2 * i] = _mm_unpacklo_epi32(a[4 * h + i], a[4 * h + i + 2]);
            b[4 * h + 2 * i + 1] = _mm_unpackhi_epi32(a[4 * h + i], a[4 * h + i + 2]);
        }
    for (int i = 0; i < 4; i++) {
        x[2 * i] = _mm_unpacklo_epi64(b[i], b[i + 4]);
        x[2 * i + 1] = _mm_unpackhi_epi64(b[i], b[i + 4]);
    }
}

/* In place: 16 rows of 16 bytes -> x[k] = byte k of rows 0..15. Interleaving row pairs turns
 * the bytes into an 8 x 8 matrix of words (row pair, byte) for bytes 0-7 and for 8-15. */
static inline void transpose16x16_epi8(__m128i x[16]) {
    __m128i lo[8], hi[8];
    for (int i = 0; i < 8; i++) {
        lo[i] = _mm_unpacklo_epi8(x[2 * i], x[2 * i + 1]);
        hi[i] = _mm_unpackhi_epi8(x[2 * i], x[2 * i + 1]);
    }
    transpose8x8_epi16(lo);
    transpose8x8_epi16(hi);
    for (int k = 0; k < 8; k++) {
        x[k] = lo[k];
        x[8 + k] = hi[k];
    }
}

#endif
