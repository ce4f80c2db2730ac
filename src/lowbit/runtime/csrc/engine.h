/* lowbit fused engine: a whole integer network run by one C call.
 *
 * A program is an array of steps, each a row of ENG_FIELDS int64 values (field names below),
 * built once per (model, batch size, thread count) by lowbit/runtime/fused/ and run by
 * lowbit_engine_run. Addresses (inputs, outputs, parameters, scratch) are raw pointers into
 * numpy arrays the Python plan keeps alive; nothing is allocated while a program runs.
 *
 * Tensors are channels last (NHWC; a 2-D tensor is [B, 1, 1, C]) and hold integer codes as
 * uint8 (code + offset, the offset chosen at plan time so the grid fits [0, 255]) or int32
 * (the code itself: wide grids, output accumulators).
 *
 * Steps:
 *   QUANT    float32 NCHW input -> codes: clip(rint(x * inv), lo, hi) + zp (float32, as numpy)
 *   CONV     im2col (in C, per row block) -> GEMM (uint8 x int8) -> fused output stage on the
 *            accumulator acc = raw + c[n] (c: minus the input zero point times the weight
 *            column sums): EXACT Z + round_half_even((acc m0 + bias) 2^-shift) in int64, or
 *            REQUANT gemmlowp ((acc << L) + bias in int32, exact by the plan's bounds;
 *            saturating left shift, SRDHM by m0, rounding right shift), clamped; or ACC the
 *            accumulator itself. Linear layers are 1x1 convolutions.
 *   RESCALE  codes from one grid to another: pow2 rounding shift, fixed-point multiplier, or
 *            none (offset / clamp only: ReLU, clamp, dtype change)
 *   ADD      both operands rescaled to the common grid, clip(a + b - Z), rescaled to the
 *            output grid (a following ReLU folded into its clamp)
 *   MAXPOOL / AVGPOOL (round half to even of the exact sum) / SLICE / PAD / FLATTEN (NHWC ->
 *            NCHW order) / DEQUANT (int32 accumulator -> float32 via double, as numpy)
 */
#ifndef LOWBIT_ENGINE_H
#define LOWBIT_ENGINE_H

#include <stdint.h>

enum {
    ENG_ISA_SCALAR = 0,
    ENG_ISA_AVX2 = 1,
    ENG_ISA_AVX512VNNI = 2,
};

enum {
    OP_QUANT = 1,
    OP_CONV = 2,
    OP_RESCALE = 3,
    OP_ADD = 4,
    OP_MAXPOOL = 5,
    OP_AVGPOOL = 6,
    OP_SLICE = 7,
    OP_PAD = 8,
    OP_FLATTEN = 9,
    OP_DEQUANT = 10,
};

/* step fields */
enum {
    F_OP, F_IN0, F_IN1, F_OUT,   /* op, addresses                                        */
    F_B, F_H, F_W, F_C,          /* input shape (NHWC)                                    */
    F_OH, F_OW, F_OC,            /* output shape                                          */
    F_KH, F_KW, F_SH, F_SW, F_PH, F_PW, /* window geometry (CONV, pools)                  */
    F_T0, F_T1, F_TO,            /* element types of in0, in1, out: 0 uint8, 1 int32       */
    F_P0, F_P1, F_P2, F_P3, F_P4, F_SCRATCH, /* parameter addresses, per-thread scratch     */
    F_X0, F_X1, F_X2, F_X3, F_X4, F_X5, F_X6, F_X7, /* integer parameters                  */
    F_R0, F_R1, F_R2, F_R3, F_R4, F_R5, F_R6, F_R7, /* a rescale (RESCALE, ADD output)     */
    F_Q0, F_Q1, F_Q2, F_Q3, F_Q4, F_Q5, F_Q6, F_Q7, /* ADD: rescale of the first operand   */
    F_U0, F_U1, F_U2, F_U3, F_U4, F_U5, F_U6, F_U7, /* ADD: rescale of the second operand  */
    F_OUT2, F_T2,                /* ADD: a second output, rescaled from the first (or 0)   */
    F_V0, F_V1, F_V2, F_V3, F_V4, F_V5, F_V6, F_V7, /* ADD: that rescale                   */
    F_THREADS, F_SCRATCH_BYTES,
    ENG_FIELDS
};

/* rescale modes (F_R1) */
enum { RS_NONE = 0, RS_POW2 = 1, RS_MULT = 2 };
/* CONV modes (F_X7) */
enum { CONV_REQUANT = 0, CONV_ACC = 1, CONV_EXACT = 2 };

/* GEMM layout constants */
#define ENG_MB 48 /* rows per block (a multiple of the register blocks) */

int lowbit_engine_cpu_isa(void); /* the best ISA this CPU runs */
int64_t lowbit_engine_kpad(int isa, int64_t K);
int64_t lowbit_engine_packed_bytes(int isa, int64_t N, int64_t K);
/* W int8 [N, K] into the ISA's layout (packed_bytes bytes at dst). */
void lowbit_engine_pack(int isa, const int8_t *w, int64_t N, int64_t K, void *dst);
/* bytes of per-thread scratch a CONV step needs */
int64_t lowbit_engine_conv_scratch(int isa, int64_t N, int64_t K);
/* Runs nsteps steps; returns 0, or the index + 1 of a step with an unknown op. */
int lowbit_engine_run(const int64_t *steps, int64_t nsteps);

/* GEMM of one row block: tile[r][n] = sum_k a[r][k] w[n][k], r < rows, n < round_up(N, 16);
 * a: rows x Kp uint8 (zero past K); work: ISA scratch (int16 copy for AVX2). */
void lowbit_engine_gemm_block(int isa, const uint8_t *a, int64_t rows, int64_t Kp,
                              const void *wpacked, int64_t N, int32_t *tile, void *work);

#endif
