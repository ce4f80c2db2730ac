/* Binary and ternary GEMMs on packed sign bits (XNOR-Net / BNN style), and sign packing.
 *
 * Bits: bit j of word w of a row is element 64 w + j; bit 1 means +1. Padding bits of the last
 * word are ignored (masked), whatever they hold.
 *   binary:  dot = sum_k a_k w_k = K - 2 popcount(a XOR w)
 *   ternary: with planes pos (t = +1) and neg (t = -1), nz = pos | neg,
 *            dot = sum_k a_k t_k = popcount(nz) - 2 popcount((a XOR pos) AND nz)
 *            (on a nonzero position a_k t_k = +1 exactly when the bit of a equals the pos bit).
 *
 * AVX2 popcounts use vpshufb as a 16-entry table lookup (Mula, Kurz & Lemire 2018). Paths:
 *   direct (few rows, binary and ternary): rows of A and W as they are, 256 bits at a time along
 *     K, each byte counted by two nibble lookups, byte counters summed with vpsadbw.
 *   byte table (many rows, binary): the lookup runs the other way round. For one byte b of an A
 *     row, BYTE_TABLE[b] is a vpshufb table mapping a W nibble v to popcount(nibble of b XOR v);
 *     W is re-laid so one vector holds, for 16 columns, the low nibbles of their byte j (low lane)
 *     and the high nibbles (high lane). One vpshufb + one vpaddb then count 128 products (no XOR,
 *     no masking), against 256 products per 6 operations for the XOR-then-lookup form.
 *     Register block 4 rows x 32 columns.
 *   split nibbles (many rows, ternary): A and W are split into nibble bytes (low and high nibble
 *     of every byte in separate words), W interleaved 4 columns per vector; the inner loop
 *     broadcasts one A word against the words of 4 columns, so each 64-bit lane counts one
 *     output (vpsadbw gives per-lane sums). Register block 4 rows x 8 columns.
 * Inner loops keep their accumulators in named variables (arrays make GCC insert register moves).
 */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "lowbit_kernels.h"
#include "transpose.h"

#define DIRECT_MAX_M 8 /* fewer rows than this: direct path */
#define BLOCK_M 32     /* rows per parallel block (multiple of 4) */
#define FLUSH_WORDS 31 /* byte counters: 31 words x 8 <= 255 */
#define MIN_MACS_PER_THREAD (1 << 22) /* smaller problems use fewer threads */

typedef struct {
    const uint64_t *a, *w, *wn; /* raw rows [M, Kw], [N, Kw], [N, Kw] (wn: ternary only) */
    int64_t K, Kw;
    uint64_t lastmask; /* valid bits of the last word */
    uint64_t *wp;      /* split-nibble path: W [ceil(N/8)][Kw][2 quads][4 planes][4 columns] */
    int32_t *nnz;      /* ternary, packed path: popcount(nz) per column */
    int64_t Kb;        /* bytes a row: ceil(K / 8) */
    uint8_t *wt;       /* byte-table path: W [ceil(N/16)][Kb][32] nibble bytes */
} bitctx;

static const uint64_t NIB = 0x0F0F0F0F0F0F0F0FULL;

static uint64_t word_mask(const bitctx *c, int64_t k) { return k == c->Kw - 1 ? c->lastmask : ~0ULL; }

/* ---------------------------------------------------------------- scalar path */

static void bit_block_scalar(const void *vctx, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                             int32_t *tile, int64_t ldt, void *work) {
    (void)work;
    const bitctx *c = vctx;
    for (int64_t m = m0; m < m1; m++) {
        const uint64_t *ar = c->a + m * c->Kw;
        for (int64_t n = n0; n < n1; n++) {
            const uint64_t *wr = c->w + n * c->Kw;
            int64_t cnt = 0, nz = 0;
            for (int64_t k = 0; k < c->Kw; k++) {
                uint64_t mask = word_mask(c, k);
                if (c->wn) mask &= wr[k] | c->wn[n * c->Kw + k];
                cnt += __builtin_popcountll((ar[k] ^ wr[k]) & mask);
                nz += __builtin_popcountll(mask);
            }
            tile[(m - m0) * ldt + (n - n0)] = (int32_t)((c->wn ? nz : c->K) - 2 * cnt);
        }
    }
}

/* ---------------------------------------------------------------- AVX2 helpers */

static AVX2_TARGET ALWAYS_INLINE __m256i nibble_lut(void) {
    return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2,
                            3, 1, 2, 2, 3, 2, 3, 3, 4);
}

/* Per-byte popcount of x (values 0..8). */
static AVX2_TARGET ALWAYS_INLINE __m256i popcount_bytes(__m256i x, __m256i lut) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i lo = _mm256_and_si256(x, m4), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

static AVX2_TARGET ALWAYS_INLINE int64_t hsum64(__m256i v) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

/* The first n (0..8) lanes of v: stored, or (add) added to what dst holds. */
static AVX2_TARGET ALWAYS_INLINE void store_lanes(int32_t *dst, __m256i v, int n, int add) {
    if (n >= 8) {
        if (add) v = _mm256_add_epi32(v, _mm256_loadu_si256((const __m256i *)dst));
        _mm256_storeu_si256((__m256i *)dst, v);
    } else if (n > 0) {
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        if (add) v = _mm256_add_epi32(v, _mm256_maskload_epi32(dst, mask));
        _mm256_maskstore_epi32(dst, mask, v);
    }
}

/* ---------------------------------------------------------------- AVX2 direct path */

/* Popcount over words [k0, Kw) of row data (masked by nz rows when ternary): the scalar tail. */
static AVX2_TARGET ALWAYS_INLINE int64_t tail_count(const bitctx *c, const uint64_t *ar,
                                                    int64_t n, int64_t k0, int64_t *nz) {
    int64_t cnt = 0;
    const uint64_t *wr = c->w + n * c->Kw;
    for (int64_t k = k0; k < c->Kw; k++) {
        uint64_t mask = word_mask(c, k);
        if (c->wn) mask &= wr[k] | c->wn[n * c->Kw + k];
        cnt += _mm_popcnt_u64((ar[k] ^ wr[k]) & mask);
        *nz += _mm_popcnt_u64(mask);
    }
    return cnt;
}

static AVX2_TARGET void bit_block_direct_avx2(const void *vctx, int64_t m0, int64_t m1, int64_t n0,
                                              int64_t n1, int32_t *tile, int64_t ldt, void *work) {
    (void)work;
    const bitctx *c = vctx;
    const int64_t Kw = c->Kw, nvec = Kw > 0 ? (Kw - 1) / 4 : 0; /* vectors before the last word */
    const __m256i lut = nibble_lut(), zero = _mm256_setzero_si256();
    for (int64_t n = n0; n < n1; n += 4) {
        const uint64_t *wr[4], *nr[4];
        int64_t col[4], nnz[4] = {0, 0, 0, 0};
        for (int j = 0; j < 4; j++) {
            col[j] = n + j < n1 ? n + j : n1 - 1; /* edge: repeat the last column */
            wr[j] = c->w + col[j] * Kw;
            nr[j] = c->wn ? c->wn + col[j] * Kw : wr[j];
        }
        if (c->wn) { /* nonzeros of the vector part, once per column group */
            for (int j = 0; j < 4; j++) {
                __m256i acc = zero, tot = zero;
                for (int64_t v = 0; v < nvec; v++) {
                    __m256i z = _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(wr[j] + 4 * v)),
                                                _mm256_loadu_si256((const __m256i *)(nr[j] + 4 * v)));
                    acc = _mm256_add_epi8(acc, popcount_bytes(z, lut));
                    if ((v + 1) % FLUSH_WORDS == 0 || v + 1 == nvec) {
                        tot = _mm256_add_epi64(tot, _mm256_sad_epu8(acc, zero));
                        acc = zero;
                    }
                }
                nnz[j] = hsum64(tot);
            }
        }
        for (int64_t m = m0; m < m1; m++) {
            const uint64_t *ar = c->a + m * Kw;
            __m256i acc[4], tot[4];
            for (int j = 0; j < 4; j++) acc[j] = tot[j] = zero;
            for (int64_t v = 0; v < nvec; v++) {
                __m256i av = _mm256_loadu_si256((const __m256i *)(ar + 4 * v));
                for (int j = 0; j < 4; j++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(wr[j] + 4 * v));
                    __m256i x = _mm256_xor_si256(av, wv);
                    if (c->wn)
                        x = _mm256_and_si256(x, _mm256_or_si256(wv, _mm256_loadu_si256(
                                                                        (const __m256i *)(nr[j] + 4 * v))));
                    acc[j] = _mm256_add_epi8(acc[j], popcount_bytes(x, lut));
                }
                if ((v + 1) % FLUSH_WORDS == 0 || v + 1 == nvec) {
                    for (int j = 0; j < 4; j++) {
                        tot[j] = _mm256_add_epi64(tot[j], _mm256_sad_epu8(acc[j], zero));
                        acc[j] = zero;
                    }
                }
            }
            for (int j = 0; j < 4 && n + j < n1; j++) {
                int64_t nz = nnz[j];
                int64_t cnt = hsum64(tot[j]) + tail_count(c, ar, col[j], 4 * nvec, &nz);
                tile[(m - m0) * ldt + (n + j - n0)] = (int32_t)((c->wn ? nz : c->K) - 2 * cnt);
            }
        }
    }
}

/* ---------------------------------------------------------------- AVX2 split-nibble path (ternary) */

static void split_nibbles(uint64_t x, uint64_t *lo, uint64_t *hi) {
    *lo = x & NIB;
    *hi = (x >> 4) & NIB;
}

/* Rows [m0, m1) of A as split nibble words [m1 - m0][Kw][2] into dst. */
static void split_pack_rows(const bitctx *c, int64_t m0, int64_t m1, uint64_t *dst) {
    const int64_t Kw = c->Kw;
    for (int64_t m = m0; m < m1; m++) {
        const uint64_t *ar = c->a + m * Kw;
        uint64_t *o = dst + (m - m0) * Kw * 2;
        for (int64_t k = 0; k < Kw; k++) split_nibbles(ar[k], o + 2 * k, o + 2 * k + 1);
        if (Kw) split_nibbles(ar[Kw - 1] & c->lastmask, o + 2 * Kw - 2, o + 2 * Kw - 1);
    }
}

/* Group g of W (8 columns) as [Kw][2 quads][pos lo, pos hi, nz lo, nz hi][4 columns], zero for
 * columns >= N; nonzero counts per column. */
static AVX2_TARGET void split_pack_w_group(const bitctx *c, int64_t N, int64_t g) {
    const int64_t Kw = c->Kw;
    for (int i = 0; i < 8; i++) {
        int64_t n = g * 8 + i, nz = 0;
        for (int64_t k = 0; k < Kw; k++) {
            uint64_t *o = c->wp + ((g * Kw + k) * 2 + i / 4) * 16 + i % 4;
            uint64_t pos = 0, z = 0;
            if (n < N) {
                uint64_t mask = word_mask(c, k);
                pos = c->w[n * Kw + k] & mask;
                z = (pos | c->wn[n * Kw + k]) & mask;
            }
            split_nibbles(pos, o, o + 4);
            split_nibbles(z, o + 8, o + 12);
            nz += _mm_popcnt_u64(z);
        }
        if (n < N) c->nnz[n] = (int32_t)nz;
    }
}

static void split_pack_w(const bitctx *c, int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < (N + 7) / 8; g++) split_pack_w_group(c, N, g);
}

/* Byte counts of 4 packed A rows x 8 columns over words [k0, k1), at most FLUSH_WORDS. */
#define TERN_ROW(r, arow)                                                                         \
    do {                                                                                          \
        __m256i al = _mm256_set1_epi64x((long long)(arow)[2 * k]);                                \
        __m256i ah = _mm256_set1_epi64x((long long)(arow)[2 * k + 1]);                            \
        __m256i x = _mm256_and_si256(_mm256_xor_si256(al, wk[0]), wk[2]);                         \
        __m256i y = _mm256_and_si256(_mm256_xor_si256(ah, wk[1]), wk[3]);                         \
        acc##r##0 = _mm256_add_epi8(acc##r##0, _mm256_add_epi8(_mm256_shuffle_epi8(lut, x),       \
                                                               _mm256_shuffle_epi8(lut, y)));     \
        x = _mm256_and_si256(_mm256_xor_si256(al, wk[4]), wk[6]);                                 \
        y = _mm256_and_si256(_mm256_xor_si256(ah, wk[5]), wk[7]);                                 \
        acc##r##1 = _mm256_add_epi8(acc##r##1, _mm256_add_epi8(_mm256_shuffle_epi8(lut, x),       \
                                                               _mm256_shuffle_epi8(lut, y)));     \
    } while (0)

static AVX2_TARGET __attribute__((noinline)) void tern_steps(const uint64_t *const a[4],
                                                             const uint64_t *wg, int64_t k0,
                                                             int64_t k1, __m256i out[8]) {
    const __m256i lut = nibble_lut();
    __m256i acc00 = _mm256_setzero_si256(), acc01 = acc00, acc10 = acc00, acc11 = acc00;
    __m256i acc20 = acc00, acc21 = acc00, acc30 = acc00, acc31 = acc00;
    const uint64_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
    for (int64_t k = k0; k < k1; k++) {
        const __m256i *wk = (const __m256i *)(wg + k * 32);
        TERN_ROW(0, a0);
        TERN_ROW(1, a1);
        TERN_ROW(2, a2);
        TERN_ROW(3, a3);
    }
    out[0] = acc00, out[1] = acc01, out[2] = acc10, out[3] = acc11;
    out[4] = acc20, out[5] = acc21, out[6] = acc30, out[7] = acc31;
}

static AVX2_TARGET void tern_block_split_avx2(const void *vctx, int64_t m0, int64_t m1,
                                              int64_t n0, int64_t n1, int32_t *tile,
                                              int64_t ldt, void *work) {
    const bitctx *c = vctx;
    const int64_t Kw = c->Kw;
    const __m256i zero = _mm256_setzero_si256();
    uint64_t *ap = work;
    split_pack_rows(c, m0, m1, ap);
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    for (int64_t g = n0 / 8; g * 8 < n1; g++) {
        const uint64_t *wg = c->wp + g * Kw * 32;
        const int cols = n1 - g * 8 < 8 ? (int)(n1 - g * 8) : 8;
        int32_t nz[8] = {0};
        memcpy(nz, c->nnz + g * 8, (size_t)cols * sizeof(int32_t));
        const __m256i base = _mm256_loadu_si256((const __m256i *)nz);
        for (int64_t m = m0; m < m1; m += 4) {
            const int R = m1 - m < 4 ? (int)(m1 - m) : 4;
            const uint64_t *rows[4];
            for (int r = 0; r < 4; r++) rows[r] = ap + (m - m0 + (r < R ? r : R - 1)) * 2 * Kw;
            __m256i cnt[8];
            for (int i = 0; i < 8; i++) cnt[i] = zero;
            for (int64_t k0 = 0; k0 < Kw; k0 += FLUSH_WORDS) {
                __m256i acc[8];
                tern_steps(rows, wg, k0, k0 + FLUSH_WORDS < Kw ? k0 + FLUSH_WORDS : Kw, acc);
                for (int i = 0; i < 8; i++)
                    cnt[i] = _mm256_add_epi64(cnt[i], _mm256_sad_epu8(acc[i], zero));
            }
            for (int r = 0; r < R; r++) { /* int64 counts -> 8 int32 dots = nnz - 2 count */
                __m256i c8 = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(cnt[2 * r], even),
                                                       _mm256_permutevar8x32_epi32(cnt[2 * r + 1], even),
                                                       0x20);
                store_lanes(tile + (m - m0 + r) * ldt + (g * 8 - n0),
                            _mm256_sub_epi32(base, _mm256_add_epi32(c8, c8)), cols, 0);
            }
        }
    }
}

/* ---------------------------------------------------------------- AVX2 byte-table path */

/* BYTE_TABLE[b] = [popcount((b & 15) ^ i), i < 16 | popcount((b >> 4) ^ i), i < 16]: the nibble
 * counts of b XOR anything, as two vpshufb tables (one per 128-bit lane). */
static uint8_t BYTE_TABLE[256][32] __attribute__((aligned(64)));

void lowbit_bitgemm_init(void) {
    for (int b = 0; b < 256; b++)
        for (int i = 0; i < 16; i++) {
            BYTE_TABLE[b][i] = (uint8_t)__builtin_popcount((unsigned)((b & 15) ^ i));
            BYTE_TABLE[b][16 + i] = (uint8_t)__builtin_popcount((unsigned)((b >> 4) ^ i));
        }
}

#define LUT_FLUSH 63 /* byte counters: 63 steps x 4 <= 252 */

static uint8_t row_byte(const bitctx *c, const uint64_t *row, int64_t j) {
    uint8_t b = ((const uint8_t *)row)[j];
    return j == c->Kb - 1 && c->K % 8 ? (uint8_t)(b & ((1u << (c->K % 8)) - 1)) : b;
}

/* Rows [m0, m1) of A as offsets 32 * byte into BYTE_TABLE, [m1 - m0][8 Kw] (the row stride of
 * the input, so the block converts as one contiguous run); the last byte in use is masked. */
static void lut_pack_rows(const bitctx *c, int64_t m0, int64_t m1, uint16_t *dst) {
    const int64_t lda = c->Kw * 8, total = (m1 - m0) * lda;
    const uint8_t *src = (const uint8_t *)(c->a + m0 * c->Kw);
    for (int64_t i = 0; i < total; i++) dst[i] = (uint16_t)(src[i] << 5);
    if (c->K % 8)
        for (int64_t r = 0; r < m1 - m0; r++)
            dst[r * lda + c->Kb - 1] = (uint16_t)(row_byte(c, c->a + (m0 + r) * c->Kw, c->Kb - 1) << 5);
}

/* W as [ceil(N/16)][Kb][32]: for 16 columns, the low nibbles of their byte j, then the high
 * nibbles (16 x 16 byte blocks transposed with SSE2). */
static void lut_pack_w(const bitctx *c, int64_t N, int threads) {
    const int64_t Kb = c->Kb;
    const uint8_t last = c->K % 8 ? (uint8_t)((1u << (c->K % 8)) - 1) : 0xFF;
    const __m128i nib = _mm_set1_epi8(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < (N + 15) / 16; g++)
        for (int64_t j0 = 0; j0 < Kb; j0 += 16) {
            __m128i x[16];
            load_block16((const uint8_t *)c->w, c->Kw * 8, N, Kb, g * 16, j0, x);
            transpose16x16_epi8(x);
            for (int64_t j = 0; j < 16 && j0 + j < Kb; j++) {
                __m128i v = x[j];
                if (j0 + j == Kb - 1) v = _mm_and_si128(v, _mm_set1_epi8((char)last));
                uint8_t *o = c->wt + (g * Kb + j0 + j) * 32;
                _mm_storeu_si128((__m128i *)o, _mm_and_si128(v, nib));
                _mm_storeu_si128((__m128i *)(o + 16), _mm_and_si128(_mm_srli_epi16(v, 4), nib));
            }
        }
}

/* Byte counts over steps [j0, j1) (at most LUT_FLUSH) of 4 rows x 32 columns (lut_steps_4x32:
 * out[2 r + q] = row r, columns 16 q .. 16 q + 15) or 8 rows x 16 columns (lut_steps_8x16:
 * out[r]). A step takes one byte of each row: BYTE_TABLE of that byte is the vpshufb table, and a
 * W vector holds the low nibbles of byte j of 16 columns (low lane) and their high nibbles (high
 * lane), so each byte counter is [column c, low nibbles | column c, high nibbles]. */
/* Final dots of 16 columns from one byte-counter vector (single flush): vpmaddubsw with -2 adds
 * the low- and high-nibble counts of a column after a qword permute and a byte interleave put
 * them side by side (int16 -2 count), then widen and add K. */
static AVX2_TARGET ALWAYS_INLINE __m256i nibble_pairs_times_minus2(__m256i acc) {
    const __m256i pair = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15, 0, 8,
                                          1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    __m256i side = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(acc, 0xD8), pair);
    return _mm256_maddubs_epi16(side, _mm256_set1_epi8(-2));
}

static AVX2_TARGET ALWAYS_INLINE void store_dots16(int32_t *dst, __m256i acc, __m256i kv) {
    __m256i s = nibble_pairs_times_minus2(acc);
    _mm256_storeu_si256((__m256i *)dst,
                        _mm256_add_epi32(kv, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s))));
    _mm256_storeu_si256((__m256i *)(dst + 8),
                        _mm256_add_epi32(kv, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s, 1))));
}

/* After the steps, out[i] = the byte counters, or with dst the finished dots of a full tile
 * (dst[i] = where counter i's 16 columns go, kv = K in every lane). */
#define LUT_FINISH(i, a)                                                                          \
    do {                                                                                          \
        if (dst)                                                                                  \
            store_dots16(dst[i], a, kv);                                                          \
        else                                                                                      \
            out[i] = a;                                                                           \
    } while (0)

#define LUT_ACC(r, q, w)                                                                          \
    acc##r##q = _mm256_add_epi8(acc##r##q, _mm256_shuffle_epi8(t##r, w))
#define LUT_TABLE(r) const __m256i t##r = _mm256_load_si256((const __m256i *)(table + o##r[j]))

static AVX2_TARGET __attribute__((noinline)) void lut_steps_4x32(
    const uint16_t *const o[8], const uint8_t *w0p, int64_t wstride, int64_t j0, int64_t j1,
    __m256i out[8], int32_t *const dst[8], __m256i kv) {
    const uint8_t *table = &BYTE_TABLE[0][0], *w1p = w0p + wstride;
    const uint16_t *o0 = o[0], *o1 = o[1], *o2 = o[2], *o3 = o[3];
    __m256i acc00 = _mm256_setzero_si256(), acc01 = acc00, acc10 = acc00, acc11 = acc00;
    __m256i acc20 = acc00, acc21 = acc00, acc30 = acc00, acc31 = acc00;
    for (int64_t j = j0; j < j1; j++) {
        const __m256i w0 = _mm256_load_si256((const __m256i *)(w0p + j * 32));
        const __m256i w1 = _mm256_load_si256((const __m256i *)(w1p + j * 32));
        LUT_TABLE(0);
        LUT_ACC(0, 0, w0);
        LUT_ACC(0, 1, w1);
        LUT_TABLE(1);
        LUT_ACC(1, 0, w0);
        LUT_ACC(1, 1, w1);
        LUT_TABLE(2);
        LUT_ACC(2, 0, w0);
        LUT_ACC(2, 1, w1);
        LUT_TABLE(3);
        LUT_ACC(3, 0, w0);
        LUT_ACC(3, 1, w1);
    }
    LUT_FINISH(0, acc00);
    LUT_FINISH(1, acc01);
    LUT_FINISH(2, acc10);
    LUT_FINISH(3, acc11);
    LUT_FINISH(4, acc20);
    LUT_FINISH(5, acc21);
    LUT_FINISH(6, acc30);
    LUT_FINISH(7, acc31);
}

static AVX2_TARGET __attribute__((noinline)) void lut_steps_8x16(
    const uint16_t *const o[8], const uint8_t *w0p, int64_t wstride, int64_t j0, int64_t j1,
    __m256i out[8], int32_t *const dst[8], __m256i kv) {
    (void)wstride;
    const uint8_t *table = &BYTE_TABLE[0][0];
    const uint16_t *o0 = o[0], *o1 = o[1], *o2 = o[2], *o3 = o[3];
    const uint16_t *o4 = o[4], *o5 = o[5], *o6 = o[6], *o7 = o[7];
    __m256i acc00 = _mm256_setzero_si256(), acc10 = acc00, acc20 = acc00, acc30 = acc00;
    __m256i acc40 = acc00, acc50 = acc00, acc60 = acc00, acc70 = acc00;
    for (int64_t j = j0; j < j1; j++) {
        const __m256i w0 = _mm256_load_si256((const __m256i *)(w0p + j * 32));
        LUT_TABLE(0);
        LUT_ACC(0, 0, w0);
        LUT_TABLE(1);
        LUT_ACC(1, 0, w0);
        LUT_TABLE(2);
        LUT_ACC(2, 0, w0);
        LUT_TABLE(3);
        LUT_ACC(3, 0, w0);
        LUT_TABLE(4);
        LUT_ACC(4, 0, w0);
        LUT_TABLE(5);
        LUT_ACC(5, 0, w0);
        LUT_TABLE(6);
        LUT_ACC(6, 0, w0);
        LUT_TABLE(7);
        LUT_ACC(7, 0, w0);
    }
    LUT_FINISH(0, acc00);
    LUT_FINISH(1, acc10);
    LUT_FINISH(2, acc20);
    LUT_FINISH(3, acc30);
    LUT_FINISH(4, acc40);
    LUT_FINISH(5, acc50);
    LUT_FINISH(6, acc60);
    LUT_FINISH(7, acc70);
}

/* Dots of one tile: R rows of packed A (aoff) x columns [n, n+cols), with R <= 4 and cols <= 32
 * (4x32 steps) or R <= 8 and cols <= 16 (8x16 steps); missing rows repeat the last one. A full
 * tile with K <= 8 LUT_FLUSH is finished inside the steps function. Otherwise each flush adds
 * -2 count to int16 counters, exact for up to 32 flushes (32 * 2 * 504 < 32768), which are then
 * added into the int32 tile (starting from K). */
static AVX2_TARGET void lut_tile(const bitctx *c, const uint16_t *aoff, int wide, int R,
                                 int64_t n, int cols, int32_t *tile, int64_t ldt) {
    const int64_t Kb = c->Kb, wstride = Kb * 32;
    const int rows_max = wide ? 4 : 8, groups = wide ? 2 : 1;
    const __m256i zero = _mm256_setzero_si256(), kv = _mm256_set1_epi32((int32_t)c->K);
    const uint16_t *rows[8];
    for (int r = 0; r < rows_max; r++) rows[r] = aoff + (r < R ? r : R - 1) * c->Kw * 8;
    const uint8_t *w0p = c->wt + (n / 16) * wstride;
    void (*steps)(const uint16_t *const[8], const uint8_t *, int64_t, int64_t, int64_t,
                  __m256i[8], int32_t *const[8], __m256i) = wide ? lut_steps_4x32 : lut_steps_8x16;
    if (Kb > 0 && Kb <= LUT_FLUSH && R == rows_max && cols == 16 * groups) {
        int32_t *dst[8];
        for (int i = 0; i < 8; i++) dst[i] = tile + (i / groups) * ldt + 16 * (i % groups);
        steps(rows, w0p, wstride, 0, Kb, NULL, dst, kv);
        return;
    }
    __m256i s16[8];
    for (int i = 0; i < 8; i++) s16[i] = zero;
    int flushes = 0, added = 0;
    for (int64_t j0 = 0; j0 < Kb; j0 += LUT_FLUSH) {
        const int64_t j1 = j0 + LUT_FLUSH < Kb ? j0 + LUT_FLUSH : Kb;
        __m256i acc[8];
        steps(rows, w0p, wstride, j0, j1, acc, NULL, kv);
        for (int i = 0; i < 8; i++)
            s16[i] = _mm256_add_epi16(s16[i], nibble_pairs_times_minus2(acc[i]));
        if (++flushes < 32 && j1 < Kb) continue;
        const __m256i base = added ? zero : kv;
        for (int r = 0; r < R; r++)
            for (int q = 0; q < groups; q++) {
                const int i = r * groups + q, c0 = 16 * q;
                __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16[i]));
                __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16[i], 1));
                store_lanes(tile + r * ldt + c0, _mm256_add_epi32(base, lo), cols - c0, added);
                store_lanes(tile + r * ldt + c0 + 8, _mm256_add_epi32(base, hi), cols - c0 - 8,
                            added);
            }
        for (int i = 0; i < 8; i++) s16[i] = zero;
        flushes = 0;
        added = 1;
    }
    if (!added) /* K = 0 */
        for (int r = 0; r < R; r++)
            for (int q = 0; q < groups; q++)
                for (int h = 0; h < 2; h++)
                    store_lanes(tile + r * ldt + 16 * q + 8 * h, zero, cols - 16 * q - 8 * h, 0);
}

static AVX2_TARGET void bit_block_lut_avx2(const void *vctx, int64_t m0, int64_t m1, int64_t n0,
                                           int64_t n1, int32_t *tile, int64_t ldt, void *work) {
    const bitctx *c = vctx;
    uint16_t *aoff = work;
    lut_pack_rows(c, m0, m1, aoff);
    for (int64_t n = n0; n < n1; n += 32) {
        const int cols = n1 - n < 32 ? (int)(n1 - n) : 32, wide = cols > 16, rows = wide ? 4 : 8;
        for (int64_t m = m0; m < m1; m += rows)
            lut_tile(c, aoff + (m - m0) * c->Kw * 8, wide, m1 - m < rows ? (int)(m1 - m) : rows, n,
                     cols, tile + (m - m0) * ldt + (n - n0), ldt);
    }
}

/* ---------------------------------------------------------------- entry points */

static int64_t chunk_cols(int64_t N) {
    int64_t nc = (N + 63) / 64 * 64;
    return nc < 256 ? nc : 256;
}

int lowbit_bitgemm(const uint64_t *a, const uint64_t *w, const uint64_t *w_neg, int64_t M,
                   int64_t N, int64_t K, const epilogue *e, int nthreads) {
    bitctx c = {a, w, w_neg, K, (K + 63) / 64, 0, NULL, NULL, (K + 7) / 8, NULL};
    c.lastmask = K % 64 ? (((uint64_t)1 << (K % 64)) - 1) : ~(uint64_t)0;
    const int threads = lowbit_threads_for(nthreads, M, N, K, MIN_MACS_PER_THREAD);
    if (!lowbit_use_avx2)
        return lowbit_run_blocks(&c, bit_block_scalar, e, M, N, BLOCK_M, chunk_cols(N), 0,
                                 threads);
    if (M < DIRECT_MAX_M)
        return lowbit_run_blocks(&c, bit_block_direct_avx2, e, M, N, DIRECT_MAX_M, 64, 0, threads);
    int rc = -1;
    if (!w_neg) {
        c.wt = lowbit_alloc((size_t)((N + 15) / 16 * c.Kb * 32));
        if (c.wt) {
            lut_pack_w(&c, N, threads);
            rc = lowbit_run_blocks(&c, bit_block_lut_avx2, e, M, N, BLOCK_M, chunk_cols(N),
                                   (size_t)(BLOCK_M * c.Kw * 8) * sizeof(uint16_t), threads);
        }
    } else {
        c.wp = lowbit_alloc((size_t)((N + 7) / 8 * c.Kw * 32) * sizeof(uint64_t));
        c.nnz = lowbit_alloc((size_t)N * sizeof(int32_t));
        if (c.wp && c.nnz) {
            split_pack_w(&c, N, threads);
            rc = lowbit_run_blocks(&c, tern_block_split_avx2, e, M, N, BLOCK_M, chunk_cols(N),
                                   (size_t)(BLOCK_M * c.Kw * 2) * sizeof(uint64_t), threads);
        }
    }
    lowbit_release(c.wt);
    lowbit_release(c.wp);
    lowbit_release(c.nnz);
    return rc;
}

/* ---------------------------------------------------------------- sign packing */

static void pack_signs_row_scalar(const float *x, uint64_t *o, int64_t K, int64_t from) {
    for (int64_t w = from; w < (K + 63) / 64; w++) {
        uint64_t word = 0;
        for (int64_t j = 0; j < 64 && 64 * w + j < K; j++)
            word |= (uint64_t)(x[64 * w + j] >= 0.0f) << j;
        o[w] = word;
    }
}

static AVX2_TARGET void pack_signs_row_avx2(const float *x, uint64_t *o, int64_t K) {
    const __m256 zero = _mm256_setzero_ps();
    int64_t w = 0;
    for (; 64 * (w + 1) <= K; w++) {
        uint64_t word = 0;
        for (int j = 0; j < 8; j++) {
            __m256 ge = _mm256_cmp_ps(_mm256_loadu_ps(x + 64 * w + 8 * j), zero, _CMP_GE_OQ);
            word |= (uint64_t)(unsigned)_mm256_movemask_ps(ge) << (8 * j);
        }
        o[w] = word;
    }
    pack_signs_row_scalar(x, o, K, w);
}

int lowbit_pack_signs(const float *x, uint64_t *out, int64_t M, int64_t K, int nthreads) {
    const int64_t Kw = (K + 63) / 64;
    const int avx2 = lowbit_use_avx2;
    const int threads = lowbit_threads_for(nthreads, M, 64, K, MIN_MACS_PER_THREAD);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        if (avx2)
            pack_signs_row_avx2(x + m * K, out + m * Kw, K);
        else
            pack_signs_row_scalar(x + m * K, out + m * Kw, K, 0);
    }
    return 0;
}
