/* A Llama-family model's layers for one fp32 decode step, in one call.
 *
 * Why: the same kernels called one by one from Python cost ~10 calls per layer, each with
 * its argument conversions, stride checks and output tensor: at batch 1 that was ~1 ms of a
 * ~9 ms token, i.e. the difference between ~45% and ~50% of the memory roofline. This file
 * only sequences the existing kernels (skinny_gemm.c, quant_gemm.c, elementwise.c,
 * decode_attention.c) over every layer, with the caller's buffers; the math and its order
 * are exactly those of LlamaModel._layers_native (pdcore/model/llama.py), which remains the
 * path for bf16, tensor parallelism and other attention backends.
 *
 * Per layer: x = RMSNorm(h); qkv = x W_qkv^T (+b); RoPE on q and k; attention over the
 * paged KV cache (the step's k/v rows written into it); h += o W_o^T, x = RMSNorm(h);
 * h += down(silu(gate) * up), x = RMSNorm_next(h) (the last layer: h += down only, or with
 * `final_norm` x = the model's final RMSNorm(h) -- the LM head's input, one torch op and its
 * cache misses fewer per step).
 */
#include <stddef.h>
#include <stdint.h>

/* One linear layer: kind 0 quantized (pdcore_quant_gemm's `fmt`, `act_parts`), 1 fp32
 * packed [N/16][K][16], 2 bf16 packed (fp32 compute). Mirrored by native_cpu.CLinear. */
typedef struct {
    const void *w;
    const float *bias;
    int64_t n, k;
    int32_t kind, fmt, act_parts, pad;
} pd_linear;

/* One layer's weights and KV cache (flat [slots, kv_heads, head_dim] fp32). Mirrored by
 * native_cpu.CLayer. */
typedef struct {
    const float *input_norm, *post_norm;
    float *k_cache, *v_cache;
    pd_linear qkv, o, gate_up, down;
} pd_layer;

void pdcore_quant_gemm(const float *x, int64_t m, int64_t ldx, const uint8_t *packed, int fmt,
                       int act_parts, int prefill_bf16, const float *bias, int64_t n, int64_t k,
                       float *y, int64_t ldy, int threads);
void pdcore_f32_skinny_gemm(const float *x, int64_t m, int64_t ldx, const float *packed,
                            const float *bias, int64_t n, int64_t k, float *y, int64_t ldy,
                            int threads);
void pdcore_f32_bf16w_skinny_gemm(const float *x, int64_t m, int64_t ldx,
                                  const uint16_t *packed, const float *bias, int64_t n,
                                  int64_t k, float *y, int64_t ldy, int threads);
void pdcore_f32_rms_norm(float *x, const float *delta, const float *w, float *out, int64_t rows,
                         int64_t h, int64_t ldx, int64_t ldd, int64_t ldo, float eps);
void pdcore_f32_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t i_size,
                         int64_t ldg, int64_t ldo);
void pdcore_f32_rope(float *qkv, int64_t rows, int64_t ldq, int64_t heads, int64_t d,
                     const float *cos, const float *sin, const int64_t *positions);
void pdcore_f32_decode_attention(const float *q, int64_t ldq, const float *k_new, int64_t ldk,
                                 const float *v_new, int64_t ldv, float *kc, float *vc,
                                 const int64_t *slots, int64_t max_len, const int64_t *out_slots,
                                 const int64_t *lens, int64_t b, int64_t h, int64_t kvh,
                                 int64_t d, float scale, float *out, int threads);

/* y [t, n] = x [t, k] W^T (+ bias), both contiguous. */
static void linear(const pd_linear *l, const float *x, int64_t t, float *y, int threads) {
    if (l->kind == 0)
        pdcore_quant_gemm(x, t, l->k, (const uint8_t *)l->w, l->fmt, l->act_parts, 0, l->bias,
                          l->n, l->k, y, l->n, threads); /* decode rows: never the bf16 path */
    else if (l->kind == 1)
        pdcore_f32_skinny_gemm(x, t, l->k, (const float *)l->w, l->bias, l->n, l->k, y, l->n,
                               threads);
    else
        pdcore_f32_bf16w_skinny_gemm(x, t, l->k, (const uint16_t *)l->w, l->bias, l->n, l->k,
                                     y, l->n, threads);
}

/* hidden [t, h] (updated in place: the residual stream). The step: positions [t], the
 * attention's slot table [t, max_len], out_slots [t], lens [t] (all int64). Buffers,
 * contiguous fp32: x [t, h], qkv [t, qkv.n], attn [t, heads * d], o [t, h], gu
 * [t, gate_up.n], act [t, gate_up.n / 2], down [t, h]. */
void pdcore_f32_decode_layers(float *hidden, int64_t t, int64_t h, const pd_layer *layers,
                              int64_t n_layers, const float *cos, const float *sin,
                              const int64_t *positions, const int64_t *slots, int64_t max_len,
                              const int64_t *out_slots, const int64_t *lens, int64_t heads,
                              int64_t kv_heads, int64_t d, float scale, float eps,
                              const float *final_norm, float *x,
                              float *qkv, float *attn, float *o, float *gu, float *act,
                              float *down, int threads) {
    pdcore_f32_rms_norm(hidden, NULL, layers[0].input_norm, x, t, h, h, 0, h, eps);
    for (int64_t i = 0; i < n_layers; i++) {
        const pd_layer *l = &layers[i];
        const int64_t ldq = l->qkv.n, inter = l->gate_up.n / 2;
        linear(&l->qkv, x, t, qkv, threads);
        pdcore_f32_rope(qkv, t, ldq, heads + kv_heads, d, cos, sin, positions);
        pdcore_f32_decode_attention(qkv, ldq, qkv + heads * d, ldq, qkv + (heads + kv_heads) * d,
                                    ldq, l->k_cache, l->v_cache, slots, max_len, out_slots,
                                    lens, t, heads, kv_heads, d, scale, attn, threads);
        linear(&l->o, attn, t, o, threads);
        pdcore_f32_rms_norm(hidden, o, l->post_norm, x, t, h, h, h, h, eps);
        linear(&l->gate_up, x, t, gu, threads);
        pdcore_f32_silu_mul(gu, act, t, inter, l->gate_up.n, inter);
        linear(&l->down, act, t, down, threads);
        const float *next_norm = i + 1 < n_layers ? layers[i + 1].input_norm : final_norm;
        if (next_norm != NULL)
            pdcore_f32_rms_norm(hidden, down, next_norm, x, t, h, h, h, h, eps);
        else
            for (int64_t j = 0; j < t * h; j++) hidden[j] += down[j];
    }
}
