"""adaptkit.nf4: bit-exact against the bitsandbytes 0.50.2 CPU vectors (specs/methods.md §5),
random cross-checks against bitsandbytes itself, an independent slow reference for any even
blocksize, serialisation, errors, and hypothesis properties."""
import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptkit.errors import AdaptkitError
from adaptkit.nf4 import DYNAMIC_CODE, NF4_CODE, NF4State, dequantize_nf4, quantize_nf4

ROOT = Path(__file__).resolve().parents[2]
_CANDIDATES = [os.environ.get("ADAPTKIT_NF4_VECTORS", ""),
               ROOT / "tests" / "data" / "nf4_vectors.safetensors",
               ROOT / "shared" / "specs" / "nf4_vectors.safetensors",
               ROOT.parent / "shared" / "specs" / "nf4_vectors.safetensors",
               "/work/shared/specs/nf4_vectors.safetensors"]
VECTORS = next((Path(p) for p in _CANDIDATES if p and Path(p).is_file()), None)
MID = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # bnb's fp32 decision midpoints
DYN_MID = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2


@pytest.fixture(scope="module")
def vec():
    if VECTORS is None:
        pytest.skip("nf4_vectors.safetensors not found (set ADAPTKIT_NF4_VECTORS)")
    from safetensors.torch import load_file
    return load_file(str(VECTORS))


@pytest.fixture(scope="module")
def bnbf():
    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return bnb.functional


def nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack [ceil(n/2)] bytes to n indices, first element from the HIGH nibble."""
    p = packed.reshape(-1).long()
    return torch.stack([p >> 4, p & 15], 1).reshape(-1)[:n]


def ref_quant(x: torch.Tensor, bs: int, mids: torch.Tensor = MID):
    """Independent reference of bnb's rule: reciprocal scaling for full blocks, division for
    the partial tail (its absmax clamped at 1e-38), index = #{midpoints < s} by brute force."""
    flat = x.reshape(-1).float()
    full = flat.numel() // bs * bs
    blocks = flat[:full].view(-1, bs)  # [full blocks, bs]
    am = [blocks.abs().amax(1)]
    scaled = [(blocks * (1.0 / am[0].clamp(min=1e-38))[:, None]).reshape(-1)]
    if full < flat.numel():
        tail_am = flat[full:].abs().max().clamp(min=1e-38)
        am.append(tail_am[None])
        scaled.append(flat[full:] / tail_am)
    s = torch.cat(scaled)
    return (s[:, None] > mids[None, :]).sum(1), torch.cat(am)


def ref_dequant(idx: torch.Tensor, absmax: torch.Tensor, bs: int, dtype) -> torch.Tensor:
    blk = torch.arange(idx.numel()) // bs
    return (NF4_CODE[idx] * absmax[blk]).to(dtype)


# ----------------------------------------------------------------- golden vectors (bnb CPU)
def test_codebooks_match_vectors_and_spec(vec):
    assert torch.equal(NF4_CODE, vec["nf4_code"]) and NF4_CODE.dtype == torch.float32
    assert torch.equal(DYNAMIC_CODE, vec["dynamic_code"])
    assert DYNAMIC_CODE.numel() == 256 and DYNAMIC_CODE[127] == 0 and DYNAMIC_CODE[-1] == 1
    assert DYNAMIC_CODE[0].item() == pytest.approx(-0.99296875, rel=1e-6)
    assert bool((DYNAMIC_CODE[1:] > DYNAMIC_CODE[:-1]).all())


@pytest.mark.parametrize("p", ["a", "e", "o", "b"])
def test_vectors_single_quant(vec, p):
    x = vec["b_input_bf16"] if p == "b" else vec[f"{p}_input"]
    ref = vec["b_dequant_bf16"] if p == "b" else vec[f"{p}_dequant"]
    packed, st = quantize_nf4(x, double_quant=False)
    assert packed.dtype == torch.uint8 and packed.shape == ((x.numel() + 1) // 2,)
    assert torch.equal(packed, vec[f"{p}_packed"])
    assert torch.equal(st.absmax, vec[f"{p}_absmax"]) and st.absmax.dtype == torch.float32
    out = dequantize_nf4(packed, st)
    assert out.dtype == x.dtype and out.shape == x.shape and torch.equal(out, ref)


def test_vector_details(vec):
    packed, st = quantize_nf4(vec["a_input"], double_quant=False)
    assert packed[:8].tolist() == [0x44, 0x66, 0xA9, 0x61, 0x83, 0x88, 0x7B, 0xB6]
    e_packed, e_st = quantize_nf4(vec["e_input"], double_quant=False)
    idx = nibbles(e_packed, 256)
    assert idx[1:16].tolist() == list(range(15))  # exact midpoint ties go to the lower code
    assert e_packed[32:64].eq(0x77).all() and e_st.absmax[1] == 0  # zero block
    assert bool((dequantize_nf4(e_packed, e_st)[0, 64:128] == 0).all())
    _, o_st = quantize_nf4(vec["o_input"], double_quant=False)  # 67 = 64 + partial 3
    assert o_st.absmax.shape == (2,) and nibbles(quantize_nf4(vec["o_input"])[0], 68)[67] == 7


def test_vectors_double_quant(vec):
    packed, st = quantize_nf4(vec["d_input"])  # double_quant=True by default
    assert torch.equal(packed, vec["d_packed"])
    assert st.double_quant and st.absmax.dtype == torch.uint8 and st.absmax.shape == (300,)
    assert torch.equal(st.absmax, vec["d_qabsmax_exact"])  # exact nearest code
    assert (st.absmax.int() - vec["d_qabsmax_bnb_cpu"].int()).abs().max() <= 1
    assert torch.equal(st.offset, vec["d_offset"]) and st.offset.shape == ()
    assert torch.equal(st.nested_absmax, vec["d_absmax2"]) and st.nested_blocksize == 256
    assert torch.equal(dequantize_nf4(packed, st), vec["d_dequant_exact"])
    bnb_codes = NF4State(**{**st.__dict__, "absmax": vec["d_qabsmax_bnb_cpu"]})
    assert torch.equal(dequantize_nf4(packed, bnb_codes), vec["d_dequant_bnb_cpu"])
    step = (DYNAMIC_CODE[1:] - DYNAMIC_CODE[:-1]).max() * st.nested_absmax.max()
    assert (st.block_absmax() - vec["d_absmax_fp32"]).abs().max() <= step / 2 + 1e-6


# ------------------------------------------------------------------- exact index decision
def test_index_at_every_midpoint_neighbourhood():
    """Midpoints, their fp32 neighbours (±1..3 ulp), LUT bin edges and ±1 all map exactly as
    torch.bucketize on bnb's midpoints (ties lower). Each 64-block starts with 1.0, so its
    absmax is 1 and the scaled value is the value itself."""
    vals = [MID, torch.tensor([-1.0, 1.0, 0.0, -0.0])]
    for direction in (2.0, -2.0):
        v = MID.clone()
        for _ in range(3):
            v = torch.nextafter(v, torch.tensor(direction))
            vals.append(v)
    edges = (-1 + torch.arange(25, dtype=torch.float64) / 11).float().clamp(-1, 1)
    vals += [edges, torch.nextafter(edges, torch.tensor(2.0)), torch.nextafter(edges, torch.tensor(-2.0))]
    vals.append(torch.rand(2000) * 2 - 1)
    body = torch.cat(vals).clamp(-1, 1)  # keep every block's absmax at exactly 1
    body = torch.cat([body, body.new_zeros(-len(body) % 63)]).view(-1, 63)  # [blocks, 63]
    x = torch.cat([torch.ones(len(body), 1), body], 1)  # [blocks, 64], absmax 1 each
    packed, st = quantize_nf4(x, double_quant=False)
    assert bool((st.absmax == 1).all())
    assert torch.equal(nibbles(packed, x.numel()), torch.bucketize(x.reshape(-1), MID))


# ------------------------------------------------------------------ random vs bitsandbytes
SHAPES = [(3, 50), (7,), (1, 67), (64, 64), (33, 129), (4, 96), (2, 3, 40), (5, 640)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bs", [64, 128, 256])
def test_matches_bitsandbytes(bnbf, shape, dtype, bs):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    gen = torch.Generator().manual_seed(hash((shape, bs)) % 2**31)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    n = x.numel()
    if n > bs:
        x.view(-1)[:bs] = 0  # a zero block
    if n == 7:
        x.zero_()  # a lone zero tail block: absmax clamps to 1e-38 as in bnb
    for dq in (False, True):
        packed, st = quantize_nf4(x, bs, dq)
        pb, sb = bnbf.quantize_4bit(x, blocksize=bs, compress_statistics=dq, quant_type="nf4")
        assert torch.equal(packed, pb.reshape(-1)), (shape, dtype, bs, dq)
        if not dq:
            assert torch.equal(st.absmax, sb.absmax)
            plain = st.absmax
            ref = _dequantize_4bit_compute.__wrapped__(pb.reshape(-1), sb.absmax, NF4_CODE, bs, shape, dtype)
            out = dequantize_nf4(packed, st)
            assert out.dtype == dtype and torch.equal(out, ref.view(shape))
            if shape[-1] % bs == 0:  # bnb's C dequant kernel assumes blocks don't straddle rows
                assert torch.equal(out, bnbf.dequantize_4bit(pb, sb))
            continue
        assert torch.equal(st.offset, sb.offset)
        ours_codes, bnb_codes = st.absmax.int(), sb.absmax.int()
        nested_zero = st.nested_absmax[torch.arange(len(ours_codes)) // 256] <= 1e-38
        assert bool(((ours_codes - bnb_codes).abs() <= 1).logical_or(nested_zero).all())
        live = st.nested_absmax > 1e-38  # bnb C leaves 0 where we (like bnb's torch path) clamp
        assert torch.equal(st.nested_absmax[live], sb.state2.absmax[live])
        q8, _ = ref_quant(plain - plain.mean(), 256, DYN_MID)  # exact nearest 8-bit code
        assert torch.equal(st.absmax.long(), q8)
        sb.absmax, sb.state2.absmax = st.absmax.clone(), st.nested_absmax.clone()
        bnb_absmax = bnbf.dequantize_blockwise(sb.absmax, sb.state2) + sb.offset
        assert torch.equal(st.block_absmax(), bnb_absmax)
        assert torch.equal(dequantize_nf4(packed, st).reshape(-1),
                           ref_dequant(nibbles(packed, n), bnb_absmax, bs, dtype))
        if shape[-1] % bs == 0:  # same codes in, same values out (bnb's own C dequant)
            assert torch.equal(dequantize_nf4(packed, st), bnbf.dequantize_4bit(pb, sb))


@pytest.mark.parametrize("bs", [2, 66, 1000])
def test_non_power_of_two_blocksizes(bnbf, bs):
    """bnb's public API only takes powers of two, its torch kernel takes any size."""
    x = torch.randn(7, 301)
    packed, st = quantize_nf4(x, bs, double_quant=False)
    pb, ab = torch.ops.bitsandbytes.quantize_4bit.default(x, bs, "nf4", torch.uint8)
    assert torch.equal(packed, pb.reshape(-1)) and torch.equal(st.absmax, ab)


@pytest.mark.parametrize("bs", [2, 66, 1000, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_even_blocksize_vs_reference(bs, dtype):
    x = torch.randn(5, 2003).to(dtype)
    x[0, : 2 * bs] = 0
    packed, st = quantize_nf4(x, bs, double_quant=False)
    idx, am = ref_quant(x, bs)
    assert torch.equal(nibbles(packed, x.numel()), idx) and torch.equal(st.absmax, am)
    assert torch.equal(dequantize_nf4(packed, st).reshape(-1), ref_dequant(idx, am, bs, dtype))
    _, st2 = quantize_nf4(x, bs, nested_blocksize=6)
    q8, am2 = ref_quant(am - am.mean(), 6, DYN_MID)
    assert torch.equal(st2.absmax.long(), q8) and torch.equal(st2.nested_absmax, am2)


@pytest.mark.parametrize("chunk", [1 << 12, 1 << 18])
def test_many_chunks(bnbf, monkeypatch, chunk):
    """Chunk boundaries (full chunks, a partial chunk, a partial block) leave no trace."""
    import adaptkit.nf4 as nf4mod
    monkeypatch.setattr(nf4mod, "_CHUNK", chunk)
    x = torch.randn(300, 650) if chunk < 1 << 18 else torch.randn(1000, 650)
    for dq in (False, True):
        packed, st = quantize_nf4(x, 64, dq)
        pb, sb = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=dq, quant_type="nf4")
        assert torch.equal(packed, pb.reshape(-1))
    idx, am = ref_quant(x, 64)
    _, plain = quantize_nf4(x, 64, double_quant=False)
    assert torch.equal(plain.absmax, am)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_nf4(packed, plain, dtype).reshape(-1), ref_dequant(idx, am, 64, dtype))


# --------------------------------------------------------------------------- serialisation
def test_state_tensors_roundtrip_and_bnb_interop(bnbf, tmp_path):
    from safetensors.torch import load_file, save_file
    x = torch.randn(48, 40, dtype=torch.bfloat16)
    for dq in (False, True):
        packed, st = quantize_nf4(x, 64, dq)
        tensors = {"weight": packed, **st.to_tensors("weight")}
        save_file(tensors, str(tmp_path / "w.safetensors"))
        loaded = load_file(str(tmp_path / "w.safetensors"))
        st2 = NF4State.from_tensors(loaded, "weight")
        assert st2.shape == x.shape and st2.dtype == x.dtype and st2.blocksize == 64
        assert torch.equal(dequantize_nf4(loaded["weight"], st2), dequantize_nf4(packed, st))
        _, sb = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=dq, quant_type="nf4")
        bnb_keys = {f"weight.{k}" for k in sb.as_dict(packed=True)}
        assert bnb_keys == set(tensors) - {"weight"}
        meta = json.loads(bytes(tensors["weight.quant_state.bitsandbytes__nf4"].tolist()))
        assert meta == json.loads(bytes(sb.as_dict(packed=True)["quant_state.bitsandbytes__nf4"].tolist()))
        qs = bnbf.QuantState.from_dict({k[7:]: v for k, v in st.to_tensors("weight").items()}, "cpu")
        assert torch.equal(bnbf.dequantize_4bit(packed.view(-1, 1), qs), dequantize_nf4(packed, st))
        ours = NF4State.from_tensors({f"w.{k}": v for k, v in sb.as_dict(packed=True).items()}, "w")
        assert torch.equal(dequantize_nf4(packed, ours), dequantize_nf4(packed, st))


def test_from_tensors_rejects_bad_input():
    packed, st = quantize_nf4(torch.randn(8, 16))
    good = st.to_tensors("w")
    with pytest.raises(AdaptkitError, match="missing tensor 'w.absmax'"):
        NF4State.from_tensors({k: v for k, v in good.items() if k != "w.absmax"}, "w")
    with pytest.raises(AdaptkitError, match="not the NF4 codebook"):
        NF4State.from_tensors({**good, "w.quant_map": torch.linspace(-1, 1, 16)}, "w")
    with pytest.raises(AdaptkitError, match="absmax"):
        NF4State.from_tensors({**good, "w.absmax": good["w.absmax"][:1]}, "w")
    meta = {"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [8, 16]}
    blob = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(AdaptkitError, match="quant_type='fp4'"):
        NF4State.from_tensors({**good, "w.quant_state.bitsandbytes__nf4": blob}, "w")


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bs", [0, 3, 63, -64, 64.0, True])
def test_bad_blocksize(bs):
    with pytest.raises(AdaptkitError, match="blocksize"):
        quantize_nf4(torch.randn(128), blocksize=bs)


@pytest.mark.parametrize("x", [torch.ones(4, dtype=torch.int32), torch.ones(4, dtype=torch.float64),
                               torch.ones(4, dtype=torch.bool), [1.0, 2.0]])
def test_bad_input_type(x):
    with pytest.raises(AdaptkitError, match="cannot quantise"):
        quantize_nf4(x)


def test_empty_nonfinite_and_mismatched_packed():
    with pytest.raises(AdaptkitError, match="empty"):
        quantize_nf4(torch.empty(0, 4))
    for bad in (float("inf"), float("nan")):
        with pytest.raises(AdaptkitError, match="inf or NaN"):
            quantize_nf4(torch.tensor([1.0, bad] * 40))
    packed, st = quantize_nf4(torch.randn(10, 10))
    with pytest.raises(AdaptkitError, match=r"uint8\[50\]"):
        dequantize_nf4(packed[:-1], st)
    with pytest.raises(AdaptkitError, match="dequantise to torch.int8"):
        dequantize_nf4(packed, st, torch.int8)


def test_input_untouched_noncontiguous_and_grad():
    w = torch.randn(96, 80, requires_grad=True)
    wt = w.detach().t()  # non-contiguous view
    before = wt.clone()
    packed, st = quantize_nf4(wt)
    assert torch.equal(wt, before) and st.shape == (80, 96)
    assert torch.equal(packed, quantize_nf4(wt.contiguous())[0])
    assert not quantize_nf4(w)[0].requires_grad


# ------------------------------------------------------------------------------ properties
MAX_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 700), half_bs=st.integers(1, 80), scale=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_roundtrip_error_bounded_per_block(n, half_bs, scale, seed, dtype):
    bs = 2 * half_bs
    x = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    packed, st = quantize_nf4(x, bs, double_quant=False)
    y = dequantize_nf4(packed, st, torch.float32)
    am = st.absmax[torch.arange(n) // bs]
    err = (x.float() - y).abs()
    assert bool((err <= am * MAX_GAP / 2 * (1 + 1e-6)).all())
    idx, am_ref = ref_quant(x, bs)
    assert torch.equal(nibbles(packed, n), idx) and torch.equal(st.absmax, am_ref)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**16))
def test_double_quant_absmax_within_half_a_code(n, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 10
    _, plain = quantize_nf4(x, 16, double_quant=False)
    _, st = quantize_nf4(x, 16, nested_blocksize=8)
    gap = (DYNAMIC_CODE[1:] - DYNAMIC_CODE[:-1]).max()
    nested = st.nested_absmax[torch.arange(len(plain.absmax)) // 8]
    assert bool(((st.block_absmax() - plain.absmax).abs() <= nested * gap / 2 + 1e-5).all())


# ------------------------------------------- adaptkit.nf4_matmul: matmuls without a dense W
import torch.nn.functional as F  # noqa: E402

from adaptkit import nf4_matmul as nm  # noqa: E402
from adaptkit.nf4 import NF4Linear  # noqa: E402

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
MM_CASES = [(96, 128, 64, True, FP32), (96, 128, 64, True, BF16), (96, 128, 64, True, FP16),
            (70, 192, 64, False, FP32), (70, 192, 64, False, BF16), (33, 256, 128, True, BF16),
            (40, 100, 64, True, FP32), (40, 100, 64, True, BF16)]  # 100 % 64: the dense path


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunked paths for test-sized weights: chunks of 2 Ki elements (several per weight, a
    partial last one); a fresh compiled GEMV (dynamo's per-kernel recompile limit is shared
    by all tests of the process), its state restored afterwards."""
    torch._dynamo.reset()
    for name, value in (("_CHUNK", 1 << 11), ("_COMPILE", [True]), ("_KERNEL", []), ("_KEYS", set())):
        monkeypatch.setattr(nm, name, value)
    return nm


def close(y: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    """Equal up to float summation order: fp32 within ~1e-6 of the scale; bf16 / fp16 (both
    sides round the same fp32-accumulated sums once) within one unit in the last place."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    scale = ref.float().abs().max().item()
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    torch.testing.assert_close(y.float(), ref.float(), rtol=rtol, atol=4e-6 * scale)


@pytest.mark.parametrize("out_f,in_f,bs,dq,dtype", MM_CASES)
def test_matmul_paths_equal_dense_reference(small_chunks, out_f, in_f, bs, dq, dtype):
    """GEMV (1-2 rows), row chunks (more rows, 3-D input), fp32-accumulated backward row chunks
    and the dense fallback (in_features 100: not a multiple of the blocksize, bit-exact)."""
    torch.manual_seed(out_f)
    packed, st = quantize_nf4(torch.randn(out_f, in_f), bs, dq)
    w = dequantize_nf4(packed, st, dtype)
    b = torch.randn(out_f).to(dtype)
    for shape in [(1, in_f), (2, in_f), (in_f,), (2, 3, in_f), (9, in_f)]:
        x, g = torch.randn(shape).to(dtype), torch.randn(*shape[:-1], out_f).to(dtype)
        for bias in (None, b):
            y, ref = nm.linear(x, packed, st, dtype, bias), F.linear(x, w, bias)
            if in_f % bs:
                assert torch.equal(y, ref)
            close(y, ref, dtype)
        gx, gref = nm.grad_input(g, packed, st, dtype), g @ w
        if in_f % bs:
            assert torch.equal(gx, gref)
        close(gx, gref, dtype)
    # the GEMV ran compiled (fp32 / bf16; fp16 takes the row chunks)
    assert bool(nm._KEYS) == (in_f % bs == 0 and dtype != torch.float16) and nm._COMPILE == [True]


def test_row_chunk_decoder_is_bit_exact(small_chunks):
    """Row chunks decoded by decode_blocks (strided bytes, reused buffers) == dequantize_nf4."""
    packed, st = quantize_nf4(torch.randn(77, 192), 64)
    p3 = nm._layout(packed, st, 1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows = [w.clone() for _, w in nm._row_chunks(p3, st, dtype)]
        assert len(rows) > 2 and torch.equal(torch.cat(rows), dequantize_nf4(packed, st, dtype))


def test_gemv_building_blocks_exact():
    """The select tree returns each NF4 code exactly; the bit-level bf16 rounding equals a cast
    (ties to even, carries into the exponent, subnormals, signs)."""
    q = torch.arange(16, dtype=torch.int32)
    assert torch.equal(nm._code(q), NF4_CODE)
    u = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 - 2**-9, 3.3895e38, 1e-40, -2.5e-3, 0.0])
    w = torch.cat([u, -u, torch.randn(10000) * torch.logspace(-30, 30, 10000)])
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(nm._round(w, dt), w.to(dt).float())


def test_compile_unavailable_or_tracing_falls_back(small_chunks, monkeypatch):
    """A failing torch.compile warns once and the eager row chunks answer (a second call
    raises no warning); while torch.compile traces the caller the dense op runs (bit-exact)."""
    packed, st = quantize_nf4(torch.randn(64, 128), 64)
    x = torch.randn(1, 128)
    ref = F.linear(x, dequantize_nf4(packed, st))

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(nm, "_KERNEL", [broken])
    monkeypatch.setattr(nm, "_KEYS", set())
    with pytest.warns(RuntimeWarning, match="GEMV failed"):
        close(nm.linear(x, packed, st, torch.float32), ref, torch.float32)
    assert nm._COMPILE == [False]
    with warnings.catch_warnings():  # no second warning
        warnings.simplefilter("error")
        close(nm.linear(x, packed, st, torch.float32), ref, torch.float32)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(nm.linear(x, packed, st, torch.float32), ref)
    assert nm._layout(packed, st, 1) is None


def test_use_compile_off_skips_the_gemv(small_chunks, monkeypatch):
    """use_compile(False) (what ADAPTKIT_NF4_COMPILE=0 sets at import) never calls the GEMV
    kernel nor records a compiled layout, and the row chunks give the same results; with it
    on, the same inputs do reach the kernel (run eagerly here, no compile)."""
    packed, st = quantize_nf4(torch.randn(64, 128), 64)
    w = dequantize_nf4(packed, st)
    xs = [torch.randn(1, 128), torch.randn(2, 128), torch.randn(5, 128)]
    calls = []

    def eager(*a):
        calls.append(1)
        return nm._k_gemv(*a)
    monkeypatch.setattr(nm, "_KERNEL", [eager])
    for x in xs:  # control: 1-2 rows take the GEMV
        close(nm.linear(x, packed, st, torch.float32), F.linear(x, w), torch.float32)
    assert len(calls) == 3 and len(nm._KEYS) == 1  # one row per call, one fp32 layout
    keys = set(nm._KEYS)

    def stub(*a, **k):
        raise AssertionError("the GEMV ran with compilation off")
    monkeypatch.setattr(nm, "_KERNEL", [stub])
    try:
        nm.use_compile(False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for dtype in (torch.float32, torch.bfloat16):
                wd = dequantize_nf4(packed, st, dtype)
                for x in xs:
                    close(nm.linear(x.to(dtype), packed, st, dtype), F.linear(x.to(dtype), wd), dtype)
        assert nm._KEYS == keys and nm._COMPILE == [False]
    finally:
        nm.use_compile(True)
    assert nm._COMPILE == [True]


@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16])
def test_nf4linear_chunked_forward_and_grads_equal_dense(small_chunks, cd):
    """NF4Linear at the sizes that take the fast paths: inference (GEMV, row chunks) and
    training (input and bias gradients) equal nn.Linear on the dequantised weight."""
    torch.manual_seed(0)
    q = NF4Linear.from_linear(torch.nn.Linear(128, 96), compute_dtype=cd)
    dense = torch.nn.Linear(128, 96).to(cd)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize()), dense.bias.copy_(q.bias.to(cd))
    q.bias.requires_grad_(True)
    for shape in [(1, 128), (2, 7, 128)]:
        x = torch.randn(shape)
        with torch.no_grad():
            close(q(x), dense(x.to(cd)).float(), cd)
        xa, xb = x.clone().requires_grad_(), x.to(cd).requires_grad_()
        ya, yb = q(xa), dense(xb)
        close(ya, yb.float(), cd)
        ga = torch.randn_like(ya)
        ya.backward(ga), yb.backward(ga.to(cd))
        close(xa.grad, xb.grad.float(), cd)
        close(q.bias.grad.to(cd), dense.bias.grad, cd)
        q.bias.grad = dense.bias.grad = None
