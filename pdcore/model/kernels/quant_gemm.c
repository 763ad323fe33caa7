/* Weight-only quantized GEMM for CPU decode: Y[M,N] = X[M,K] @ dequant(W)[N,K]^T (+ bias),
 * X and Y fp32. Batch-1 decode streams every weight once per token, so reading 4.5-8.5 bits
 * per weight instead of 32 (or 16) is the speed-up -- if the arithmetic keeps up. In fp32
 * it barely does: widening each 4-bit weight to fp32 and FMA-ing it costs ~0.5 vector
 * instructions per weight. So the GGUF formats take llama.cpp's way: the activations are
 * quantized per 32-k block at the start of each call and the block dot products are
 * integer (AVX2 VPMADDUBSW + VPMADDWD: 64 4-bit weights in ~8 instructions; AVX512-VNNI's
 * VPDPBUSD, in the avx512bf16 build, does each 4-byte dot product in one: ~1.2x at 8-32
 * rows on Zen 4), with one fp32 FMA per block and row applying the scales. Q8's signed
 * weights go into VPDPBUSD offset by 128 (vec.h dot4_q8; the offset's share comes off per
 * block from the activation sums quantize_row keeps): 1.37x for the 30 MB Q8_0 LM head at
 * 32 rows.
 *
 * Formats (packed once at load by pdcore/model/quantized.py; 16 output features per
 * "panel", the last one zero-padded). Q4 and Q8 store a panel as two groups of 8 features,
 * each group's blocks contiguous (a thread streams one group from start to end):
 *   Q4 (GGUF Q4_1, and Q4_0 with m = -8d): per 32-k block, w = d * q + m, q in 0..15.
 *       Group block (160 bytes): d[8] fp16, m[8] fp16, then per quad t (0..3) 32 bytes:
 *       row r's GGUF bytes 4t..4t+3 -- low nibbles q[4t..4t+3], high nibbles
 *       q[16+4t..16+4t+3]. 5 bits per weight.
 *   Q8 (GGUF Q8_0): per 32-k block, w = d * q, q int8. Group block (272 bytes): d[8] fp16,
 *       then per quad t (0..7) 32 bytes: row r's q[4t..4t+3]. 8.5 bits per weight.
 *   I8 (int8 per output channel, --quantization int8): w = s * q. Panel: s[16] fp32, then
 *       K x 16 int8 ([k][r]). Any K.
 * One 32-byte unit of Q4/Q8 is 8 rows x 4 consecutive k, so a 4-byte dot product per int32
 * lane gives each row its own partial sum: no horizontal reductions.
 *
 * Activations (Q4/Q8): per row and 32-k block, a = max |x|, dx = a / 127, v = x * (127 / a)
 * (0 when a == 0), q1 = round-half-even(v) in -127..127 and, with two parts (the default),
 * q2 = round(254 * (v - q1)) in -127..127: x ~ dx * (q1 + q2 / 254), off by at most
 * a / 64516 per element -- ~16 bits, where llama.cpp's one part (its Q8_0 / Q8_1
 * activations) is off by up to a / 254. One part measured top-1 agreement 0.92 with the
 * dequantized fp32 model on SmolLM2-135M; two parts 1.0 (docs/benchmarks.md), for ~1.6x the
 * integer work, which batch-1 decode (memory-bound) does not notice. sx = the fp32 sum of
 * the block's x; a block contributes d * dx * (sum(q * q1) + sum(q * q2) / 254) + m * sx.
 * The weights are exact (every q is the file's). Prefill-sized inputs (above PANEL_ROWS)
 * multiply x by the weights widened chunk by chunk (panel_gemm.c; fp32, or with
 * prefill_bf16 on AVX512-BF16 bf16 dot products): there the work is compute-bound, and two
 * int8 parts cost as many multiply instructions as fp32 FMAs do on AVX2 (VPMADDUBSW issues
 * once per cycle on Zen 3, FMAs twice) -- no gain for the rounding. (With VNNI, unblocked
 * as here, they measured 0.93-1.34x the fp32 tiles at 512 rows on Zen 4; the bf16 tiles
 * 1.9x.)
 *
 * I8 keeps fp32 activations: small M (up to QMT rows) widens the weights block by block in
 * registers and FMAs them into all rows at once; up to PANEL_ROWS rows widens each panel once
 * into an fp32 [K][16] scratch (L2-resident) and runs skinny_gemm.c's register tiles over it.
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

/* ---- I8: fp32 activations ---- */

/* mt (1..QMT) rows of x times one I8 panel -> out[mt][16] (no scale, no bias). `mt` is a
 * constant in the specialised calls below. With one or two rows, a second accumulator set
 * (odd k) hides the FMA latency. */
INLINE void i8_tile(const float *x, int64_t ldx, const int mt, int64_t k, const uint8_t *p,
                    float *out) {
    const int two = mt <= 2;
    vf acc[2][QMT][QNV];
#pragma GCC unroll 16
    for (int m = 0; m < QMT; m++)
#pragma GCC unroll 4
        for (int a = 0; a < QNV; a++) acc[0][m][a] = acc[1][m][a] = vzero();
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
#pragma GCC unroll 16
    for (int m = 0; m < QMT; m++)
        if (m < mt)
#pragma GCC unroll 4
            for (int a = 0; a < QNV; a++)
                store_f32(out + m * 16 + a * VW, two ? acc[0][m][a] + acc[1][m][a] : acc[0][m][a]);
}

#define I8_CASE(MT)                      \
    case MT:                             \
        i8_tile(x, ldx, MT, k, p, out);  \
        break;

static void i8_tile_dispatch(const float *x, int64_t ldx, int mt, int64_t k, const uint8_t *p,
                             float *out) {
    switch (mt) {
        I8_CASE(1)
        I8_CASE(2)
        I8_CASE(3)
        I8_CASE(4)
#if QMT > 4
        I8_CASE(5)
        I8_CASE(6)
        I8_CASE(7)
        I8_CASE(8)
#endif
    }
}

/* ---- Q4 / Q8: activations quantized to one or two int8 parts ---- */

#define QDT 4 /* rows per call of dot_group */
#ifndef PANEL_ROWS /* benches may move it */
#define PANEL_ROWS 32 /* above: panel_gemm.c (fp32 x, widened weights) */
#endif
#define SERIAL_QUANTIZE 8192 /* elements of x */
#ifndef PREFETCH_BYTES
/* How far ahead each weight line is prefetched. Batch 1: ~1.1x with it on Zen 3 (512-2048
 * alike); on Zen 4 (the AVX512 builds), streaming a 22 MB matrix, 4096 measured 1.07-1.2x
 * 1024 (2 threads 50 -> 54 GB/s, 1 thread 23 -> 27): more bytes in flight for DDR5. */
#if VW == 16
#define PREFETCH_BYTES 4096
#else
#define PREFETCH_BYTES 1024
#endif
#endif

/* Row `x` (k fp32) quantized per 32-k block (see the top of the file): q[0..k) the int8
 * values, and with parts == 2 q[k..2k) the rounding residual in 1/254 steps; unless NULL,
 * qsum[b * parts + h] the block's sum of part h (Q8 on VNNI builds: vec.h dot4_q8). */
static void quantize_row(const float *x, int64_t k, int parts, int8_t *q, float *dx,
                         float *sx, int32_t *qsum) {
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f, sum = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float a = xb[j] < 0 ? -xb[j] : xb[j];
            amax = a > amax ? a : amax;
            sum += xb[j];
        }
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t s1 = 0, s2 = 0;
        for (int j = 0; j < 32; j++) {
            const float v = xb[j] * id, r = __builtin_nearbyintf(v);
            q[b * 32 + j] = (int8_t)r;
            s1 += (int8_t)r;
            if (parts == 2) {
                q[k + b * 32 + j] = (int8_t)__builtin_nearbyintf((v - r) * 254.0f);
                s2 += q[k + b * 32 + j];
            }
        }
        if (qsum != NULL) {
            qsum[b * parts] = s1;
            if (parts == 2) qsum[b * parts + 1] = s2;
        }
        dx[b] = amax / 127.0f;
        sx[b] = sum;
    }
}

/* mt (1..QDT) rows of quantized x times one group of 8 features of a panel -> out[mt] (8
 * lanes each, no bias). `fmt`, `parts` and `mt` are constants in the specialised calls
 * below. The quad loops stay rolled: unrolled, GCC hoisted every product and spilled. */
INLINE void dot_group(const uint8_t *p, const int fmt, const int parts, int g, int64_t nb,
                      const int8_t *xq, const float *xd, const float *xs, const int32_t *xi,
                      int64_t k, const int mt, f32x8 *out) {
    const int64_t ldq = parts * k;
    f32x8 acc[QDT], acc2[QDT];
#pragma GCC unroll 4
    for (int i = 0; i < QDT; i++) acc[i] = acc2[i] = (f32x8){0};
    const int64_t gbb = fmt == FMT_Q4 ? 160 : 272;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = p + (g * nb + b) * gbb;
        for (int64_t off = 0; off < gbb; off += 64) /* every line of a block ahead */
            __builtin_prefetch(blk + PREFETCH_BYTES + off);
        const f32x8 d = load_f16x8((const uint16_t *)blk);
        i32x8 s[2][QDT];
        if (fmt == FMT_Q4 && DOT_VNNI) { /* one VPDPBUSD per quad and part */
            /* Independent sums per nibble (and, with few rows, per quad parity): one chain
             * of 8 dependent VPDPBUSDs per block and row left batch 1 latency-bound. */
            const int split = mt * parts <= 2 ? 4 : mt * parts <= 4 ? 2 : 1;
            const uint8_t *qs = blk + 32;
            i32x8 sv[4][2][QDT];
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++)
#pragma GCC unroll 4
                for (int i = 0; i < QDT; i++)
#pragma GCC unroll 2
                    for (int h = 0; h < parts; h++) sv[j][h][i] = (i32x8){0};
#pragma GCC unroll 1
            for (int t = 0; t < 4; t += 2)
#pragma GCC unroll 2
                for (int u = 0; u < 2; u++) {
                    const u8x32 w = load_u8x32(qs + 32 * (t + u)), lo = w & 15, hi = w >> 4;
                    const int jl = split == 4 ? 2 * u : 0, jh = split >= 2 ? jl + 1 : jl;
#pragma GCC unroll 4
                    for (int i = 0; i < QDT; i++)
                        if (i < mt)
#pragma GCC unroll 2
                            for (int h = 0; h < parts; h++) {
                                const int8_t *xb = xq + i * ldq + h * k + b * 32 + 4 * (t + u);
                                sv[jl][h][i] = dot4_u8s8(sv[jl][h][i], lo, bcast_quad(xb));
                                sv[jh][h][i] = dot4_u8s8(sv[jh][h][i], hi, bcast_quad(xb + 16));
                            }
                }
#pragma GCC unroll 4
            for (int i = 0; i < QDT; i++)
#pragma GCC unroll 2
                for (int h = 0; h < parts; h++) {
                    s[h][i] = sv[0][h][i];
                    if (split >= 2) s[h][i] += sv[1][h][i];
                    if (split == 4) s[h][i] += sv[2][h][i] + sv[3][h][i];
                }
        } else if (fmt == FMT_Q4) {
            const uint8_t *qs = blk + 32;
            i16x16 s16[2][QDT];
#pragma GCC unroll 4
            for (int i = 0; i < QDT; i++)
                for (int h = 0; h < parts; h++) s16[h][i] = (i16x16){0};
#pragma GCC unroll 1
            for (int t = 0; t < 4; t++) {
                const u8x32 w = load_u8x32(qs + 32 * t), lo = w & 15, hi = w >> 4;
#pragma GCC unroll 4
                for (int i = 0; i < QDT; i++)
                    if (i < mt) /* 4 quads x 2 x 2 x 15 x 127 < 2^15: no overflow */
#pragma GCC unroll 2
                        for (int h = 0; h < parts; h++) {
                            const int8_t *xb = xq + i * ldq + h * k + b * 32 + 4 * t;
                            s16[h][i] += dot2_u8s8(lo, bcast_quad(xb)) +
                                         dot2_u8s8(hi, bcast_quad(xb + 16));
                        }
            }
#pragma GCC unroll 4
            for (int i = 0; i < QDT; i++)
#pragma GCC unroll 2
                for (int h = 0; h < parts; h++) s[h][i] = pairs_i32(s16[h][i]);
        } else { /* Q8 */
            const uint8_t *qs = blk + 16;
#pragma GCC unroll 4
            for (int i = 0; i < QDT; i++)
                for (int h = 0; h < parts; h++) s[h][i] = (i32x8){0};
#pragma GCC unroll 1
            for (int t = 0; t < 8; t++) {
                const u8x32 w = load_u8x32(qs + 32 * t);
#pragma GCC unroll 4
                for (int i = 0; i < QDT; i++)
                    if (i < mt)
#pragma GCC unroll 2
                        for (int h = 0; h < parts; h++)
                            s[h][i] = dot4_q8(
                                s[h][i], w, bcast_quad(xq + i * ldq + h * k + b * 32 + 4 * t));
            }
            if (Q8_BIAS) /* the weights went in as q + Q8_BIAS (vec.h dot4_q8) */
#pragma GCC unroll 4
                for (int i = 0; i < QDT; i++)
                    if (i < mt)
#pragma GCC unroll 2
                        for (int h = 0; h < parts; h++)
                            s[h][i] -= Q8_BIAS * xi[(i * nb + b) * parts + h];
        }
        /* two accumulators per row (the scale and the m term): independent FMA chains */
        const f32x8 mn = fmt == FMT_Q4 ? load_f16x8((const uint16_t *)(blk + 16)) : (f32x8){0};
#pragma GCC unroll 4
        for (int i = 0; i < QDT; i++)
            if (i < mt) {
                f32x8 sum = __builtin_convertvector(s[0][i], f32x8);
                if (parts == 2)
                    sum += __builtin_convertvector(s[1][i], f32x8) * (1.0f / 254.0f);
                acc[i] += sum * (d * xd[i * nb + b]);
                if (fmt == FMT_Q4) acc2[i] += mn * xs[i * nb + b];
            }
    }
#pragma GCC unroll 4
    for (int i = 0; i < QDT; i++)
        if (i < mt) out[i] = acc[i] + acc2[i];
}

#define DOT_CASE(MT)                                                    \
    case MT:                                                            \
        if (fmt == FMT_Q4 && parts == 1)                                \
            dot_group(p, FMT_Q4, 1, g, nb, xq, xd, xs, xi, k, MT, out); \
        else if (fmt == FMT_Q4)                                         \
            dot_group(p, FMT_Q4, 2, g, nb, xq, xd, xs, xi, k, MT, out); \
        else if (parts == 1)                                            \
            dot_group(p, FMT_Q8, 1, g, nb, xq, xd, xs, xi, k, MT, out); \
        else                                                            \
            dot_group(p, FMT_Q8, 2, g, nb, xq, xd, xs, xi, k, MT, out); \
        break;

static void dot_group_dispatch(const uint8_t *p, int fmt, int parts, int g, int64_t nb,
                               const int8_t *xq, const float *xd, const float *xs,
                               const int32_t *xi, int64_t k, int mt, f32x8 *out) {
    switch (mt) {
        DOT_CASE(1)
        DOT_CASE(2)
        DOT_CASE(3)
        DOT_CASE(4)
    }
}

static void dot_gemm(const float *x, int64_t m, int64_t ldx, const uint8_t *packed, int fmt,
                     int parts, const float *bias, int64_t n, int64_t k, float *y, int64_t ldy,
                     int threads) {
    const int64_t panels = (n + 15) / 16, pb = panel_bytes(fmt, k), nb = k / 32;
    const int sums = fmt == FMT_Q8 && Q8_BIAS; /* per-block integer sums of x wanted */
    int8_t *xq = (int8_t *)malloc((size_t)(parts * m * k) + (size_t)((8 + 4 * parts) * m * nb) +
                                  64);
    if (xq == NULL) abort(); /* out of memory: fail loudly */
    float *xd = (float *)(xq + ((parts * m * k + 63) & ~(int64_t)63)), *xs = xd + m * nb;
    int32_t *xi = (int32_t *)(xs + m * nb);
    const int64_t tasks = panels * 2; /* groups of 8 features */
    /* A few rows are quantized here before the threads start (no barrier inside the
     * region); more in parallel. Static schedule: each thread streams one contiguous half
     * of the matrix (dynamic chunks measured ~7% slower at batch 1). */
    const int serial = m * k <= SERIAL_QUANTIZE;
    if (serial)
        for (int64_t r = 0; r < m; r++)
            quantize_row(x + r * ldx, k, parts, xq + r * parts * k, xd + r * nb, xs + r * nb,
                         sums ? xi + r * nb * parts : NULL);

#pragma omp parallel num_threads(threads)
    {
        if (!serial) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < m; r++)
                quantize_row(x + r * ldx, k, parts, xq + r * parts * k, xd + r * nb, xs + r * nb,
                             sums ? xi + r * nb * parts : NULL);
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t pi = task / 2, c0 = task * 8;
            const int g = (int)(task % 2);
            if (c0 >= n) continue; /* a padding group */
            const int64_t cols = n - c0 < 8 ? n - c0 : 8;
            for (int64_t r0 = 0; r0 < m; r0 += QDT) {
                const int mt = (int)(m - r0 < QDT ? m - r0 : QDT);
                f32x8 out[QDT];
                dot_group_dispatch(packed + pi * pb, fmt, parts, g, nb, xq + r0 * parts * k,
                                   xd + r0 * nb, xs + r0 * nb, xi + r0 * nb * parts, k, mt, out);
                for (int i = 0; i < mt; i++)
                    for (int64_t c = 0; c < cols; c++)
                        y[(r0 + i) * ldy + c0 + c] = out[i][c] + (bias ? bias[c0 + c] : 0.0f);
            }
        }
    }
    free(xq);
}

/* Panel `p`'s weights for k in [k0, k0 + kc) widened to fp32 [kc][16] with row stride ldw
 * (16: a packed panel; n: straight into the transposed matrix W^T [k, n]); k is the whole
 * K, k0 and kc multiples of 32 for Q4/Q8. Q4 and Q8 rebuild each weight as the
 * dequantizing reference does (d * q + m rounds once, d * q is exact). */
static void dequant_range(const uint8_t *p, int fmt, int64_t k, int64_t k0, int64_t kc,
                          float *w, int64_t ldw) {
    if (fmt == FMT_I8) {
        const int8_t *q = (const int8_t *)(p + 64);
        for (int64_t kk = k0; kk < k0 + kc; kk++)
#pragma GCC unroll 4
            for (int a = 0; a < QNV; a++)
                store_f32(w + (kk - k0) * ldw + a * VW,
                          __builtin_convertvector(load_i8(q + kk * 16 + a * VW), vf) *
                              load_f32((const float *)p + a * VW));
        return;
    }
    const int64_t gbb = fmt == FMT_Q4 ? 160 : 272, nb = k / 32;
    for (int64_t b = k0 / 32; b < (k0 + kc) / 32; b++) {
        float *wb = w + (b * 32 - k0) * ldw;
        for (int g = 0; g < 2; g++) {
            const uint8_t *blk = p + (g * nb + b) * gbb;
            const f32x8 d = load_f16x8((const uint16_t *)blk);
            if (fmt == FMT_Q4) {
                const f32x8 mn = load_f16x8((const uint16_t *)(blk + 16));
                for (int t = 0; t < 4; t++) {
                    u32x8 u;
                    memcpy(&u, blk + 32 + 32 * t, 32);
#pragma GCC unroll 4
                    for (int i = 0; i < 4; i++) {
                        const f32x8 lo = __builtin_convertvector((i32x8)((u >> (8 * i)) & 15), f32x8);
                        const f32x8 hi =
                            __builtin_convertvector((i32x8)((u >> (8 * i + 4)) & 15), f32x8);
                        const f32x8 vlo = lo * d + mn, vhi = hi * d + mn;
                        memcpy(wb + (4 * t + i) * ldw + 8 * g, &vlo, 32);
                        memcpy(wb + (16 + 4 * t + i) * ldw + 8 * g, &vhi, 32);
                    }
                }
            } else {
                for (int t = 0; t < 8; t++) {
                    i32x8 u;
                    memcpy(&u, blk + 16 + 32 * t, 32);
#pragma GCC unroll 4
                    for (int i = 0; i < 4; i++) {
                        const f32x8 v = __builtin_convertvector((u << (24 - 8 * i)) >> 24, f32x8) * d;
                        memcpy(wb + (4 * t + i) * ldw + 8 * g, &v, 32);
                    }
                }
            }
        }
    }
}

static void dequant_panel(const uint8_t *p, int fmt, int64_t k, float *w, int64_t ldw) {
    dequant_range(p, fmt, k, 0, k, w, ldw);
}

/* Prefill: panel_gemm.c widens one K chunk of a panel at a time through this. */
typedef struct {
    const uint8_t *packed;
    int fmt;
    int64_t k, pb;
} widen_ctx;

static void widen_chunk(const void *ctx, int64_t panel, int64_t k0, int64_t kc, float *dst) {
    const widen_ctx *c = (const widen_ctx *)ctx;
    dequant_range(c->packed + panel * c->pb, c->fmt, c->k, k0, kc, dst, 16);
}

void pdcore_internal_panel_gemm(const float *x, int64_t m, int64_t ldx, int64_t n, int64_t k,
                                int64_t kalign, const float *bias, float *y, int64_t ldy,
                                void (*widen)(const void *, int64_t, int64_t, int64_t, float *),
                                const void *ctx, int bf16, int threads);

/* x: [m, k] fp32 (row stride ldx); packed: the format's panels; bias: [n] fp32 or NULL;
 * y: [m, n] fp32 (row stride ldy). Q4/Q8 need k % 32 == 0. prefill_bf16: above PANEL_ROWS
 * rows, multiply x and the widened weights rounded to bf16 (VDPBF16PS, fp32 sums) where
 * this build has AVX512-BF16 and k is even; else (and by default) fp32. */
void pdcore_quant_gemm(const float *x, int64_t m, int64_t ldx, const uint8_t *packed, int fmt,
                       int act_parts, int prefill_bf16, const float *bias, int64_t n, int64_t k,
                       float *y, int64_t ldy, int threads) {
    if (m > PANEL_ROWS) { /* prefill-sized: blocked GEMM on widened chunks */
        const widen_ctx ctx = {packed, fmt, k, panel_bytes(fmt, k)};
        pdcore_internal_panel_gemm(x, m, ldx, n, k, fmt == FMT_I8 ? 1 : 32, bias, y, ldy,
                                   widen_chunk, &ctx, prefill_bf16, threads);
        return;
    }
    if (fmt != FMT_I8) {
        dot_gemm(x, m, ldx, packed, fmt, act_parts, bias, n, k, y, ldy, threads);
        return;
    }
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
                dequant_panel(p, fmt, k, scratch, 16);
                pdcore_internal_f32_panel(x, ldx, m, scratch, bias ? bias + c0 : NULL, cols, k,
                                          y + c0, ldy);
                continue;
            }
            float out[QMT * 16];
            i8_tile_dispatch(x, ldx, (int)m, k, p, out);
            for (int64_t r = 0; r < m; r++)
                for (int64_t c = 0; c < cols; c++)
                    y[r * ldy + c0 + c] = out[r * 16 + c] * ((const float *)p)[c] +
                                          (bias ? bias[c0 + c] : 0.0f);
        }
        free(scratch);
    }
}

/* The whole matrix widened to fp32 and transposed, W^T [k, n] row-major: the dense
 * weights for callers that need them (QuantLinear.dequantize; the tests check the packing
 * round trip with it -- prefill no longer widens whole matrices, see panel_gemm.c). Full panels are written in place with vector stores; only a last partial panel goes
 * through a scratch panel. */
void pdcore_quant_dequantize(const uint8_t *packed, int fmt, int64_t n, int64_t k, float *wt,
                             int threads) {
    const int64_t panels = (n + 15) / 16, pb = panel_bytes(fmt, k);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pi = 0; pi < panels; pi++) {
        const int64_t c0 = pi * 16, cols = n - c0 < 16 ? n - c0 : 16;
        if (cols == 16) {
            dequant_panel(packed + pi * pb, fmt, k, wt + c0, n);
            continue;
        }
        float *scratch = (float *)malloc(sizeof(float) * (size_t)(k * 16) + 64);
        if (scratch == NULL) abort(); /* out of memory: fail loudly */
        dequant_panel(packed + pi * pb, fmt, k, scratch, 16);
        for (int64_t kk = 0; kk < k; kk++) memcpy(wt + kk * n + c0, scratch + kk * 16, cols * 4);
        free(scratch);
    }
}
