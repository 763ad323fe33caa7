/* Fused bf16 elementwise ops of a Llama layer for CPU decode steps.
 *
 * Why: at decode batch sizes each of these is a few microseconds of arithmetic wrapped in
 * tens of microseconds of op dispatch and dtype round trips (torch's rms_norm on bf16 runs
 * ~8 ops: upcast, pow, mean, add, rsqrt, mul, downcast, mul). One pass per row here.
 * Rounding follows transformers' modules (LlamaRMSNorm, SiLU * up) so bf16 results match
 * theirs as closely as a different summation order allows.
 */
#include <math.h>
#include <stdint.h>

#include "bf16_common.h"

/* out = w * bf16(x * rsqrt(mean(x^2) + eps)); with `residual`, first x = residual += delta
 * (rounded to bf16 and written back, as `hidden = hidden + delta` does in bf16).
 * h % 16 == 0. */
void pdcore_bf16_rms_norm(uint16_t *x, const uint16_t *delta, const uint16_t *w, uint16_t *out,
                          int64_t rows, int64_t h, int64_t ldx, int64_t ldd, int64_t ldo,
                          float eps) {
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *xr = x + r * ldx;
        __m512 ss = _mm512_setzero_ps();
        if (delta) {
            const uint16_t *dr = delta + r * ldd;
            for (int64_t i = 0; i < h; i += 16) {
                __m512 v = round_bf16(_mm512_add_ps(load_bf16(xr + i), load_bf16(dr + i)));
                store_bf16(xr + i, v);
                ss = _mm512_fmadd_ps(v, v, ss);
            }
        } else {
            for (int64_t i = 0; i < h; i += 16) {
                __m512 v = load_bf16(xr + i);
                ss = _mm512_fmadd_ps(v, v, ss);
            }
        }
        const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)h + eps);
        const __m512 vinv = _mm512_set1_ps(inv);
        uint16_t *orow = out + r * ldo;
        for (int64_t i = 0; i < h; i += 16) {
            __m512 n = round_bf16(_mm512_mul_ps(load_bf16(xr + i), vinv));
            store_bf16(orow + i, _mm512_mul_ps(n, load_bf16(w + i)));
        }
    }
}

/* out[r, :] = bf16(silu(gate)) * up, where gate_up[r] = [gate (i) | up (i)]. i % 16 == 0. */
void pdcore_bf16_silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t i_size,
                          int64_t ldg, int64_t ldo) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate_up + r * ldg;
        const uint16_t *u = g + i_size;
        uint16_t *o = out + r * ldo;
        for (int64_t i = 0; i < i_size; i += 16) {
            __m512 gv = load_bf16(g + i);
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            __m512 s = round_bf16(_mm512_div_ps(gv, _mm512_add_ps(one, e)));
            store_bf16(o + i, _mm512_mul_ps(s, load_bf16(u + i)));
        }
    }
}
