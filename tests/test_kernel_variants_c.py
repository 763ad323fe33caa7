"""The kernels' C, checked from a C harness against scalar references: natively for the
variants this CPU runs, and for the ARM64 NEON variant under qemu-aarch64 where a cross
compiler and qemu-user are installed (`apt-get install gcc-aarch64-linux-gnu qemu-user`).

The torch-side tests (test_native_cpu.py) cover the variants the CPU runs through ctypes;
this one exists so that a variant no local CPU runs is still executed, not only compiled.
The quantized GEMM (Q4 / Q8 blocks with fp16 scales, subnormal ones included; int8 per
channel) is checked here the same way.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pdcore.model import native_cpu

HARNESS = r"""
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void pdcore_f32_skinny_gemm(const float *, int64_t, int64_t, const float *, const float *,
                            int64_t, int64_t, float *, int64_t, int);
void pdcore_bf16_skinny_gemm(const uint16_t *, int64_t, int64_t, const uint16_t *,
                             const uint16_t *, int64_t, int64_t, uint16_t *, int64_t, int);
void pdcore_f32_bf16w_skinny_gemm(const float *, int64_t, int64_t, const uint16_t *,
                                  const float *, int64_t, int64_t, float *, int64_t, int);
void pdcore_f32_rms_norm(float *, const float *, const float *, float *, int64_t, int64_t,
                         int64_t, int64_t, int64_t, float);
void pdcore_f32_silu_mul(const float *, float *, int64_t, int64_t, int64_t, int64_t);
void pdcore_f32_rope(float *, int64_t, int64_t, int64_t, int64_t, const float *,
                     const float *, const int64_t *);
void pdcore_f32_decode_attention(const float *, int64_t, const float *, int64_t,
                                 const float *, int64_t, float *, float *, const int64_t *,
                                 int64_t, const int64_t *, const int64_t *, int64_t, int64_t,
                                 int64_t, int64_t, float, float *, int);
void pdcore_quant_gemm(const float *, int64_t, int64_t, const uint8_t *, int, int, int,
                       const float *, int64_t, int64_t, float *, int64_t, int);
void pdcore_f32_extend_attention(const float *, int64_t, const float *, const float *,
                                 const int64_t *, const int64_t *, int64_t, int64_t, int64_t,
                                 int64_t, float, float *, int);

static uint64_t seed = 42;
static float rnd(void) {
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((seed >> 40) & 0xFFFFFF) / (float)0x800000 - 1.0f;
}
static float *frand(int64_t n) {
    float *p = malloc(sizeof(float) * n + 64);
    for (int64_t i = 0; i < n; i++) p[i] = rnd();
    return p;
}
static uint16_t bf(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
static float fb(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static double worst = 0;
static void track(const char *what, double err, double scale) {
    double rel = err / (scale > 0 ? scale : 1);
    if (rel > worst) worst = rel;
    printf("%s %.3g\n", what, rel);
}

static void gemm_case(int64_t m, int64_t n, int64_t k) {
    int64_t nb = (n + 15) / 16;
    float *x = frand(m * k), *w = frand(n * k), *bias = frand(n);
    float *pk = calloc(nb * k * 16, sizeof(float));
    uint16_t *pkb = calloc(nb * k * 16, 2), *xb = malloc(2 * m * k), *bb = malloc(2 * n);
    for (int64_t r = 0; r < n; r++)
        for (int64_t c = 0; c < k; c++) {
            w[r * k + c] = fb(bf(w[r * k + c])); /* bf16-exact weights: one reference */
            pk[(r / 16) * k * 16 + c * 16 + r % 16] = w[r * k + c];
            pkb[(r / 16) * k * 16 + c * 16 + r % 16] = bf(w[r * k + c]);
        }
    for (int64_t i = 0; i < m * k; i++) xb[i] = bf(x[i]);
    for (int64_t i = 0; i < n; i++) bb[i] = bf(bias[i]);
    float *y = malloc(4 * m * n), *yw = malloc(4 * m * n);
    uint16_t *yb = malloc(2 * m * n);
    pdcore_f32_skinny_gemm(x, m, k, pk, bias, n, k, y, n, 2);
    pdcore_f32_bf16w_skinny_gemm(x, m, k, pkb, bias, n, k, yw, n, 2);
    pdcore_bf16_skinny_gemm(xb, m, k, pkb, bb, n, k, yb, n, 2);
    double e32 = 0, ew = 0, eb = 0, s = 0, sb = 0;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            double ref = bias[j], refb = fb(bb[j]);
            for (int64_t c = 0; c < k; c++) {
                ref += (double)x[i * k + c] * w[j * k + c];
                refb += (double)fb(xb[i * k + c]) * w[j * k + c];
            }
            e32 = fmax(e32, fabs(y[i * n + j] - ref));
            ew = fmax(ew, fabs(yw[i * n + j] - ref));
            eb = fmax(eb, fabs(fb(yb[i * n + j]) - refb));
            s = fmax(s, fabs(ref));
            sb = fmax(sb, fabs(refb));
        }
    char name[64];
    snprintf(name, sizeof name, "gemm_f32_m%ld_n%ld_k%ld", (long)m, (long)n, (long)k);
    track(name, e32, s);
    snprintf(name, sizeof name, "gemm_bf16w_m%ld_n%ld_k%ld", (long)m, (long)n, (long)k);
    track(name, ew, s);
    snprintf(name, sizeof name, "gemmbf16_m%ld_n%ld_k%ld", (long)m, (long)n, (long)k);
    printf("%s %.3g\n", name, eb / sb); /* bf16 output: checked with its own tolerance */
}

static uint32_t rbits(void) {
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(seed >> 33);
}
static float h2f(uint16_t h) { /* fp16 -> fp32, finite values */
    int e = (h >> 10) & 31, mt = h & 1023;
    float v = e ? ldexpf((float)(1024 + mt), e - 25) : ldexpf((float)mt, -24);
    return (h & 0x8000) ? -v : v;
}
static uint16_t rand_f16(void) { /* normal scales in [2^-8, 2^0), 1 in 8 subnormal */
    uint32_t r = rbits();
    uint16_t e = (r & 7) == 0 ? 0 : (uint16_t)(7 + (r >> 3) % 8);
    return (uint16_t)(((r >> 8) & 1) << 15 | e << 10 | ((r >> 9) & 1023));
}

/* Quantized GEMM (fmt 0: Q4 d/m per block, 1: Q8 d per block, 2: int8 per channel) against
 * the weights it encodes, in double. Q4/Q8 quantize x per 32-k block into `parts` int8
 * parts (kernels/quant_gemm.c); the reference rounds x the same way (the same float ops),
 * so only fp32 summation differs. */
static void quant_x(const float *x, int64_t k, int parts, double *xh) {
    for (int64_t b = 0; b < k / 32; b++) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f, dx = amax / 127.0f;
        for (int j = 0; j < 32; j++) {
            const float v = x[b * 32 + j] * id, r = nearbyintf(v);
            const float r2 = parts == 2 ? nearbyintf((v - r) * 254.0f) : 0.0f;
            xh[b * 32 + j] = (double)dx * ((double)r + (double)r2 / 254.0);
        }
    }
}
static void quant_case(int fmt, int parts, int64_t m, int64_t n, int64_t k) {
    const int64_t panels = (n + 15) / 16, nb = k / 32, gbb = fmt == 0 ? 160 : 272;
    const int64_t pb = fmt == 0 ? nb * 320 : fmt == 1 ? nb * 544 : 64 + 16 * k;
    uint8_t *pk = calloc(panels * pb, 1);
    /* w = wd + wm: wd meets the quantized x, wm (Q4's m) the exact x */
    double *wd = calloc(n * k, sizeof(double)), *wm = calloc(n * k, sizeof(double));
    float *x = frand(m * k), *bias = frand(n);
    for (int64_t r = 0; r < n; r++) {
        uint8_t *pan = pk + (r / 16) * pb;
        const int lane = (int)(r % 16), g = lane / 8, rr = lane % 8;
        if (fmt == 2) {
            float s = rnd() * 0.01f;
            memcpy(pan + lane * 4, &s, 4);
            for (int64_t c = 0; c < k; c++) {
                int8_t q = (int8_t)(rbits() % 255 - 127);
                pan[64 + c * 16 + lane] = (uint8_t)q;
                wd[r * k + c] = (double)(s * q);
            }
            continue;
        }
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *blk = pan + (g * nb + b) * gbb;
            uint16_t d = rand_f16(), mn = rand_f16();
            memcpy(blk + rr * 2, &d, 2);
            double *wdr = wd + r * k + b * 32, *wmr = wm + r * k + b * 32;
            if (fmt == 0) {
                memcpy(blk + 16 + rr * 2, &mn, 2);
                for (int j = 0; j < 16; j++) {
                    uint8_t byte = (uint8_t)rbits();
                    blk[32 + (j / 4) * 32 + rr * 4 + j % 4] = byte;
                    wdr[j] = (double)h2f(d) * (byte & 15);
                    wdr[j + 16] = (double)h2f(d) * (byte >> 4);
                    wmr[j] = wmr[j + 16] = h2f(mn);
                }
            } else {
                for (int j = 0; j < 32; j++) {
                    int8_t q = (int8_t)rbits();
                    blk[16 + (j / 4) * 32 + rr * 4 + j % 4] = (uint8_t)q;
                    wdr[j] = (double)h2f(d) * q;
                }
            }
        }
    }
    float *y = malloc(4 * m * n);
    double *xh = malloc(sizeof(double) * k);
    pdcore_quant_gemm(x, m, k, pk, fmt, parts, 0, bias, n, k, y, n, 2);
    double e = 0, sc = 0;
    for (int64_t i = 0; i < m; i++) {
        if (fmt == 2 || m > 32) /* int8, and prefill sizes (panel_gemm.c): fp32 x */
            for (int64_t c = 0; c < k; c++) xh[c] = x[i * k + c];
        else
            quant_x(x + i * k, k, parts, xh);
        for (int64_t j = 0; j < n; j++) {
            double ref = bias[j], mag = fabs(bias[j]);
            for (int64_t c = 0; c < k; c++) {
                ref += xh[c] * wd[j * k + c] + (double)x[i * k + c] * wm[j * k + c];
                mag += fabs(xh[c] * wd[j * k + c]) + fabs((double)x[i * k + c] * wm[j * k + c]);
            }
            e = fmax(e, fabs(y[i * n + j] - ref));
            sc = fmax(sc, mag);
        }
    }
    char name[64];
    snprintf(name, sizeof name, "quant%d_p%d_m%ld_n%ld_k%ld", fmt, parts, (long)m, (long)n,
             (long)k);
    track(name, e, sc);
    free(pk), free(wd), free(wm), free(x), free(bias), free(y), free(xh);
}

static void elementwise(void) {
    const int64_t rows = 3, h = 64;
    float *x = frand(rows * h), *d = frand(rows * h), *w = frand(h), *out = malloc(4 * rows * h);
    float *x0 = malloc(4 * rows * h);
    memcpy(x0, x, 4 * rows * h);
    pdcore_f32_rms_norm(x, d, w, out, rows, h, h, h, h, 1e-5f);
    double e = 0;
    for (int64_t r = 0; r < rows; r++) {
        double ss = 0;
        for (int64_t i = 0; i < h; i++) {
            double v = (double)x0[r * h + i] + d[r * h + i];
            ss += v * v;
        }
        double inv = 1.0 / sqrt(ss / h + 1e-5);
        for (int64_t i = 0; i < h; i++) {
            double v = (double)x0[r * h + i] + d[r * h + i];
            e = fmax(e, fabs(out[r * h + i] - v * inv * w[i]) / 4);
        }
    }
    track("rms_norm", e, 1);
    float *gu = frand(rows * 2 * h), *o = malloc(4 * rows * h);
    for (int64_t i = 0; i < rows * 2 * h; i++) gu[i] *= 12;
    pdcore_f32_silu_mul(gu, o, rows, h, 2 * h, h);
    e = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < h; i++) {
            double g = gu[r * 2 * h + i], u = gu[r * 2 * h + h + i];
            e = fmax(e, fabs(o[r * h + i] - g / (1 + exp(-g)) * u) / 144);
        }
    track("silu_mul", e, 1);
    const int64_t dim = 64, heads = 3, maxpos = 8;
    float *qkv = frand(rows * heads * dim), *q0 = malloc(4 * rows * heads * dim);
    float *cs = frand(maxpos * dim), *sn = frand(maxpos * dim);
    int64_t pos[3] = {0, 5, 7};
    memcpy(q0, qkv, 4 * rows * heads * dim);
    pdcore_f32_rope(qkv, rows, heads * dim, heads, dim, cs, sn, pos);
    e = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t hd = 0; hd < heads; hd++)
            for (int64_t i = 0; i < dim; i++) {
                const float *xv = q0 + r * heads * dim + hd * dim;
                double rot = i < dim / 2 ? -xv[i + dim / 2] : xv[i - dim / 2];
                double ref = xv[i] * cs[pos[r] * dim + i] + rot * sn[pos[r] * dim + i];
                e = fmax(e, fabs(qkv[r * heads * dim + hd * dim + i] - ref));
            }
    track("rope", e, 2);
}

static void attention(int64_t h, int64_t kvh, int64_t d) {
    const int64_t b = 5, max_len = 70, slots_total = 5 * 70;
    int64_t lens[5] = {1, 16, 17, 33, 70};
    float *kc = frand(slots_total * kvh * d), *vc = frand(slots_total * kvh * d);
    float *q = frand(b * h * d), *kn = frand(b * kvh * d), *vn = frand(b * kvh * d);
    int64_t *slots = malloc(8 * b * max_len), out_slots[5];
    for (int64_t s = 0; s < b; s++) {
        for (int64_t t = 0; t < max_len; t++) slots[s * max_len + t] = (s * 61 + t * 7) % slots_total;
        for (int64_t t = 0; t < lens[s]; t++) /* distinct slots per sequence */
            slots[s * max_len + t] = s * max_len + t;
        out_slots[s] = slots[s * max_len + lens[s] - 1];
    }
    float *out = malloc(4 * b * h * d);
    pdcore_f32_decode_attention(q, h * d, kn, kvh * d, vn, kvh * d, kc, vc, slots, max_len,
                                out_slots, lens, b, h, kvh, d, 1.0f / sqrtf((float)d), out, 2);
    double e = 0;
    double *sc = malloc(8 * max_len);
    for (int64_t s = 0; s < b; s++)
        for (int64_t hh = 0; hh < h; hh++) {
            int64_t kh = hh / (h / kvh);
            double mx = -1e300, sum = 0;
            for (int64_t t = 0; t < lens[s]; t++) {
                const float *kr = kc + (slots[s * max_len + t] * kvh + kh) * d;
                double dot = 0;
                for (int64_t c = 0; c < d; c++) dot += (double)q[(s * h + hh) * d + c] * kr[c];
                sc[t] = dot / sqrt((double)d);
                mx = fmax(mx, sc[t]);
            }
            for (int64_t t = 0; t < lens[s]; t++) sum += (sc[t] = exp(sc[t] - mx));
            for (int64_t c = 0; c < d; c++) {
                double acc = 0;
                for (int64_t t = 0; t < lens[s]; t++)
                    acc += sc[t] * vc[(slots[s * max_len + t] * kvh + kh) * d + c];
                e = fmax(e, fabs(out[(s * h + hh) * d + c] - acc / sum));
            }
        }
    char name[64];
    snprintf(name, sizeof name, "attention_h%ld_kvh%ld_d%ld", (long)h, (long)kvh, (long)d);
    track(name, e, 1);
}

/* Prefill attention: sequences with and without a cached prefix, query blocks and key
 * chunks ending mid-way, slots scattered over the pool; against a double reference. */
static void extend_attention(int64_t h, int64_t kvh, int64_t d) {
    enum { NS = 4 };
    const int64_t prefix[NS] = {0, 3, 70, 0}, ext[NS] = {1, 40, 65, 130};
    int64_t seqs[NS * 4], total_q = 0, total_k = 0;
    for (int s = 0; s < NS; s++) {
        seqs[s * 4] = total_q, seqs[s * 4 + 1] = ext[s], seqs[s * 4 + 2] = prefix[s] + ext[s];
        seqs[s * 4 + 3] = total_k;
        total_q += ext[s], total_k += prefix[s] + ext[s];
    }
    const int64_t pool = total_k + 17;
    float *kc = frand(pool * kvh * d), *vc = frand(pool * kvh * d), *q = frand(total_q * h * d);
    int64_t *slots = malloc(8 * total_k);
    for (int64_t i = 0; i < total_k; i++) slots[i] = (i * 37 + 11) % pool; /* 37 coprime */
    float *out = malloc(4 * total_q * h * d);
    const float scale = 1.0f / sqrtf((float)d);
    pdcore_f32_extend_attention(q, h * d, kc, vc, slots, seqs, NS, h, kvh, d, scale, out, 2);
    double e = 0, *sc = malloc(8 * total_k);
    for (int s = 0; s < NS; s++)
        for (int64_t r = 0; r < ext[s]; r++)
            for (int64_t hh = 0; hh < h; hh++) {
                const int64_t kh = hh / (h / kvh), keys = prefix[s] + r + 1, row = seqs[s * 4] + r;
                const int64_t *sl = slots + seqs[s * 4 + 3];
                double mx = -1e300, sum = 0;
                for (int64_t t = 0; t < keys; t++) {
                    double dot = 0;
                    for (int64_t c = 0; c < d; c++)
                        dot += (double)q[(row * h + hh) * d + c] * kc[(sl[t] * kvh + kh) * d + c];
                    sc[t] = dot * scale;
                    mx = fmax(mx, sc[t]);
                }
                for (int64_t t = 0; t < keys; t++) sum += (sc[t] = exp(sc[t] - mx));
                for (int64_t c = 0; c < d; c++) {
                    double acc = 0;
                    for (int64_t t = 0; t < keys; t++) acc += sc[t] * vc[(sl[t] * kvh + kh) * d + c];
                    e = fmax(e, fabs(out[(row * h + hh) * d + c] - acc / sum));
                }
            }
    char name[64];
    snprintf(name, sizeof name, "extend_attention_h%ld_kvh%ld_d%ld", (long)h, (long)kvh, (long)d);
    track(name, e, 1);
    free(kc), free(vc), free(q), free(slots), free(out), free(sc);
}

int main(void) {
    int64_t shapes[][3] = {{1, 96, 64}, {5, 17, 33}, {7, 80, 577}, {13, 33, 16}, {32, 200, 96}};
    for (int i = 0; i < 5; i++) gemm_case(shapes[i][0], shapes[i][1], shapes[i][2]);
    /* decode sizes, then prefill sizes (above 32 rows): ragged N (one and two 16-wide
     * panels per tile), several K chunks and row blocks */
    int64_t qshapes[][3] = {{1, 17, 64},   {2, 16, 96},   {3, 33, 576},  {5, 40, 128},
                            {9, 7, 32},    {33, 20, 64},  {40, 40, 576}, {100, 7, 96},
                            {130, 200, 1056}, {37, 20, 320}};
    for (int fmt = 0; fmt < 3; fmt++)
        for (int parts = 1; parts <= 2; parts++)
            for (int i = 0; i < 10; i++)
                quant_case(fmt, parts, qshapes[i][0], qshapes[i][1], qshapes[i][2]);
    elementwise();
    attention(9, 3, 64);
    attention(8, 8, 128);
    attention(4, 1, 256);
    extend_attention(9, 3, 64);
    extend_attention(4, 4, 128);
    extend_attention(6, 1, 48);
    printf("worst %.3g\n", worst);
    return 0;
}
"""


def _run_harness(
    tmp_path: Path, isa: str, cc: str, runner: list[str], extra_flags: tuple[str, ...] = ()
) -> dict[str, float]:
    so = tmp_path / f"{isa}.so"
    native_cpu.compile_variant(isa, so, cc=cc, extra_flags=extra_flags)
    src = tmp_path / "harness.c"
    src.write_text(HARNESS)
    exe = tmp_path / f"harness-{isa}"
    subprocess.run(
        [cc, "-O1", str(src), str(so), f"-Wl,-rpath,{tmp_path}", "-lm", "-fopenmp", "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([*runner, str(exe)], check=True, capture_output=True, text=True)
    results = {}
    for line in out.stdout.splitlines():
        name, value = line.split()
        results[name] = float(value)
    return results


def _check(results: dict[str, float]) -> None:
    assert results["worst"] < 1e-5, results  # fp32 kernels: fp32 rounding only
    for name, value in results.items():
        if name.startswith("gemmbf16"):
            assert value < 1e-2, (name, value)  # bf16 output: a few bf16 ulps


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512bf16"])
def test_x86_variant_in_c_harness(isa: str, tmp_path: Path) -> None:
    if isa not in native_cpu.supported_variants():
        pytest.skip(f"this CPU lacks {native_cpu._missing(isa)}")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    _check(_run_harness(tmp_path, isa, cc, []))


@pytest.mark.parametrize(
    "flags", [("-DPDCORE_VW=16",), ("-DPDCORE_VW=4",), ("-DPDCORE_VW=4", "-DPDCORE_GENERIC_DOT")]
)
def test_other_vector_widths_on_avx2(flags: tuple[str, ...], tmp_path: Path) -> None:
    """The 16-lane code the AVX512 variants run (and the 4-lane code of NEON/SSE), built with
    AVX2 instructions, so a width bug shows on any AVX2 machine -- only the two per-ISA
    bf16 intrinsics of the AVX512 builds are left to an AVX512 CPU. PDCORE_GENERIC_DOT: the
    quantized GEMM's int8 dot products in generic C (what NEON and SSE builds run)."""
    if "avx2" not in native_cpu.supported_variants():
        pytest.skip(f"this CPU lacks {native_cpu._missing('avx2')}")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    _check(_run_harness(tmp_path, "avx2", cc, [], flags))


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (gcc-aarch64-linux-gnu, qemu-user)",
)
def test_neon_variant_runs_under_qemu(tmp_path: Path) -> None:
    results = _run_harness(
        tmp_path, "neon", "aarch64-linux-gnu-gcc", ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]
    )
    _check(results)
