"""The GPT module alone: shapes, causality, exact parameter counts, the FLOPs formula, initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from clova_train.model.gpt import GPT, flops_per_token, num_params
from clova_train.model.loss import lm_loss
from clova_train.model.config import ModelConfig, pad_vocab
from clova_train.model.config import PRESETS


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("tiny", vocab_size=384, block_size=32))
    model.init_weights()
    return model.eval()


def test_shapes_and_loss(tiny):
    idx = torch.randint(0, 384, (3, 17))
    logits = tiny(idx)
    assert logits.shape == (3, 17, 384) and logits.dtype == torch.float32
    loss = tiny(idx[:, :-1], idx[:, 1:])
    assert loss.shape == () and loss.item() == pytest.approx(lm_loss(tiny(idx[:, :-1]), idx[:, 1:]).item())
    # Small initial logits: close to uniform over the vocabulary.
    assert loss.item() == pytest.approx(math.log(384), abs=0.15)


def test_too_long_sequences_are_refused(tiny):
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        tiny(torch.zeros(1, 33, dtype=torch.long))


def test_causality(tiny):
    """Changing token t changes no logit before t."""
    idx = torch.randint(0, 384, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 384
    with torch.no_grad():
        a, b = tiny(idx), tiny(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_head_is_tied_to_the_token_embedding(tiny):
    names = [n for n, _ in tiny.named_parameters()]
    assert not any("head" in n or "lm_head" in n for n in names)
    x = torch.randn(1, 4, 64)
    expected = torch.nn.functional.linear(tiny.ln_f(x), tiny.wte.weight)
    assert torch.allclose(tiny.head(x), expected)


def test_parameter_names_are_the_export_contract(tiny):
    names = {n for n, _ in tiny.named_parameters()}
    per_block = {"ln_1", "attn.qkv", "attn.proj", "ln_2", "mlp.fc", "mlp.proj"}
    expected = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    expected |= {f"blocks.{i}.{m}.{w}" for i in range(2) for m in per_block for w in ("weight", "bias")}
    assert names == expected


@pytest.mark.parametrize("name", ["tiny", "small", "137m", "350m", "1.3b"])
def test_num_params_is_exact(name):
    cfg = ModelConfig.from_name(name, vocab_size=pad_vocab(51200))
    with torch.device("meta"):
        model = GPT(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert num_params(cfg) == counted
    emb = cfg.vocab_size * cfg.n_embd + cfg.block_size * cfg.n_embd
    assert num_params(cfg, embeddings=False) == counted - emb


def test_paper_sizes():
    """The preset table gives the paper's sizes (1.3B is 1.3B with a 51,200 vocabulary...)."""
    sizes = {n: num_params(ModelConfig.from_name(n, vocab_size=51200)) / 1e9 for n in ("137m", "350m", "760m", "1.3b", "6.9b", "13b", "39b", "82b")}
    assert sizes["1.3b"] == pytest.approx(1.3, abs=0.1)
    assert sizes["6.9b"] == pytest.approx(6.9, abs=0.3)
    assert sizes["13b"] == pytest.approx(12.9, abs=0.5)
    assert sizes["82b"] == pytest.approx(81.9, abs=1.0)


def test_flops_per_token_formula():
    """6 x (non-embedding parameters + tied head) + 12 x layers x seq_len x d_model (PaLM, appendix B)."""
    cfg = ModelConfig.from_name("1.3b", vocab_size=51200)
    d, L, V, T = 2048, 24, 51200, 2048
    blocks = L * (12 * d * d + 13 * d) + 2 * d
    assert num_params(cfg, embeddings=False) == blocks
    assert flops_per_token(cfg, T) == 6 * (blocks + V * d) + 12 * L * T * d
    # Attention's share grows with the sequence, the dense part does not.
    assert flops_per_token(cfg, 4096) - flops_per_token(cfg, 2048) == 12 * L * 2048 * d


def test_flops_formula_matches_counted_matmuls():
    """Forward matmul FLOPs of one sequence, counted by hand, x3 for backward = flops_per_token x tokens."""
    cfg = ModelConfig.from_name("tiny", vocab_size=384, block_size=64)
    d, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, 64
    per_layer = 2 * T * d * 3 * d + 2 * T * d * d + 2 * T * d * 4 * d * 2  # qkv, proj, fc + mlp.proj
    attention = 2 * 2 * T * T * d  # QK^T and AV, full (not causally halved)
    head = 2 * T * d * V
    forward = L * (per_layer + attention) + head
    # 6N also counts biases and LayerNorms (6 FLOPs per parameter per token), which are not matmuls.
    small_params = 6 * (L * 13 * d + 2 * d) * T
    assert 3 * forward + small_params == flops_per_token(cfg, T) * T


def test_initialisation_follows_gpt3(tiny):
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_name("small", vocab_size=4096))
    m.init_weights()
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert torch.all(m.blocks[0].attn.qkv.bias == 0) and torch.all(m.ln_f.weight == 1)


def test_pad_vocab_and_config_checks():
    assert pad_vocab(2000) == 2048 and pad_vocab(2048) == 2048 and pad_vocab(51200) == 51200
    from clova_train.core.errors import ClovaError

    with pytest.raises(ClovaError, match="not divisible"):
        ModelConfig(n_embd=100, n_head=16)
    with pytest.raises(ClovaError, match="unknown model preset"):
        ModelConfig.from_name("7b")
    with pytest.raises(ClovaError, match="unknown model field"):
        ModelConfig.from_name("tiny", hidden=3)
    assert set(PRESETS) >= {"tiny", "137m", "1.3b", "82b"}


def _shapes_made(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor the ATen ops inside ``fn()`` produce."""
    from torch.utils._python_dispatch import TorchDispatchMode

    made = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor))
            return out

    with Record():
        fn()
    return made


def test_loss_under_no_grad_builds_no_gradient(tiny):
    """Evaluation (no_grad) computes the loss only: no head-weight gradient the size of the embedding table is built."""
    idx = torch.randint(0, 384, (2, 17))
    table = tuple(tiny.wte.weight.shape)
    with torch.no_grad():
        evaluated = _shapes_made(lambda: tiny(idx[:, :-1], idx[:, 1:]))
    assert table not in evaluated
    trained = _shapes_made(lambda: tiny(idx[:, :-1], idx[:, 1:]).backward())
    assert table in trained  # the same probe sees the gradient when there is one
    assert all(p.grad is not None for p in tiny.parameters())
    tiny.zero_grad(set_to_none=True)


def test_parts_are_the_model_and_build_on_meta_without_drawing():
    """The pipeline's parts are GPT's own modules, named as GPT names them; building on meta draws no random numbers."""
    from clova_train.model.gpt import part_names, parts

    cfg = ModelConfig.from_name("tiny", vocab_size=256, block_size=16)
    state = torch.get_rng_state()
    with torch.device("meta"):
        model = GPT(cfg)
    assert torch.equal(state, torch.get_rng_state())
    assert [type(layer) for layer in model.layers()] == [p.module for p in parts(cfg)[:-1]]
    names = part_names(cfg)
    assert sorted(n for own in names for n in own.values()) == sorted(n for n, _ in model.named_parameters())
    # Seeded initialisation does not depend on the build order: part i always draws from seed + i.
    a, b = GPT(cfg), GPT(cfg)
    torch.manual_seed(99)
    a.init_weights(seed=7)
    b.init_weights(seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
