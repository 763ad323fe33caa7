/* Skinny bf16 GEMM for CPU decode steps: Y[M,N] = X[M,K] @ W[N,K]^T, M small (1..64).
 *
 * Why our own: a decode step multiplies a few rows of activations by every weight matrix
 * once, so it is bound by reading the weights. The generic GEMM libraries re-block the
 * activations and reach ~40% of the memory bandwidth at M=1 and far less compute than the
 * CPU offers at M=8..32 on CPUs with AVX512-BF16 but no AMX. Here the weights are packed
 * once into the layout VDPBF16PS consumes directly ([N/16][K/2][16][2]: 16 output
 * features x one pair of k per 64-byte line), each weight line is loaded once per tile of
 * up to 8 rows, and activations are broadcast from L1 -- no re-layout per call.
 *
 * Threads: OpenMP over blocks of output features. Linked against the libgomp that torch
 * already loaded (same soname), so there is one OpenMP pool in the process, not two.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define MT_MAX 8 /* rows per tile: 2 x 8 accumulators + 2 weight registers fit in 32 zmm */

static inline __attribute__((always_inline)) void tile(const uint16_t *x, int64_t ldx, int mt,
                                                        int64_t kp_count, const uint16_t *p0,
                                                        const uint16_t *p1, uint16_t *y,
                                                        int64_t ldy, int two) {
    __m512 acc0[MT_MAX], acc1[MT_MAX];
#pragma GCC unroll 8
    for (int m = 0; m < MT_MAX; m++) {
        acc0[m] = _mm512_setzero_ps();
        acc1[m] = _mm512_setzero_ps();
    }
    const int32_t *xr[MT_MAX];
#pragma GCC unroll 8
    for (int m = 0; m < MT_MAX; m++) xr[m] = (const int32_t *)(x + (m < mt ? m : 0) * ldx);
    for (int64_t kp = 0; kp < kp_count; kp++) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(p0 + kp * 32));
        __m512bh w1 = two ? (__m512bh)_mm512_loadu_si512((const void *)(p1 + kp * 32)) : w0;
#pragma GCC unroll 8
        for (int m = 0; m < MT_MAX; m++) {
            if (m < mt) {
                __m512bh xv = (__m512bh)_mm512_set1_epi32(xr[m][kp]);
                acc0[m] = _mm512_dpbf16_ps(acc0[m], xv, w0);
                if (two) acc1[m] = _mm512_dpbf16_ps(acc1[m], xv, w1);
            }
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT_MAX; m++) {
        if (m < mt) {
            _mm256_storeu_si256((__m256i *)(y + m * ldy), (__m256i)_mm512_cvtneps_pbh(acc0[m]));
            if (two)
                _mm256_storeu_si256((__m256i *)(y + m * ldy + 16),
                                    (__m256i)_mm512_cvtneps_pbh(acc1[m]));
        }
    }
}

/* One specialisation per tile height, so every loop above unrolls with constants. */
#define TILE_CASE(MT)                                                                  \
    case MT:                                                                           \
        if (two)                                                                       \
            tile(x, ldx, MT, kp_count, p0, p1, y, ldy, 1);                             \
        else                                                                           \
            tile(x, ldx, MT, kp_count, p0, p1, y, ldy, 0);                             \
        break;

static void tile_dispatch(const uint16_t *x, int64_t ldx, int mt, int64_t kp_count,
                          const uint16_t *p0, const uint16_t *p1, uint16_t *y, int64_t ldy,
                          int two) {
    switch (mt) {
        TILE_CASE(1)
        TILE_CASE(2)
        TILE_CASE(3)
        TILE_CASE(4)
        TILE_CASE(5)
        TILE_CASE(6)
        TILE_CASE(7)
        TILE_CASE(8)
    }
}

/* x: [m, k] bf16 (row stride ldx); packed: [n/16][k/2][16][2] bf16; y: [m, n] bf16 (row
 * stride ldy). n % 16 == 0 and k % 2 == 0 (the caller checks). */
void pdcore_bf16_skinny_gemm(const uint16_t *x, int64_t m, int64_t ldx, const uint16_t *packed,
                             int64_t n, int64_t k, uint16_t *y, int64_t ldy, int threads) {
    const int64_t kp_count = k / 2;
    const int64_t blocks = n / 16;
    const int64_t pairs = (blocks + 1) / 2; /* work items: two 16-feature blocks each */
    const int64_t block_elems = kp_count * 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t pi = 0; pi < pairs; pi++) {
        const int64_t b0 = pi * 2;
        const int two = b0 + 1 < blocks;
        const uint16_t *p0 = packed + b0 * block_elems;
        const uint16_t *p1 = two ? p0 + block_elems : p0;
        for (int64_t m0 = 0; m0 < m; m0 += MT_MAX) {
            int mt = (int)(m - m0 < MT_MAX ? m - m0 : MT_MAX);
            tile_dispatch(x + m0 * ldx, ldx, mt, kp_count, p0, p1, y + m0 * ldy + b0 * 16, ldy,
                          two);
        }
    }
}
