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

/* Rotary embedding (Llama's rotate-half form), in place on the first `heads` heads of each
 * row of qkv, with cos/sin rows looked up by position: out = x*cos + rotate_half(x)*sin,
 * rounded after each op as transformers' bf16 modules do. (head_dim / 2) % 16 == 0. */
void pdcore_bf16_rope(uint16_t *qkv, int64_t rows, int64_t ldq, int64_t heads, int64_t d,
                      const uint16_t *cos, const uint16_t *sin, const int64_t *positions) {
    const int64_t half = d / 2;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos + positions[r] * d;
        const uint16_t *s = sin + positions[r] * d;
        for (int64_t hd = 0; hd < heads; hd++) {
            uint16_t *x = qkv + r * ldq + hd * d;
            for (int64_t i = 0; i < half; i += 16) {
                const __m512 x1 = load_bf16(x + i), x2 = load_bf16(x + half + i);
                const __m512 lo = _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, load_bf16(c + i))),
                                                round_bf16(_mm512_mul_ps(x2, load_bf16(s + i))));
                const __m512 hi =
                    _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, load_bf16(c + half + i))),
                                  round_bf16(_mm512_mul_ps(x1, load_bf16(s + half + i))));
                store_bf16(x + i, lo);
                store_bf16(x + half + i, hi);
            }
        }
    }
}
