"""longreach.rope_frequencies and nn.RotaryEmbedding against Hugging Face's own code:
transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS for every rope_type and
several factors, and the cos / sin a LlamaRotaryEmbedding built from a tiny
LlamaConfig produces (random init, no download). Plus every bad-config error.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import longreach
from longreach.nn import RotaryEmbedding

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

F32_ULP = torch.finfo(torch.float32).eps  # compare to float32 precision: at most one ulp apart


def llama_config(params, head_dim=64, max_position_embeddings=4096):
    params = dict(params)
    params.setdefault("rope_theta", 10000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                           intermediate_size=32, num_hidden_layers=1, vocab_size=32,
                           max_position_embeddings=max_position_embeddings, rope_parameters=params)


def hf_frequencies(params, head_dim=64, max_position_embeddings=4096, seq_len=None):
    config = llama_config(params, head_dim, max_position_embeddings)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":  # not in ROPE_INIT_FUNCTIONS; GPT-NeoX's version honours partial_rotary_factor
        return GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)


def assert_same_frequencies(ours, theirs):
    (inv_a, af_a), (inv_b, af_b) = ours, theirs
    assert inv_a.dtype == torch.float32 and inv_a.shape == inv_b.shape
    torch.testing.assert_close(inv_a, inv_b.float(), rtol=F32_ULP, atol=0)
    assert math.isclose(af_a, float(af_b), rel_tol=1e-12), (af_a, af_b)


def longrope_lists(half, seed=0):
    g = torch.Generator().manual_seed(seed)
    short = (1.0 + torch.rand(half, generator=g) * 0.5).tolist()
    long = (1.0 + torch.rand(half, generator=g) * 30.0).tolist()
    return short, long


CASES = {
    "default": [({}, {}), ({"partial_rotary_factor": 0.5}, {}), ({"rope_theta": 500000.0}, {})],
    "linear": [({"factor": f}, {}) for f in (1.0, 2.0, 4.0, 7.5)] + [({"factor": 3.0, "partial_rotary_factor": 0.25}, {})],
    "dynamic": [({"factor": f}, {"seq_len": s}) for f in (2.0, 4.0) for s in (None, 100, 4096, 5000, 20000)]
    + [({"factor": 2.0, "partial_rotary_factor": 0.5}, {"seq_len": 9000})],
    "yarn": [({"factor": f, "original_max_position_embeddings": 4096 // int(f)}, {}) for f in (2.0, 4.0, 16.0)]
    + [
        ({"factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 16, "beta_slow": 2}, {}),
        ({"factor": 4.0, "original_max_position_embeddings": 1024, "truncate": False}, {}),
        ({"factor": 4.0, "original_max_position_embeddings": 1024, "attention_factor": 0.9}, {}),
        ({"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0,
          "beta_fast": 32, "beta_slow": 1}, {}),  # DeepSeek-V3 style
        ({"factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 0.707, "mscale_all_dim": 1.0}, {}),
        ({"factor": 4.0, "original_max_position_embeddings": 1024, "partial_rotary_factor": 0.5}, {}),
        ({"factor": 1.0, "original_max_position_embeddings": 4096}, {}),
    ],
    "longrope": [
        ({"original_max_position_embeddings": 1024}, {"seq_len": None}),  # factor from max_position_embeddings
        ({"original_max_position_embeddings": 1024}, {"seq_len": 1024}),
        ({"original_max_position_embeddings": 1024}, {"seq_len": 1025}),
        ({"original_max_position_embeddings": 1024, "factor": 8.0}, {"seq_len": 3000}),
        ({"original_max_position_embeddings": 1024, "attention_factor": 1.5}, {"seq_len": 3000}),
        ({"original_max_position_embeddings": 4096, "factor": 1.0}, {}),
    ],
    "llama3": [
        ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024,
          "rope_theta": 500000.0}, {}),
        ({"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 512,
          "rope_theta": 500000.0}, {}),  # Llama 3.2 style
        ({"factor": 2.0, "low_freq_factor": 2.0, "high_freq_factor": 3.0, "original_max_position_embeddings": 256}, {}),
    ],
}


def _cases():
    for rope_type, cases in CASES.items():
        for i, (params, kwargs) in enumerate(cases):
            yield pytest.param(rope_type, params, kwargs, id=f"{rope_type}-{i}")


@pytest.mark.parametrize("rope_type, params, kwargs", list(_cases()))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_equals_rope_init_functions(rope_type, params, kwargs, head_dim):
    params = dict(params, rope_type=rope_type)
    if rope_type == "longrope":
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        params["short_factor"], params["long_factor"] = longrope_lists(dim // 2)
    theirs = hf_frequencies(params, head_dim=head_dim, **kwargs)
    ours = longreach.rope_frequencies(head_dim, scaling=params, max_position_embeddings=4096, **kwargs)
    assert_same_frequencies(ours, theirs)


def test_v4_style_type_key_and_rope_theta():
    """Older configs say {"type": ...}; rope_theta inside the dict is the base, as in HF v5's rope_parameters."""
    theirs = hf_frequencies({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    assert_same_frequencies(longreach.rope_frequencies(64, scaling={"type": "linear", "factor": 2.0, "rope_theta": 1e6}),
                            theirs)
    assert_same_frequencies(longreach.rope_frequencies(64, 1e6, {"type": "linear", "factor": 2.0}), theirs)


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_static_ntk(factor, head_dim):
    """Hugging Face has no 'ntk' type. Ours is the static NTK-aware rule base * factor^(d/(d-2)),
    which is HF's dynamic NTK with factor 1 evaluated at seq_len = factor * max_position_embeddings."""
    ours = longreach.rope_frequencies(head_dim, scaling={"rope_type": "ntk", "factor": factor})
    theirs = hf_frequencies({"rope_type": "dynamic", "factor": 1.0}, head_dim, 1024, seq_len=int(factor * 1024))
    assert_same_frequencies(ours, theirs)
    written_out = 1.0 / (10000.0 * factor ** (head_dim / (head_dim - 2))) ** (torch.arange(0, head_dim, 2).double() / head_dim)
    torch.testing.assert_close(ours[0].double(), written_out, rtol=4 * F32_ULP, atol=0)
    # The lowest frequency is stretched by exactly `factor`, the highest not at all.
    plain, _ = longreach.rope_frequencies(head_dim)
    assert ours[0][0] == plain[0]
    assert math.isclose(plain[-1] / ours[0][-1], factor, rel_tol=1e-5)


def test_returns_on_device_and_default_matches_llama():
    inv, af = longreach.rope_frequencies(64, device="cpu")
    want, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(llama_config({"rope_type": "default"}))
    torch.testing.assert_close(inv, want, rtol=F32_ULP, atol=0)
    assert af == 1.0 and inv.device.type == "cpu"


# ---------------------------------------------------------------------------
# nn.RotaryEmbedding tables vs LlamaRotaryEmbedding.


def module_params(rope_type, head_dim):
    if rope_type == "default":
        return {}
    params = {"rope_type": rope_type}
    params.update({
        "linear": {"factor": 4.0},
        "dynamic": {"factor": 2.0},
        "yarn": {"factor": 4.0, "original_max_position_embeddings": 64},
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32},
        "longrope": {"original_max_position_embeddings": 64},
    }[rope_type])
    if rope_type == "longrope":
        params["short_factor"], params["long_factor"] = longrope_lists(head_dim // 2)
    return params


@pytest.mark.parametrize("rope_type", ["default", "linear", "dynamic", "yarn", "longrope", "llama3"])
def test_module_tables_equal_llama_rotary_embedding(rope_type):
    """A sequence of calls of different lengths (growth past the table, dynamic's history,
    longrope's switch and back): at each call our tables hold HF's cos / sin."""
    head_dim, max_pos = 16, 256
    params = module_params(rope_type, head_dim)
    hf_rope = LlamaRotaryEmbedding(llama_config(params, head_dim, max_pos))
    ours = RotaryEmbedding(head_dim, 10000.0, max_pos, scaling=params)
    for length in (40, 100, 300, 700, 280, 30, 1000):
        pos = torch.arange(length)[None]
        x = torch.empty(1, length, head_dim)
        hf_cos, hf_sin = hf_rope(x, pos)
        cos, sin = ours.tables(length)
        assert cos.shape[0] >= length and cos.dtype == torch.float32
        torch.testing.assert_close(cos[:length], hf_cos[0, :, : head_dim // 2], rtol=F32_ULP, atol=F32_ULP)
        torch.testing.assert_close(sin[:length], hf_sin[0, :, : head_dim // 2], rtol=F32_ULP, atol=F32_ULP)
        # HF's tables are the half table written twice (rotate-half layout).
        assert torch.equal(hf_cos[0, :, : head_dim // 2], hf_cos[0, :, head_dim // 2:])


@pytest.mark.parametrize("rope_type", ["default", "dynamic", "yarn", "longrope"])
def test_module_rotates_like_hugging_face(rope_type):
    """q and k through RotaryEmbedding.forward equal HF's apply_rotary_pos_emb with HF's cos / sin,
    with position ids that continue a cache (decode after a prefix)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim = 32
    params = module_params(rope_type, head_dim)
    hf_rope = LlamaRotaryEmbedding(llama_config(params, head_dim, 128))
    ours = RotaryEmbedding(head_dim, 10000.0, 128, scaling=params)
    q, k = torch.randn(2, 4, 9, head_dim), torch.randn(2, 2, 9, head_dim)
    pos = torch.stack([torch.arange(150, 159), torch.arange(3, 12)])
    hq, hk = apply_rotary_pos_emb(q, k, *hf_rope(q, pos))
    gq, gk = ours(q, k, position_ids=pos)
    torch.testing.assert_close(gq, hq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gk, hk, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours(q, position_ids=pos), gq)


def test_module_partial_rotary_interleaved_and_half():
    params = {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}
    ours = RotaryEmbedding(32, 10000.0, 64, scaling=params, interleaved=True)
    assert ours.rot_dim == 16 and ours.cos.shape == (64, 8)
    x = torch.randn(1, 2, 10, 32)
    y = ours(x)
    assert torch.equal(y[..., 16:], x[..., 16:])
    inv, _ = longreach.rope_frequencies(32, scaling=params)
    angle = 3 * inv[0].double()  # position 3, pair (0, 1) in the interleaved layout
    want0 = x[0, 0, 3, 0].double() * angle.cos() - x[0, 0, 3, 1].double() * angle.sin()
    assert math.isclose(y[0, 0, 3, 0].item(), want0.item(), rel_tol=1e-5, abs_tol=1e-6)
    ours.half()  # casting the module must not degrade the tables
    assert ours(x.half()).dtype == torch.float16 and ours.cos.dtype == torch.float32


def test_module_compiles_fullgraph_without_recompiles():
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    rope = RotaryEmbedding(16, 10000.0, 64, scaling={"rope_type": "yarn", "factor": 2.0,
                                                      "original_max_position_embeddings": 32})
    counter = CompileCounter()
    compiled = torch.compile(lambda q, k: rope(q, k), backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            q, k = torch.randn(1, 2, 20, 16, requires_grad=True), torch.randn(1, 2, 20, 16, requires_grad=True)
            gq, gk = compiled(q, k)
            wq, wk = rope(q, k)
            assert torch.equal(gq, wq) and torch.equal(gk, wk)
            (gq.sum() + gk.sum()).backward()
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------
# Bad configs: each error names the key or argument.

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 1024}


def _longrope(short_len=32, long_len=32, **extra):
    return dict({"rope_type": "longrope", "original_max_position_embeddings": 1024, "factor": 4.0,
                 "short_factor": [1.0] * short_len, "long_factor": [1.0] * long_len}, **extra)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((64,), {"scaling": {"rope_type": "xpos"}}, r"unknown rope_type 'xpos'; expected one of"),
        ((64,), {"scaling": {"rope_type": "yarn", "original_max_position_embeddings": 1024}},
         r"rope_type 'yarn' needs scaling\['factor'\], which is missing"),
        ((64,), {"scaling": {"rope_type": "linear"}}, r"rope_type 'linear' needs scaling\['factor'\]"),
        ((64,), {"scaling": {"rope_type": "ntk"}}, r"rope_type 'ntk' needs scaling\['factor'\]"),
        ((64,), {"scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 2048, "seq_len": 0},
         r"seq_len must be a positive int, got 0"),
        ((64,), {"scaling": {"rope_type": "dynamic", "factor": 2.0}},
         r"rope_type 'dynamic' needs the pretraining context length: pass .*max_position_embeddings="),
        ((64,), {"scaling": {"rope_type": "linear", "factor": 0.5}}, r"scaling\['factor'\] must be >= 1.0, got 0.5"),
        ((64,), {"scaling": dict(YARN, factor=0.9)}, r"scaling\['factor'\] must be >= 1.0, got 0.9"),
        ((64,), {"scaling": dict(LLAMA3, factor=-2)}, r"scaling\['factor'\] must be >= 1.0, got -2"),
        ((64,), {"scaling": {"rope_type": "linear", "factor": "2"}}, r"scaling\['factor'\] must be a finite number, got '2'"),
        ((64,), {"scaling": {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}},
         r"rope_type 'llama3' needs scaling\['low_freq_factor'\]"),
        ((64,), {"scaling": dict(LLAMA3, high_freq_factor=1.0)},
         r"scaling\['high_freq_factor'\] \(1.0\) must be greater than scaling\['low_freq_factor'\] \(1.0\)"),
        ((64,), {"scaling": {k: v for k, v in YARN.items() if k != "original_max_position_embeddings"}},
         r"rope_type 'yarn' needs the pretraining context length"),
        ((64,), {"scaling": _longrope(short_len=31)}, r"scaling\['short_factor'\] has 31 entries; expected rot_dim / 2 = 32"),
        ((64,), {"scaling": _longrope(long_len=64)}, r"scaling\['long_factor'\] has 64 entries; expected rot_dim / 2 = 32"),
        ((64,), {"scaling": _longrope(partial_rotary_factor=0.5)}, r"scaling\['short_factor'\] has 32 entries; expected rot_dim / 2 = 16"),
        ((64,), {"scaling": {k: v for k, v in _longrope().items() if k != "long_factor"}},
         r"rope_type 'longrope' needs scaling\['long_factor'\], which is missing"),
        ((64,), {"scaling": {k: v for k, v in _longrope().items() if k != "factor"}},
         r"rope_type 'longrope' needs scaling\['factor'\] \(or max_position_embeddings="),
        ((64,), {"scaling": _longrope(short_factor=[1.0] * 31 + [-1.0])}, r"scaling\['short_factor'\] must be a list of positive numbers"),
        ((63,), {}, r"rotary dimension int\(head_dim \* partial_rotary_factor\) = int\(63 \* 1.0\) = 63 must be even"),
        ((64,), {"scaling": {"partial_rotary_factor": 0.3}}, r"= int\(64 \* 0.3\) = 19 must be even"),
        ((64,), {"scaling": {"partial_rotary_factor": 1.5}}, r"partial_rotary_factor'\] must be in \(0, 1\], got 1.5"),
        ((64,), {"scaling": {"partial_rotary_factor": 0.0}}, r"partial_rotary_factor'\] must be > 0.0, got 0.0"),
        ((0,), {}, r"head_dim must be a positive int, got 0"),
        ((64, 1.0), {}, r"base must be a number > 1, got 1.0"),
        ((64, 5e5), {"scaling": {"rope_theta": 1e6}}, r"base=500000.0 disagrees with scaling\['rope_theta'\]=1000000.0"),
        ((64,), {"scaling": [("rope_type", "linear")]}, r"scaling must be a dict or None, got list"),
    ],
)
def test_bad_config(args, kwargs, match):
    error = TypeError if "must be a dict" in match else ValueError
    with pytest.raises(error, match=match):
        longreach.rope_frequencies(*args, **kwargs)


def test_unknown_key_warns():
    with pytest.warns(UserWarning, match=r"rope_type 'linear' ignores scaling keys \['beta_fast'\]"):
        longreach.rope_frequencies(64, scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 32})


def test_module_rejects_bad_config_at_construction():
    with pytest.raises(ValueError, match=r"rope_type 'yarn' needs scaling\['factor'\]"):
        RotaryEmbedding(64, 10000.0, 2048, scaling={"rope_type": "yarn"})
