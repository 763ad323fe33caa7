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

/* Rounds to the storage type between ops, as torch does op by op: to bf16 for a bf16
 * model, nothing for fp32. */
static inline __m512 round_to(__m512 v, int f32) { return f32 ? v : round_bf16(v); }

/* out = w * round(x * rsqrt(mean(x^2) + eps)); with `delta`, first x = x + delta (rounded
 * and written back, as `hidden = hidden + delta` does). h % 16 == 0. */
static inline __attribute__((always_inline)) void rms_norm(
    char *x, const char *delta, const char *w, char *out, int64_t rows, int64_t h, int64_t ldx,
    int64_t ldd, int64_t ldo, float eps, int f32) {
    const int64_t es = f32 ? 4 : 2;
    for (int64_t r = 0; r < rows; r++) {
        char *xr = x + r * ldx * es;
        __m512 ss = _mm512_setzero_ps();
        if (delta) {
            const char *dr = delta + r * ldd * es;
            for (int64_t i = 0; i < h; i += 16) {
                __m512 v = round_to(_mm512_add_ps(load_w(xr, i, f32), load_w(dr, i, f32)), f32);
                store_y(xr, i, v, f32);
                ss = _mm512_fmadd_ps(v, v, ss);
            }
        } else {
            for (int64_t i = 0; i < h; i += 16) {
                __m512 v = load_w(xr, i, f32);
                ss = _mm512_fmadd_ps(v, v, ss);
            }
        }
        const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)h + eps);
        const __m512 vinv = _mm512_set1_ps(inv);
        char *orow = out + r * ldo * es;
        for (int64_t i = 0; i < h; i += 16) {
            __m512 n = round_to(_mm512_mul_ps(load_w(xr, i, f32), vinv), f32);
            store_y(orow, i, _mm512_mul_ps(n, load_w(w, i, f32)), f32);
        }
    }
}

void pdcore_bf16_rms_norm(uint16_t *x, const uint16_t *delta, const uint16_t *w, uint16_t *out,
                          int64_t rows, int64_t h, int64_t ldx, int64_t ldd, int64_t ldo,
                          float eps) {
    rms_norm((char *)x, (const char *)delta, (const char *)w, (char *)out, rows, h, ldx, ldd,
             ldo, eps, 0);
}

void pdcore_f32_rms_norm(float *x, const float *delta, const float *w, float *out, int64_t rows,
                         int64_t h, int64_t ldx, int64_t ldd, int64_t ldo, float eps) {
    rms_norm((char *)x, (const char *)delta, (const char *)w, (char *)out, rows, h, ldx, ldd,
             ldo, eps, 1);
}

/* out[r, :] = round(silu(gate)) * up, where gate_up[r] = [gate (i) | up (i)]. i % 16 == 0. */
static inline __attribute__((always_inline)) void silu_mul(const char *gate_up, char *out,
                                                            int64_t rows, int64_t i_size,
                                                            int64_t ldg, int64_t ldo, int f32) {
    const int64_t es = f32 ? 4 : 2;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t r = 0; r < rows; r++) {
        const char *g = gate_up + r * ldg * es;
        const char *u = g + i_size * es;
        char *o = out + r * ldo * es;
        for (int64_t i = 0; i < i_size; i += 16) {
            __m512 gv = load_w(g, i, f32);
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            __m512 sv = round_to(_mm512_div_ps(gv, _mm512_add_ps(one, e)), f32);
            store_y(o, i, _mm512_mul_ps(sv, load_w(u, i, f32)), f32);
        }
    }
}

void pdcore_bf16_silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t i_size,
                          int64_t ldg, int64_t ldo) {
    silu_mul((const char *)gate_up, (char *)out, rows, i_size, ldg, ldo, 0);
}

void pdcore_f32_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t i_size,
                         int64_t ldg, int64_t ldo) {
    silu_mul((const char *)gate_up, (char *)out, rows, i_size, ldg, ldo, 1);
}

/* Rotary embedding (Llama's rotate-half form), in place on the first `heads` heads of each
 * row of qkv, with cos/sin rows looked up by position: out = x*cos + rotate_half(x)*sin,
 * rounded after each op as torch does. (head_dim / 2) % 16 == 0. */
static inline __attribute__((always_inline)) void rope(char *qkv, int64_t rows, int64_t ldq,
                                                        int64_t heads, int64_t d,
                                                        const char *cos, const char *sin,
                                                        const int64_t *positions, int f32) {
    const int64_t half = d / 2, es = f32 ? 4 : 2;
    for (int64_t r = 0; r < rows; r++) {
        const char *c = cos + positions[r] * d * es;
        const char *s = sin + positions[r] * d * es;
        for (int64_t hd = 0; hd < heads; hd++) {
            char *x = qkv + (r * ldq + hd * d) * es;
            for (int64_t i = 0; i < half; i += 16) {
                const __m512 x1 = load_w(x, i, f32), x2 = load_w(x, half + i, f32);
                const __m512 lo =
                    _mm512_sub_ps(round_to(_mm512_mul_ps(x1, load_w(c, i, f32)), f32),
                                  round_to(_mm512_mul_ps(x2, load_w(s, i, f32)), f32));
                const __m512 hi =
                    _mm512_add_ps(round_to(_mm512_mul_ps(x2, load_w(c, half + i, f32)), f32),
                                  round_to(_mm512_mul_ps(x1, load_w(s, half + i, f32)), f32));
                store_y(x, i, lo, f32);
                store_y(x, half + i, hi, f32);
            }
        }
    }
}

void pdcore_bf16_rope(uint16_t *qkv, int64_t rows, int64_t ldq, int64_t heads, int64_t d,
                      const uint16_t *cos, const uint16_t *sin, const int64_t *positions) {
    rope((char *)qkv, rows, ldq, heads, d, (const char *)cos, (const char *)sin, positions, 0);
}

void pdcore_f32_rope(float *qkv, int64_t rows, int64_t ldq, int64_t heads, int64_t d,
                     const float *cos, const float *sin, const int64_t *positions) {
    rope((char *)qkv, rows, ldq, heads, d, (const char *)cos, (const char *)sin, positions, 1);
}
