"""The quantized GEMM (kernels/quant_gemm.c) for every ISA variant this CPU runs, against
dequantize-then-matmul: GGUF Q4_0 / Q4_1 / Q8_0 blocks (quantized by the gguf package, the
reference dequantizer the loader uses) and int8 per channel; edge shapes (K not a multiple
of 256, odd N, 1..33 rows: the fused decode tiles, the dequantized-panel path and the
prefill path). At decode sizes the GGUF formats quantize the activations per block (one or
two int8 parts): checked against the bound that rounding allows. Plus the --quantization
flag's checks. Variants the CPU lacks are skipped
with the missing features named."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from pdcore.model import native_cpu
from pdcore.model.quantization_flags import (
    gguf_activations_problem,
    quantization_problem,
    quantized_prefill_dtype_problem,
)
from pdcore.model.quantized import (
    GGUFRows,
    QuantLinear,
    pack_gguf,
    quantize_int8,
)
from tests.test_native_cpu import ISAS

GGUF_TYPES = ["Q4_0", "Q4_1", "Q8_0"]
SHAPES = [(1, 32), (17, 96), (33, 576), (49, 1056)]  # (N, K): odd N, K % 256 != 0
ROWS = [1, 2, 3, 4, 5, 8, 9, 13, 31, 32, 33, 130]


def kern(isa: str) -> native_cpu.Kernels:
    k = native_cpu.kernels(torch.float32, isa)
    assert k is not None, f"{isa} is supported here but failed to build (see the log)"
    return k


def gguf_weight(kind: str, n: int, k: int, seed: int) -> tuple[GGUFRows, torch.Tensor]:
    """Random weights in GGUF blocks, and the gguf package's dequantization of them."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2, (n, 1))).astype(np.float32)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    blocks = gguf.quants.quantize(w, qtype)
    ref = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks, qtype)))
    return GGUFRows(kind, blocks, k), ref.float()


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    want = x.double() @ w.double().T + (0 if bias is None else bias.double())
    # Relative to the sum of |products| (not to |result|, which may cancel to near zero):
    # fp32 accumulation over K terms stays below K * eps of it; a wrong block, scale or
    # nibble order is >= 1e-3.
    scale = (x.double().abs() @ w.double().abs().T).max()
    err = ((y.double() - want).abs().max() / scale).item()
    assert err < 1e-5, err


def block_offsets(rows: GGUFRows) -> torch.Tensor:
    """[N, K]: each weight's block offset m (w = d * q + m; Q4_0: m = -8d; Q8_0: 0)."""
    n, nb = rows.data.shape[0], rows.k // 32
    blocks = np.ascontiguousarray(rows.data).reshape(n, nb, -1)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if rows.type_name == "Q4_1":
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:
        m = -8 * d if rows.type_name == "Q4_0" else np.zeros_like(d)
    return torch.from_numpy(np.repeat(m, 32, axis=1))


def check_act_quant(
    y: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    parts: int,
    offsets: torch.Tensor | None = None,
) -> None:
    """The GGUF path at decode sizes quantizes x per 32-k block (kernels/quant_gemm.c): each
    element is off by at most amax / 127 / 2 (one part) or amax / 127 / 508 (two) and meets
    the d * q part of each weight (the m part takes the exact sum of x), so y is off by at
    most sum_k |w - m| * that, plus fp32 rounding. A wrong block, scale, nibble or row is
    off by about |w| * |x| -- thousands of times the bound with two parts."""
    m, k = x.shape
    want = x.double() @ w.double().T + (0 if bias is None else bias.double())
    wd = w.double() - (0 if offsets is None else offsets.double())
    amax = x.double().abs().view(m, k // 32, 32).amax(-1, keepdim=True).expand(m, k // 32, 32)
    step = (amax / 127).reshape(m, k)
    per_elem = step * (0.5 if parts == 1 else 0.5 / 254 + 1e-5)
    bound = per_elem @ wd.abs().T + 2e-6 * (x.double().abs() @ (wd.abs() + w.double().abs()).T)
    assert ((y.double() - want).abs() <= bound * 1.001 + 1e-30).all(), (
        (y.double() - want).abs() / bound
    ).max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", GGUF_TYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_gguf_gemm_matches_dequantize_then_matmul(isa: str, kind: str, n: int, k: int) -> None:
    rows, w = gguf_weight(kind, n, k, seed=n * k)
    qw = pack_gguf(rows)
    assert qw.nbytes == ((n + 15) // 16 * 16) * k // 32 * (34 if kind == "Q8_0" else 20)
    lin = QuantLinear(qw, None, kern(isa))
    assert torch.equal(lin.dequantize(), w)  # the weights are rebuilt bit for bit
    bias = torch.randn(n)
    lin_b = QuantLinear(qw, bias, kern(isa))
    for m in ROWS:
        x = torch.randn(m, k)
        if m <= native_cpu.MAX_ROWS:  # decode sizes: quantized activations, two parts
            check_act_quant(lin(x), x, w, None, 2, block_offsets(rows))
            check_act_quant(lin_b(x), x, w, bias, 2, block_offsets(rows))
        else:  # prefill sizes: the dequantized weights, fp32 activations
            check(lin(x), x, w, None)
            check(lin_b(x), x, w, bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", GGUF_TYPES)
def test_gguf_gemm_one_part_activations(isa: str, kind: str) -> None:
    """llama.cpp's int8 activations (act_parts=1): within half an int8 step per element."""
    n, k = 49, 1056
    rows, w = gguf_weight(kind, n, k, seed=7)
    qw = pack_gguf(rows)
    bias = torch.randn(n)
    for m in (1, 4, 5, 32):
        x = torch.randn(m, k)
        x[:, 5] *= 30  # an outlier: its blocks' steps are coarse, the others' fine
        y = kern(isa).quant_gemm(x, qw.packed, qw.fmt, n, k, bias, act_parts=1)
        check_act_quant(y, x, w, bias, 1, block_offsets(rows))
        y2 = kern(isa).quant_gemm(x, qw.packed, qw.fmt, n, k, bias, act_parts=2)
        check_act_quant(y2, x, w, bias, 2, block_offsets(rows))


def test_gguf_zero_and_tiny_activation_blocks() -> None:
    """A block of zeros (scale 0) contributes its m term only; subnormal-sized x works."""
    k = native_cpu.kernels(torch.float32)
    if k is None:
        pytest.skip(f"no kernels here: {native_cpu.describe()}")
    rows, w = gguf_weight("Q4_1", 24, 96, seed=5)
    lin = QuantLinear(pack_gguf(rows), None, k)
    x = torch.randn(3, 96)
    x[0, :32] = 0
    x[1] = 1e-38
    x[2, 32:64] = 0
    check_act_quant(lin(x), x, w, None, 2, block_offsets(rows))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k", [(1, 7), (17, 96), (33, 577), (49, 1056)])
def test_int8_gemm_matches_dequantize_then_matmul(isa: str, n: int, k: int) -> None:
    w = torch.randn(n, k) * torch.rand(n, 1)
    qw = quantize_int8(w)
    lin = QuantLinear(qw, torch.randn(n), kern(isa))
    wq = lin.dequantize()
    assert (wq - w).abs().max() <= w.abs().amax() / 254 * 1.0001  # half a step per channel
    for m in ROWS:
        x = torch.randn(m, k)
        check(lin(x), x, wq, lin.bias)


@pytest.mark.parametrize("isa", ISAS)
def test_strided_rows_and_bf16_activations(isa: str) -> None:
    rows, w = gguf_weight("Q4_1", 40, 128, seed=3)
    lin = QuantLinear(pack_gguf(rows), None, kern(isa))
    wide = torch.randn(5, 200)
    check_act_quant(lin(wide[:, :128]), wide[:, :128], w, None, 2, block_offsets(rows))
    xb = torch.randn(3, 128).to(torch.bfloat16)
    y = lin(xb)
    assert y.dtype == torch.bfloat16
    want = (xb.float() @ w.T).to(torch.bfloat16)
    assert torch.allclose(y.float(), want.float(), rtol=1e-2, atol=1e-2)


def check_bf16(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """The bf16 prefill GEMM: x and w rounded to bf16 (nearest even), products summed in
    fp32 -- within fp32 rounding of that reference. A wrong pair order, panel or rounding
    mode is off by >= 1e-4 of the |products|."""
    xb, wb = x.bfloat16().double(), w.bfloat16().double()
    want = xb @ wb.T + (0 if bias is None else bias.double())
    scale = (xb.abs() @ wb.abs().T).max()
    err = ((y.double() - want).abs().max() / scale).item()
    assert err < 1e-5, err


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("kind", "n", "k"),
    [(t, n, k) for t in GGUF_TYPES for n, k in ((17, 96), (49, 1056))]
    + [("int8", 33, 578), ("int8", 40, 577), ("int8", 49, 1056)],
)
def test_prefill_bf16_matches_bf16_rounded_reference(isa: str, kind: str, n: int, k: int) -> None:
    """--quantized-prefill-dtype bfloat16 (kernels with `bf16_prefill`: AVX512-BF16) over
    prefill sizes: ragged N, K over one chunk (1056), and for int8 an odd K, which keeps
    fp32 (no whole k pairs). Kernels without bf16 dot products ignore the request: their
    result is the fp32 one, bit for bit."""
    if kind == "int8":
        w = torch.randn(n, k) * torch.rand(n, 1)
        lin = QuantLinear(quantize_int8(w), torch.randn(n), kern(isa))
    else:
        rows, _ = gguf_weight(kind, n, k, seed=n + k)
        lin = QuantLinear(pack_gguf(rows), torch.randn(n), kern(isa))
    wq = lin.dequantize()
    fast = QuantLinear(lin.weight, lin.bias, kern(isa), prefill_bf16=True)
    for m in (33, 130):
        x = torch.randn(m, k)
        x[:, 3] *= 50  # a large feature: bf16 rounds relative to each value
        y = fast(x)
        if kern(isa).bf16_prefill and k % 2 == 0:
            check_bf16(y, x, wq, lin.bias)
            with pytest.raises(AssertionError):  # the bf16 rounding is visible
                check(y, x, wq, lin.bias)
        else:
            assert torch.equal(y, lin(x))
    x = torch.randn(32, k)  # decode sizes never take the bf16 path
    assert torch.equal(fast(x), lin(x))


def test_q4_0_padding_rows_are_zero() -> None:
    rows, _ = gguf_weight("Q4_0", 3, 64, seed=1)
    packed = pack_gguf(rows).packed.numpy().reshape(2, 2, 160)  # 2 groups of 8 rows x 2 blocks
    d = packed[:, :, :16].view(np.float16)  # [group, block, row]
    assert (d[0, :, 3:] == 0).all() and (d[1] == 0).all() and (d[0, :, :3] != 0).any()


@pytest.mark.parametrize(
    ("method", "model", "device", "tp", "needle"),
    [
        ("gguf", "/some/hf-folder", "cpu", 1, "needs a .gguf model file"),
        ("int8", None, "cuda", 1, "CPU only"),
        ("gguf", "m.gguf", "cpu", 2, "--tp-size"),
        ("fp4", None, "cpu", 1, "unknown method"),
    ],
)
def test_quantization_problems(
    method: str, model: str | None, device: str, tp: int, needle: str
) -> None:
    why = quantization_problem(method, model, device, tp)
    assert why is not None and needle in why


def test_quantization_ok_combinations() -> None:
    for method in ("auto", "none"):
        assert quantization_problem(method, "/folder", "cuda", 4) is None
    assert quantization_problem("gguf", None, "auto", 1) is None
    assert quantization_problem("w8a16", "/folder", "cpu", 1) is None


def test_cli_names_the_flag(capsys: pytest.CaptureFixture[str], tiny_llama_dir) -> None:
    from pdcore.settings import parse_serve_args

    with pytest.raises(SystemExit):
        parse_serve_args(["--model", str(tiny_llama_dir), "--quantization", "gguf"])
    err = capsys.readouterr().err
    assert "--quantization" in err and "gguf" in err


@pytest.mark.parametrize(
    ("choice", "method", "model", "needle"),
    [
        ("int8", "none", None, "--quantization none"),
        ("int8", "int8", "m.gguf", "--quantization int8"),
        ("int8", "auto", "/some/hf-folder", "not one"),
        ("int4", "auto", None, "unknown value"),
    ],
)
def test_gguf_activations_problems(
    choice: str, method: str, model: str | None, needle: str
) -> None:
    why = gguf_activations_problem(choice, method, model, "auto", 1)
    assert why is not None and needle in why


def test_gguf_activations_refused_where_auto_dequantizes() -> None:
    """auto dequantizes on a GPU or with TP, so int8 activations there would be ignored."""
    for device, tp in (("cuda", 1), ("cpu", 2)):
        why = gguf_activations_problem("int8", "auto", None, device, tp)
        assert why is not None and "one rank" in why


def test_gguf_activations_ok() -> None:
    assert gguf_activations_problem("int16", "none", "/folder", "cuda", 2) is None  # default
    assert gguf_activations_problem("int8", "auto", None, "auto", 1) is None  # the default GGUF
    assert gguf_activations_problem("int8", "gguf", "m.gguf", "cpu", 1) is None


def test_gguf_activations_cli_names_the_flag(
    capsys: pytest.CaptureFixture[str], tiny_llama_dir
) -> None:
    from pdcore.settings import parse_serve_args

    with pytest.raises(SystemExit):
        parse_serve_args(["--model", str(tiny_llama_dir), "--gguf-activations", "int8"])
    err = capsys.readouterr().err
    assert "--gguf-activations" in err and "int8" in err


def test_gguf_activations_ignored_at_load_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """What only the load can know (e.g. a CPU without kernels) is said in the log."""
    import logging

    from pdcore.model.quantized import load_quantized

    with caplog.at_level(logging.WARNING, logger="pdcore.model.quantized"):
        assert load_quantized("none", "m.gguf", None, torch.device("cpu"), 1, "int8") is None  # type: ignore[arg-type]
    assert "--gguf-activations int8 has no effect" in caplog.text


def test_auto_dtype_is_fp32_where_weights_stay_quantized(
    monkeypatch: pytest.MonkeyPatch, tiny_llama_dir
) -> None:
    """On a CPU that computes bf16, --dtype auto is still fp32 when the linear weights stay
    quantized (the quantized kernels compute fp32); bf16 for a dense model there."""
    from pdcore.engine import setup
    from pdcore.model.loader import default_model_path

    cpu = torch.device("cpu")
    monkeypatch.setattr(setup, "cpu_computes_bf16", lambda: True)
    assert setup.pick_dtype("auto", cpu, keeps_quantized=True) == torch.float32
    assert setup.pick_dtype("auto", cpu) == torch.bfloat16
    assert setup.pick_dtype("bfloat16", cpu, keeps_quantized=True) == torch.bfloat16
    gguf_file = str(default_model_path())
    has_kernels = native_cpu.kernels(torch.float32) is not None
    assert setup.weights_stay_quantized("auto", "auto", gguf_file, cpu, 1) == has_kernels
    assert setup.weights_stay_quantized("auto", "int8", str(tiny_llama_dir), cpu, 1) == has_kernels
    assert not setup.weights_stay_quantized("auto", "auto", str(tiny_llama_dir), cpu, 1)
    assert not setup.weights_stay_quantized("auto", "none", gguf_file, cpu, 1)
    assert not setup.weights_stay_quantized("float32", "auto", gguf_file, cpu, 1)
    assert not setup.weights_stay_quantized("auto", "auto", gguf_file, cpu, 2)


@pytest.mark.parametrize(
    ("choice", "method", "model", "device", "needle"),
    [
        ("float32", "none", None, "auto", "--quantization none"),
        ("bfloat16", "auto", "/some/hf-folder", "auto", "--quantization auto"),
        ("float32", "auto", None, "cuda", "one rank"),
        ("float16", "auto", None, "auto", "unknown value"),
    ],
)
def test_quantized_prefill_dtype_problems(
    choice: str, method: str, model: str | None, device: str, needle: str
) -> None:
    why = quantized_prefill_dtype_problem(choice, method, model, device, 1)
    assert why is not None and needle in why


def test_quantized_prefill_bf16_needs_bf16_dot_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 is refused where the CPU would emulate it, accepted where it has AVX512-BF16;
    auto and float32 everywhere weights stay quantized."""
    from pdcore.model import quantization_flags

    monkeypatch.setattr(quantization_flags, "cpu_features", lambda: frozenset({"avx2", "fma"}))
    why = quantized_prefill_dtype_problem("bfloat16", "auto", None, "auto", 1)
    assert why is not None and "avx512_bf16" in why
    assert quantized_prefill_dtype_problem("float32", "int8", "/folder", "cpu", 1) is None
    assert quantized_prefill_dtype_problem("auto", "none", "/folder", "cuda", 2) is None
    monkeypatch.setattr(quantization_flags, "cpu_features", lambda: frozenset({"avx512_bf16"}))
    assert quantized_prefill_dtype_problem("bfloat16", "gguf", "m.gguf", "cpu", 1) is None
    monkeypatch.setenv("PDCORE_CPU_ISA", "avx2")  # kernels without bf16 dot products forced
    why = quantized_prefill_dtype_problem("bfloat16", "gguf", "m.gguf", "cpu", 1)
    assert why is not None and "PDCORE_CPU_ISA=avx2" in why
    monkeypatch.delenv("PDCORE_CPU_ISA")
    monkeypatch.setenv("PDCORE_DISABLE_NATIVE_KERNELS", "1")
    why = quantized_prefill_dtype_problem("bfloat16", "gguf", "m.gguf", "cpu", 1)
    assert why is not None and "PDCORE_DISABLE_NATIVE_KERNELS" in why


def test_quantized_prefill_dtype_cli_names_the_flag(
    capsys: pytest.CaptureFixture[str], tiny_llama_dir
) -> None:
    from pdcore.settings import parse_serve_args

    with pytest.raises(SystemExit):
        parse_serve_args(["--model", str(tiny_llama_dir), "--quantized-prefill-dtype", "float32"])
    err = capsys.readouterr().err
    assert "--quantized-prefill-dtype" in err and "float32" in err


def test_quantized_prefill_dtype_resolved_for_the_kernels() -> None:
    """auto follows the kernels (bf16 only with bf16 dot products); an explicit bfloat16 on
    kernels without them raises rather than run emulated."""
    from pdcore.model.quantized import prefill_bf16

    for isa in native_cpu.supported_variants():
        k = kern(isa)
        assert prefill_bf16("auto", k) == k.bf16_prefill
        assert prefill_bf16("auto", k, "float32") is False  # --dtype float32: exact prefill
        assert prefill_bf16("float32", k) is False
        if k.bf16_prefill:
            assert prefill_bf16("bfloat16", k) is True
        else:
            with pytest.raises(ValueError, match="AVX512-BF16"):
                prefill_bf16("bfloat16", k)
