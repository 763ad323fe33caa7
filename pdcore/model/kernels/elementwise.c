/* Fused elementwise ops of a Llama layer for CPU decode steps (bf16 or fp32 storage).
 *
 * Why: at decode batch sizes each of these is a few microseconds of arithmetic wrapped in
 * tens of microseconds of op dispatch and dtype round trips (torch's rms_norm on bf16 runs
 * ~8 ops: upcast, pow, mean, add, rsqrt, mul, downcast, mul). One pass per row here.
 * Rounding follows transformers' modules (LlamaRMSNorm, SiLU * up) so bf16 results match
 * theirs as closely as a different summation order allows. Built with -ffp-contract=off:
 * a*b - c*d stays two roundings, as torch computes it op by op.
 * Sizes: h, i_size and head_dim / 2 are multiples of 16 (the caller checks).
 */
#include <math.h>
#include <stdint.h>

#include "vec.h"

/* out = w * round(x * rsqrt(mean(x^2) + eps)); with `delta`, first x = x + delta (rounded
 * and written back, as `hidden = hidden + delta` does). */
INLINE void rms_norm(char *x, const char *delta, const char *w, char *out, int64_t rows,
                     int64_t h, int64_t ldx, int64_t ldd, int64_t ldo, float eps, int f32) {
    const int64_t es = f32 ? 4 : 2;
    for (int64_t r = 0; r < rows; r++) {
        char *xr = x + r * ldx * es;
        vf ss = vzero();
        if (delta) {
            const char *dr = delta + r * ldd * es;
            for (int64_t i = 0; i < h; i += VW) {
                const vf v = round_to(load_w(xr, i, f32) + load_w(dr, i, f32), f32);
                store_y(xr, i, v, f32);
                ss += v * v;
            }
        } else {
            for (int64_t i = 0; i < h; i += VW) {
                const vf v = load_w(xr, i, f32);
                ss += v * v;
            }
        }
        const vf vinv = splat(1.0f / sqrtf(hsum(ss) / (float)h + eps));
        char *orow = out + r * ldo * es;
        for (int64_t i = 0; i < h; i += VW) {
            const vf n = round_to(load_w(xr, i, f32) * vinv, f32);
            store_y(orow, i, n * load_w(w, i, f32), f32);
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

/* out[r, :] = round(silu(gate)) * up, where gate_up[r] = [gate (i) | up (i)]. */
INLINE void silu_mul(const char *gate_up, char *out, int64_t rows, int64_t i_size, int64_t ldg,
                     int64_t ldo, int f32) {
    const int64_t es = f32 ? 4 : 2;
    for (int64_t r = 0; r < rows; r++) {
        const char *g = gate_up + r * ldg * es;
        const char *u = g + i_size * es;
        char *o = out + r * ldo * es;
        for (int64_t i = 0; i < i_size; i += VW) {
            const vf gv = load_w(g, i, f32);
            const vf sv = round_to(gv / (splat(1.0f) + exp_vf(vzero() - gv)), f32);
            store_y(o, i, sv * load_w(u, i, f32), f32);
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
 * rounded after each op as torch does. */
INLINE void rope(char *qkv, int64_t rows, int64_t ldq, int64_t heads, int64_t d, const char *cos,
                 const char *sin, const int64_t *positions, int f32) {
    const int64_t half = d / 2, es = f32 ? 4 : 2;
    for (int64_t r = 0; r < rows; r++) {
        const char *c = cos + positions[r] * d * es;
        const char *s = sin + positions[r] * d * es;
        for (int64_t hd = 0; hd < heads; hd++) {
            char *x = qkv + (r * ldq + hd * d) * es;
            for (int64_t i = 0; i < half; i += VW) {
                const vf x1 = load_w(x, i, f32), x2 = load_w(x, half + i, f32);
                const vf lo = round_to(x1 * load_w(c, i, f32), f32) -
                              round_to(x2 * load_w(s, i, f32), f32);
                const vf hi = round_to(x2 * load_w(c, half + i, f32), f32) +
                              round_to(x1 * load_w(s, half + i, f32), f32);
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
