/* Weight-only quantized GEMM for CPU decode: Y[M,N] = X[M,K] @ dequant(W)[N,K]^T (+ bias),
 * X and Y fp32. Batch-1 decode streams every weight once per token, so reading 4.5-8.5 bits
 * per weight instead of 32 (or 16) is the speed-up; the arithmetic stays fp32.
 *
 * Formats (packed once at load by pdcore/model/quantized.py; 16 output features per
 * "panel", the last one zero-padded, as in skinny_gemm.c):
 *   Q4 (GGUF Q4_1, and Q4_0 with m = -8d): per 32-k block, w = d * q + m, q in 0..15.
 *       Panel block (320 bytes): d[16] fp16, m[16] fp16, then 16 x 16 bytes: byte [j][r]
 *       holds row r's q[j] (low nibble) and q[j + 16] (high nibble) -- GGUF's own nibble
 *       order, transposed so one load gives one k for 16 features. 5 bits per weight.
 *   Q8 (GGUF Q8_0): per 32-k block, w = d * q, q int8. Panel block (544 bytes): d[16] fp16,
 *       then 32 x 16 int8 ([k][r]). 8.5 bits per weight.
 *   I8 (int8 per output channel, --quantization int8): w = s * q. Panel: s[16] fp32, then
 *       K x 16 int8 ([k][r]). Any K.
 * Each weight is rebuilt in registers exactly as the dequantizing reference does (d * q + m
 * rounds once, d * q is exact), so results differ from dequantize-then-matmul by summation
 * order only (I8 applies its scale once per output instead: one more rounding).
 *
 * Small M (decode, up to QMT rows): weights are widened block by block in registers and
 * FMA'd into all rows at once. Larger M: each thread widens its panel once into an fp32
 * [K][16] scratch (L2-resident) and runs skinny_gemm.c's register tiles over it, so the
 * unpacking is paid once per panel, not once per row tile.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

enum { FMT_Q4 = 0, FMT_Q8 = 1, FMT_I8 = 2 };

#define QNV (16 / VW)
/* rows per fused tile: accumulators + 2 * QNV scales + QNV weights + 1 broadcast fit */
#define QMT (VW == 16 ? 8 : 4)

void pdcore_internal_f32_panel(const float *x, int64_t ldx, int64_t m, const float *panel,
                               const float *bias, int64_t cols, int64_t k, float *y,
                               int64_t ldy);

static int64_t panel_bytes(int fmt, int64_t k) {
    return fmt == FMT_Q4 ? (k / 32) * 320 : fmt == FMT_Q8 ? (k / 32) * 544 : 64 + 16 * k;
}

/* mt (1..QMT) rows of x times one panel -> out[mt][16] (no bias). `fmt` and `mt` are
 * constants in the specialised calls below. With one or two rows, a second accumulator
 * set (the block's second half) hides the FMA latency. */
INLINE void qtile(const float *x, int64_t ldx, const int mt, int64_t k, const uint8_t *p,
                  const int fmt, float *out) {
    const int two = mt <= 2;
    vf acc[2][QMT][QNV];
#pragma GCC unroll 16
    for (int m = 0; m < QMT; m++)
#pragma GCC unroll 4
        for (int a = 0; a < QNV; a++) acc[0][m][a] = acc[1][m][a] = vzero();
    if (fmt == FMT_I8) {
        const int8_t *q = (const int8_t *)(p + 64);
        for (int64_t kk = 0; kk < k; kk += 2) {
#pragma GCC unroll 2
            for (int s = 0; s < 2; s++) {
                if (s == 1 && kk + 1 == k) break; /* odd k */
                vf w[QNV];
#pragma GCC unroll 4
                for (int a = 0; a < QNV; a++)
                    w[a] = __builtin_convertvector(load_i8(q + (kk + s) * 16 + a * VW), vf);
#pragma GCC unroll 16
                for (int m = 0; m < QMT; m++)
                    if (m < mt) {
                        const vf xv = splat(x[m * ldx + kk + s]);
#pragma GCC unroll 4
                        for (int a = 0; a < QNV; a++) acc[s & two][m][a] += xv * w[a];
                    }
            }
        }
    } else {
        const int64_t bb = fmt == FMT_Q4 ? 320 : 544;
        for (int64_t b = 0; b < k / 32; b++) {
            const uint8_t *blk = p + b * bb;
            const float *xb = x + b * 32;
            vf d[QNV], mn[QNV];
#pragma GCC unroll 4
            for (int a = 0; a < QNV; a++) {
                d[a] = load_f16((const uint16_t *)blk + a * VW);
                mn[a] = fmt == FMT_Q4 ? load_f16((const uint16_t *)(blk + 32) + a * VW) : vzero();
            }
            const uint8_t *qs = blk + (fmt == FMT_Q4 ? 64 : 32);
#pragma GCC unroll 2
            for (int j = 0; j < 16; j++) {
                vf lo[QNV], hi[QNV];
#pragma GCC unroll 4
                for (int a = 0; a < QNV; a++) {
                    if (fmt == FMT_Q4) {
                        const vi q = load_u8(qs + j * 16 + a * VW);
                        lo[a] = __builtin_convertvector(q & 15, vf) * d[a] + mn[a];
                        hi[a] = __builtin_convertvector(q >> 4, vf) * d[a] + mn[a];
                    } else {
                        const int8_t *q = (const int8_t *)qs;
                        lo[a] = __builtin_convertvector(load_i8(q + j * 16 + a * VW), vf) * d[a];
                        hi[a] = __builtin_convertvector(load_i8(q + (j + 16) * 16 + a * VW), vf) *
                                d[a];
                    }
                }
#pragma GCC unroll 16
                for (int m = 0; m < QMT; m++)
                    if (m < mt) {
                        const vf xl = splat(xb[m * ldx + j]), xh = splat(xb[m * ldx + j + 16]);
#pragma GCC unroll 4
                        for (int a = 0; a < QNV; a++) {
                            acc[0][m][a] += xl * lo[a];
                            acc[two][m][a] += xh * hi[a];
                        }
                    }
            }
        }
    }
#pragma GCC unroll 16
    for (int m = 0; m < QMT; m++)
        if (m < mt)
#pragma GCC unroll 4
            for (int a = 0; a < QNV; a++)
                store_f32(out + m * 16 + a * VW, two ? acc[0][m][a] + acc[1][m][a] : acc[0][m][a]);
}

#define QTILE_CASE(MT)                                                \
    case MT:                                                          \
        if (fmt == FMT_Q4)                                            \
            qtile(x, ldx, MT, k, p, FMT_Q4, out);                     \
        else if (fmt == FMT_Q8)                                       \
            qtile(x, ldx, MT, k, p, FMT_Q8, out);                     \
        else                                                          \
            qtile(x, ldx, MT, k, p, FMT_I8, out);                     \
        break;

static void qtile_dispatch(const float *x, int64_t ldx, int mt, int64_t k, const uint8_t *p,
                           int fmt, float *out) {
    switch (mt) {
        QTILE_CASE(1)
        QTILE_CASE(2)
        QTILE_CASE(3)
        QTILE_CASE(4)
#if QMT > 4
        QTILE_CASE(5)
        QTILE_CASE(6)
        QTILE_CASE(7)
        QTILE_CASE(8)
#endif
    }
}

/* One panel widened to fp32 [k][16] (skinny_gemm.c's packed layout). */
static void dequant_panel(const uint8_t *p, int fmt, int64_t k, float *w) {
    if (fmt == FMT_I8) {
        const int8_t *q = (const int8_t *)(p + 64);
        for (int64_t kk = 0; kk < k; kk++)
#pragma GCC unroll 4
            for (int a = 0; a < QNV; a++)
                store_f32(w + kk * 16 + a * VW,
                          __builtin_convertvector(load_i8(q + kk * 16 + a * VW), vf) *
                              load_f32((const float *)p + a * VW));
        return;
    }
    const int64_t bb = fmt == FMT_Q4 ? 320 : 544;
    for (int64_t b = 0; b < k / 32; b++) {
        const uint8_t *blk = p + b * bb, *qs = blk + (fmt == FMT_Q4 ? 64 : 32);
        float *wb = w + b * 32 * 16;
#pragma GCC unroll 4
        for (int a = 0; a < QNV; a++) {
            const vf d = load_f16((const uint16_t *)blk + a * VW);
            if (fmt == FMT_Q4) {
                const vf mn = load_f16((const uint16_t *)(blk + 32) + a * VW);
                for (int j = 0; j < 16; j++) {
                    const vi q = load_u8(qs + j * 16 + a * VW);
                    store_f32(wb + j * 16 + a * VW, __builtin_convertvector(q & 15, vf) * d + mn);
                    store_f32(wb + (j + 16) * 16 + a * VW,
                              __builtin_convertvector(q >> 4, vf) * d + mn);
                }
            } else {
                for (int j = 0; j < 32; j++)
                    store_f32(wb + j * 16 + a * VW,
                              __builtin_convertvector(
                                  load_i8((const int8_t *)qs + j * 16 + a * VW), vf) * d);
            }
        }
    }
}

/* x: [m, k] fp32 (row stride ldx); packed: the format's panels; bias: [n] fp32 or NULL;
 * y: [m, n] fp32 (row stride ldy). Q4/Q8 need k % 32 == 0. */
void pdcore_quant_gemm(const float *x, int64_t m, int64_t ldx, const uint8_t *packed, int fmt,
                       const float *bias, int64_t n, int64_t k, float *y, int64_t ldy,
                       int threads) {
    const int64_t panels = (n + 15) / 16, pb = panel_bytes(fmt, k);
    const int fused = m <= QMT;
#pragma omp parallel num_threads(threads)
    {
        float *scratch = fused ? NULL : (float *)malloc(sizeof(float) * (size_t)(k * 16) + 64);
        if (!fused && scratch == NULL) abort(); /* out of memory: fail loudly */
#pragma omp for schedule(static)
        for (int64_t pi = 0; pi < panels; pi++) {
            const uint8_t *p = packed + pi * pb;
            const int64_t c0 = pi * 16, cols = n - c0 < 16 ? n - c0 : 16;
            if (!fused) {
                dequant_panel(p, fmt, k, scratch);
                pdcore_internal_f32_panel(x, ldx, m, scratch, bias ? bias + c0 : NULL, cols, k,
                                          y + c0, ldy);
                continue;
            }
            float out[QMT * 16], scale[16];
            for (int c = 0; c < 16; c++) scale[c] = fmt == FMT_I8 ? ((const float *)p)[c] : 1.0f;
            qtile_dispatch(x, ldx, (int)m, k, p, fmt, out);
            for (int64_t r = 0; r < m; r++)
                for (int64_t c = 0; c < cols; c++)
                    y[r * ldy + c0 + c] = out[r * 16 + c] * scale[c] + (bias ? bias[c0 + c] : 0.0f);
        }
        free(scratch);
    }
}

/* The whole matrix widened to fp32 [n, k] (row-major, as F.linear wants): prefill-sized
 * inputs multiply it with the library GEMM. */
void pdcore_quant_dequantize(const uint8_t *packed, int fmt, int64_t n, int64_t k, float *w,
                             int threads) {
    const int64_t panels = (n + 15) / 16, pb = panel_bytes(fmt, k);
#pragma omp parallel num_threads(threads)
    {
        float *scratch = (float *)malloc(sizeof(float) * (size_t)(k * 16) + 64);
        if (scratch == NULL) abort();
#pragma omp for schedule(static)
        for (int64_t pi = 0; pi < panels; pi++) {
            dequant_panel(packed + pi * pb, fmt, k, scratch);
            const int64_t rows = n - pi * 16 < 16 ? n - pi * 16 : 16;
            for (int64_t r = 0; r < rows; r++) {
                float *dst = w + (pi * 16 + r) * k;
                for (int64_t kk = 0; kk < k; kk++) dst[kk] = scratch[kk * 16 + r];
            }
        }
        free(scratch);
    }
}
