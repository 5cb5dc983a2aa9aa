"""The small-M Triton GEMV (kvgrid.layers.gemv) against F.linear, and its dispatch.

Without a GPU the kernel runs under Triton's interpreter in float32 on tiny odd shapes;
on a GPU also in bfloat16 at the Llama-3-8B projection shapes, every tuner candidate.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.support import triton_interp

triton_interp.setup()
pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from kvgrid.layers import gemv as G  # noqa: E402
from kvgrid.layers.gemv import GemvConfig  # noqa: E402
from kvgrid.models.config import ModelConfig  # noqa: E402
from kvgrid.models.llama import LlamaForCausalLM  # noqa: E402
from kvgrid.models.shapes import dummy_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def _fresh_tables(monkeypatch):
    """Each test starts with nothing pinned or tuned, and the kernel switched on."""
    monkeypatch.setattr(G, "PINNED", {})
    monkeypatch.setattr(G, "PINNED_BY_DEVICE", {})
    G._device_pinned.cache_clear()
    monkeypatch.setattr(G, "_tuned", {})
    monkeypatch.setattr(G, "ENABLED", True)


@pytest.fixture(autouse=True)
def _card_tables_back():
    yield
    G._device_pinned.cache_clear()  # the next user sees the real per-card table again


def operands(m: int, n: int, k: int, dtype=torch.float32, bias: bool = False, seed: int = 0):
    gen = torch.Generator(DEVICE).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, generator=gen, device=DEVICE) * k**-0.5).to(dtype)
    b = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if bias else None
    return x, w, b


# ---- the kernel ---------------------------------------------------------------------------

FMA, DOT = GemvConfig(4, 64), GemvConfig(16, 32, dot=True)


@pytest.mark.parametrize(
    "m,n,k,config,bias",
    [
        (1, 37, 300, FMA, False),  # N and K not multiples of the block
        (1, 37, 300, FMA, True),
        (1, 5, 100, GemvConfig(8, 128), True),  # one block wider than N and K
        (1, 37, 300, GemvConfig(4, 64, split_k=3), True),  # split-K, ragged last slice
        (1, 37, 256, GemvConfig(4, 64, split_k=2), False),  # split-K, even K (no masks)
        (1, 37, 256, GemvConfig(2, 64, split_k=8), False),  # more splits than K needs
        (1, 40, 200, DOT, True),
        (2, 37, 300, DOT, True),
        (3, 5, 100, GemvConfig(16, 128, dot=True), True),
        (5, 33, 256, DOT, False),
        (7, 37, 256, GemvConfig(16, 64, split_k=2, dot=True), False),
        (8, 33, 300, GemvConfig(16, 64, split_k=2, dot=True), True),
        (6, 17, 96, GemvConfig(32, 32, split_k=4, dot=True), True),
    ],
)
def test_gemv_matches_linear(m, n, k, config, bias):
    x, w, b = operands(m, n, k, bias=bias, seed=m * n + k)
    y = G.gemv(x, w, b, config)
    assert y.shape == (m, n) and y.dtype == x.dtype
    assert rel_err(y, F.linear(x, w, b)) < 1e-5


def test_gemv_strided_x_rows_and_empty():
    x, w, b = operands(3, 20, 64, bias=True)
    wide = torch.zeros(3, 100, device=DEVICE)
    wide[:, 10:74] = x
    xs = wide[:, 10:74]  # rows 100 apart: still valid, only the last dim must be contiguous
    assert rel_err(G.gemv(xs, w, b, DOT), F.linear(x, w, b)) < 1e-5
    assert G.gemv(x[:0], w, b, DOT).shape == (0, 20)
    # K = 0: the product is empty, the bias remains
    assert torch.equal(G.gemv(x[:, :0], w[:, :0], b, DOT), b.expand(3, 20))


def test_every_candidate_is_correct_on_a_small_shape():
    for m in (1, 3, 8):
        x, w, b = operands(m, 24, 1100, bias=True, seed=m)
        ref = F.linear(x, w, b)
        for c in G.candidates(m, 24, 1100):
            assert rel_err(G.gemv(x, w, b, c), ref) < 1e-5, c


def test_candidates_fill_the_gpu():
    cands = G.candidates(1, 4096, 14336, sms=132)
    assert 10 <= len(cands) <= 24
    assert any(c.split_k > 1 for c in cands) and any(c.dot for c in cands)
    for c in cands:
        assert -(-4096 // c.block_n) * c.split_k >= 4 * 132 or c.split_k == 1
    # FMA tiles serve M=1 only
    assert any(not c.dot for c in cands)
    assert all(c.dot for m in (2, 4, 8) for c in G.candidates(m, 4096, 4096))


@pytest.mark.parametrize(
    "x_shape,w_shape,match",
    [
        ((2, 64), (8, 63), "K=64"),
        ((2, 64), (8, 64, 1), "2-D"),
        ((2, 3, 64), (8, 64), "2-D"),
        ((17, 64), (8, 64), "M <= 16"),
    ],
)
def test_bad_shapes_raise(x_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        G.gemv(torch.zeros(x_shape, device=DEVICE), torch.zeros(w_shape, device=DEVICE), None, FMA)


def test_bad_layouts_raise():
    x, w, _ = operands(1, 8, 64)
    with pytest.raises(ValueError, match="contiguous"):
        G.gemv(x, w.t().contiguous().t(), None, FMA)  # column-major w
    with pytest.raises(ValueError, match="contiguous"):
        G.gemv(torch.zeros(64, 2, device=DEVICE).t()[:1], w, None, FMA)  # K strided
    with pytest.raises(ValueError, match="dtype"):
        G.gemv(x.double(), w.double(), None, FMA)
    with pytest.raises(ValueError, match="bias"):
        G.gemv(x, w, torch.zeros(9, device=DEVICE), FMA)
    with pytest.raises(ValueError, match="dot=True"):
        G.gemv(torch.cat([x, x]), w, None, FMA)


@pytest.mark.parametrize(
    "m,inter,k,config",
    [
        (1, 37, 300, FMA),  # I not a multiple of the half tile, ragged K
        (1, 8, 64, GemvConfig(16, 64)),  # one program wider than I
        (3, 37, 300, DOT),
        (8, 20, 256, GemvConfig(32, 64, dot=True)),
    ],
)
def test_gemv_silu_mul_epilogue_is_the_two_ops(m, inter, k, config, monkeypatch):
    """The fused epilogue gives what the GEMV then fused_ops.silu_mul's kernel give."""
    from kvgrid.layers import fused_ops

    monkeypatch.setattr(fused_ops, "force_triton", True)  # its kernel on CPU tensors too
    x, w, _ = operands(m, 2 * inter, k, seed=inter + m)
    two_ops = fused_ops.silu_mul(G.gemv(x, w, None, config))
    fused = G.gemv(x, w, None, config, silu_mul=True)
    assert fused.shape == (m, inter)
    assert rel_err(fused, two_ops) < 1e-6  # the interpreter's dot may sum in another order
    assert rel_err(fused, fused_ops.silu_mul_ref(F.linear(x, w))) < 1e-5


def test_gemv_silu_mul_needs_whole_rows():
    x, w, b = operands(1, 40, 64, bias=True)
    with pytest.raises(ValueError, match="silu_mul"):
        G.gemv(x, w, None, GemvConfig(4, 64, split_k=2), silu_mul=True)
    with pytest.raises(ValueError, match="silu_mul"):
        G.gemv(x, w, b, FMA, silu_mul=True)


# ---- dispatch -----------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the configs ``linear`` hands to the kernel."""
    calls: list[GemvConfig] = []
    real = G.gemv

    def spy(x, w, bias, config, silu_mul=False):
        calls.append((config, "silu_mul") if silu_mul else config)
        return real(x, w, bias, config, silu_mul)

    monkeypatch.setattr(G, "gemv", spy)
    return calls


def test_cpu_tensors_take_f_linear_exactly(kernel_calls):
    x, w, b = operands(1, 40, 64, bias=True)
    x, w, b = x.cpu(), w.cpu(), b.cpu()
    assert torch.equal(G.linear(x, w, b), F.linear(x, w, b))
    assert kernel_calls == [] and G._tuned == {}


def test_pinned_config_is_used_with_leading_dims_flattened(kernel_calls, monkeypatch):
    monkeypatch.setattr(G, "force_triton", True)
    x, w, b = operands(6, 40, 64, bias=True)
    G.PINNED[(8, 40, 64)] = DOT
    y = G.linear(x.view(2, 3, 64), w, b)
    assert y.shape == (2, 3, 40)
    assert rel_err(y.reshape(6, 40), F.linear(x, w, b)) < 1e-5
    assert kernel_calls == [DOT]
    G.PINNED[(8, 40, 64)] = None  # pinned to cuBLAS
    G.linear(x, w, b)
    assert kernel_calls == [DOT]


def test_falls_back_above_max_m_and_when_disabled(kernel_calls, monkeypatch):
    monkeypatch.setattr(G, "force_triton", True)
    x, w, _ = operands(G.MAX_M + 1, 40, 64)
    G.PINNED[(G.m_bucket(G.MAX_M + 1), 40, 64)] = FMA
    G.PINNED[(1, 40, 64)] = FMA
    assert torch.equal(G.linear(x, w), F.linear(x, w))
    monkeypatch.setattr(G, "ENABLED", False)
    assert torch.equal(G.linear(x[:1], w), F.linear(x[:1], w))
    assert kernel_calls == []


def test_no_tuning_while_capturing(kernel_calls, monkeypatch):
    monkeypatch.setattr(G, "force_triton", True)
    monkeypatch.setattr(G, "_capturing", lambda x: True)
    monkeypatch.setattr(G, "tune_one", lambda *a: pytest.fail("tuned during capture"))
    x, w, _ = operands(1, 40, 64)
    assert torch.equal(G.linear(x, w), F.linear(x, w))
    assert kernel_calls == [] and G._tuned == {}


def test_first_use_tunes_once_and_keeps_the_fastest(kernel_calls, monkeypatch):
    """Fake timings: F.linear is timed first, then the candidates in order; one candidate
    fails to compile, the fourth is fastest."""
    monkeypatch.setattr(G, "force_triton", True)
    x, w, b = operands(2, 40, 300, bias=True)
    cands = G.candidates(2, 40, 300, G._sm_count(x.device))
    times = iter([1.0, 2.0, RuntimeError("out of resources"), 3.0, 0.5] + [2.0] * len(cands))

    def fake_time(op, w):
        t = next(times)
        if isinstance(t, Exception):
            raise t
        return t

    monkeypatch.setattr(G, "time_ms", fake_time)
    y = G.linear(x, w, b)
    assert G._tuned == {(2, 40, 300): cands[3]}
    assert kernel_calls == [cands[3]]
    assert rel_err(y, F.linear(x, w, b)) < 1e-5
    G.linear(x, w, b)  # cached: no more timings
    assert kernel_calls == [cands[3]] * 2


def test_linear_silu_mul_fuses_only_where_the_config_allows(kernel_calls, monkeypatch):
    from kvgrid.layers import fused_ops

    x, w, _ = operands(1, 74, 64)
    ref = fused_ops.silu_mul_ref(F.linear(x, w))
    xc, wc = x.cpu(), w.cpu()  # CPU tensors: exactly the two ops
    assert torch.equal(G.linear_silu_mul(xc, wc), fused_ops.silu_mul_ref(F.linear(xc, wc)))
    assert kernel_calls == []
    monkeypatch.setattr(G, "force_triton", True)
    G.PINNED[(1, 74, 64)] = FMA
    assert rel_err(G.linear_silu_mul(x, w), ref) < 1e-5
    split = GemvConfig(4, 32, split_k=2)  # split-K cannot fuse: GEMV, then the activation
    G.PINNED[(1, 74, 64)] = split
    assert rel_err(G.linear_silu_mul(x.view(1, 1, 64), w).view(1, 37), ref) < 1e-5
    assert kernel_calls == [(FMA, "silu_mul"), split]


def test_cublas_win_is_remembered(kernel_calls, monkeypatch):
    monkeypatch.setattr(G, "force_triton", True)
    monkeypatch.setattr(G, "time_ms", lambda op, w: 1.0)  # ties go to F.linear
    x, w, _ = operands(1, 40, 64)
    assert torch.equal(G.linear(x, w), F.linear(x, w))
    assert G._tuned == {(1, 40, 64): None} and kernel_calls == []


def test_model_projections_and_logits_dispatch_through_linear(monkeypatch):
    cfg = ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        attention_bias=True,
    )
    model = LlamaForCausalLM(cfg, 64)
    seen: list[tuple[tuple[int, ...], bool]] = []

    def spy(x, w, bias=None):
        seen.append((tuple(w.shape), bias is not None))
        return F.linear(x, w, bias)

    monkeypatch.setattr(G, "linear", spy)
    x = torch.randn(3, 32)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    attn.qkv_proj(x), attn.o_proj(x), mlp(x), model.compute_logits(x)
    shapes = cfg.projection_shapes()
    assert seen == [
        (shapes["qkv_proj"], True),  # Qwen2's qkv bias goes along
        (shapes["o_proj"], False),
        (shapes["gate_up_proj"], False),
        (shapes["down_proj"], False),
        (shapes["lm_head"], False),
    ]
    model.set_gemv(False)
    attn.qkv_proj(x), mlp(x), model.compute_logits(x)
    assert len(seen) == 5


def test_configs_round_trip_through_json(tmp_path):
    table = {(1, 6144, 4096): GemvConfig(8, 512, split_k=2, dot=True), (8, 4096, 4096): None}
    G.save_configs(tmp_path / "c.json", table)
    assert G.load_configs(tmp_path / "c.json") == table


# ---- on the GPU: bf16 at the Llama-3-8B shapes ---------------------------------------------

LLAMA3_8B = dummy_config("llama3-8b").projection_shapes()


@cuda_only
@pytest.mark.parametrize("name", list(LLAMA3_8B))
def test_real_shapes_bf16_every_candidate(name):
    n, k = LLAMA3_8B[name]
    _, w, b = operands(1, n, k, dtype=torch.bfloat16, bias=True)
    for m in (1, 5):
        x = operands(m, 1, k, dtype=torch.bfloat16, seed=m)[0]
        ref = F.linear(x.float(), w.float(), b.float())
        for c in G.candidates(m, n, k, G._sm_count(x.device)):
            # one bf16 rounding of the output (2^-9 relative) over fp32 accumulation
            assert rel_err(G.gemv(x, w, b, c), ref) < 1e-2, (name, m, c)


@cuda_only
@pytest.mark.parametrize("config", [GemvConfig(4, 1024), GemvConfig(16, 128, dot=True)])
def test_gate_up_silu_mul_epilogue_bf16_is_bitwise_the_two_ops(config):
    from kvgrid.layers import fused_ops

    n, k = LLAMA3_8B["gate_up_proj"]
    _, w, _ = operands(1, n, k, dtype=torch.bfloat16)
    for m in (1, 4) if config.dot else (1,):
        x = operands(m, 1, k, dtype=torch.bfloat16, seed=m)[0]
        two_ops = fused_ops.silu_mul(G.gemv(x, w, None, config))
        assert torch.equal(G.gemv(x, w, None, config, silu_mul=True), two_ops), m


@cuda_only
def test_tune_then_dispatch_on_gpu(kernel_calls):
    n, k = LLAMA3_8B["o_proj"]
    chosen = G.tune([(n, k)], ms=(1, 8))
    assert set(chosen) == {(1, n, k), (8, n, k)}
    kernel_calls.clear()  # the tuner's own runs
    for m in (1, 8):
        x, w, _ = operands(m, n, k, dtype=torch.bfloat16, seed=m)
        y = G.linear(x, w)
        assert rel_err(y, F.linear(x.float(), w.float())) < 1e-2
    assert kernel_calls == [c for c in chosen.values() if c is not None]


@cuda_only
def test_capture_of_an_unseen_shape_uses_f_linear(kernel_calls):
    x, w, _ = operands(1, 256, 512, dtype=torch.bfloat16)
    F.linear(x, w)  # cuBLAS handles ready outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = G.linear(x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert kernel_calls == [] and G._tuned == {}
    assert torch.equal(y, F.linear(x, w))
