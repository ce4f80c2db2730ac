/* lowbit runtime kernels: shared declarations.
 *
 * Every GEMM here computes out[m, n] = f(sum_k a[m, k] w[n, k]) for a row-major activation
 * matrix A [M, K] and a row-major weight matrix W [N, K] (the layout of nn.Linear and of a conv
 * weight flattened to [O, C kh kw]). The work is cut into (row block x column chunk) pieces run in
 * parallel with OpenMP; a piece writes its int32 dot products into a per-thread scratch tile and
 * the shared output stage ("epilogue") turns the tile into the requested output.
 *
 * AVX2 code lives in functions marked AVX2_TARGET and is only entered when lowbit_use_avx2 is set
 * (CPU support checked at import, LOWBIT_NO_AVX2=1 clears it); everything else is portable C.
 */
#ifndef LOWBIT_KERNELS_H
#define LOWBIT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define AVX2_TARGET __attribute__((target("avx2,fma,popcnt")))
#define ALWAYS_INLINE inline __attribute__((always_inline))

extern int lowbit_use_avx2;

/* ---- output stage ---- */
enum {
    EPI_INT32 = 0,     /* out int32 [M, N] = dot                                              */
    EPI_THRESHOLD = 1, /* out uint64 [M, ceil(N/64)]: bit n = (dot >= thr[n]) XOR flip bit n  */
    EPI_SCALE = 2,     /* out float32 [M, N] = (float)dot * scale[n] + bias[n]                 */
    EPI_REQUANT = 3    /* out uint8 [M, N] = gemmlowp requantisation of dot + bias[n]          */
};

typedef struct {
    int mode;
    int64_t N;
    void *out;
    const int32_t *thr;     /* THRESHOLD [N]                                     */
    const uint64_t *flip;   /* THRESHOLD [ceil(N/64)] packed flip bits            */
    const float *scale;     /* SCALE [N]                                          */
    const float *fbias;     /* SCALE [N]                                          */
    const int32_t *ibias;   /* REQUANT [N]                                        */
    const int32_t *m0;      /* REQUANT [N] Q31 multiplier                          */
    const int32_t *rshift;  /* REQUANT [N] right shift in [0, 31]                  */
    const int32_t *lshift;  /* REQUANT [N] saturating left shift in [0, 31]        */
    int32_t lo, hi;         /* REQUANT clamp bounds minus the zero point           */
    int32_t zp;             /* REQUANT output zero point                           */
} epilogue;

/* Gemmlowp requantisation of one accumulator (already including the bias) for column n. */
int32_t lowbit_requant1(const epilogue *e, int32_t acc, int64_t n);

/* ---- parallel driver ---- */
/* Computes the int32 dots of rows [m0, m1) x columns [n0, n1) into tile (row stride ldt);
 * work is per-thread scratch memory (64-byte aligned) for packing the block's rows. */
typedef void (*block_fn)(const void *ctx, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                         int32_t *tile, int64_t ldt, void *work);

/* Runs fn over row blocks of mb rows and column chunks of nc columns (nc a multiple of 64) on
 * nthreads threads (<= 0: OpenMP default), with work_bytes of work memory per thread, applying
 * the epilogue after each piece. Returns 0, or -1 when memory could not be allocated. */
int lowbit_run_blocks(const void *ctx, block_fn fn, const epilogue *e, int64_t M, int64_t N,
                      int64_t mb, int64_t nc, size_t work_bytes, int nthreads);

int lowbit_max_threads(void);
/* nthreads (<= 0: OpenMP default), lowered so every thread gets at least min_macs of work. */
int lowbit_threads_for(int nthreads, int64_t M, int64_t N, int64_t K, int64_t min_macs);
/* Scratch memory, 64-byte aligned, NULL on failure. Released blocks are kept in a small pool and
 * reused by later calls, so large packing buffers do not page-fault on every call. */
void *lowbit_alloc(size_t bytes);
void lowbit_release(void *p);
void lowbit_drop_pool(void); /* frees the pooled blocks */

/* ---- kernels (return 0, or -1 on allocation failure) ---- */
int lowbit_pack_signs(const float *x, uint64_t *out, int64_t M, int64_t K, int nthreads);

void lowbit_bitgemm_init(void); /* fills the byte lookup table; call once at import */

/* Binary (w_neg == NULL): dot = sum_k a_k w_k with a, w in {-1,+1} given as sign bits.
 * Ternary (w_neg != NULL): w holds the +1 plane and w_neg the -1 plane of a {-1,0,+1} weight. */
int lowbit_bitgemm(const uint64_t *a, const uint64_t *w, const uint64_t *w_neg, int64_t M,
                   int64_t N, int64_t K, const epilogue *e, int nthreads);

/* int8: dot = sum_k (a_k - a_zp) w_k with a uint8 and w int8. */
int lowbit_int8gemm(const uint8_t *a, int32_t a_zp, const int8_t *w, int64_t M, int64_t N,
                    int64_t K, const epilogue *e, int nthreads);

/* Ternary weights with int8 activations: dot = sum_k a_k t_k with a int8, t int8 in {-1,0,1}. */
int lowbit_ternary_int8gemm(const int8_t *a, const int8_t *t, int64_t M, int64_t N, int64_t K,
                            const epilogue *e, int nthreads);

#endif
