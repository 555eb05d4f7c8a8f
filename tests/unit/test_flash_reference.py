"""transformers' own flash_attention_2 code path, run on the CPU through the reference flash-attn.

No CUDA, so no real flash-attn here: `tests/flashref/flash_attn` implements the functions
transformers imports (`flash_attn_func`, `flash_attn_varlen_func`, `flash_attn_with_kvcache`,
`bert_padding.pad_input/unpad_input`) with one SDPA call per sequence, and the `flash_reference`
fixture (tests/conftest.py -> tests/flashref/__init__.py) patches only transformers'
`is_flash_attn_2_available` (False without CUDA whatever is installed). Everything else runs as on
a GPU: dsembed's build_model / set_attention_mode, transformers' flash mask builder, its unpadding
(`_upad_input`), its kwargs processing, and the `causal` argument it passes (transformers 5.24:
config.is_causal, handed down as the `is_causal` keyword, which wins over the attention module's
`is_causal`; dsembed sets both). All comparisons in float32 (transformers only warns about fp32 with flash).

What is asserted:
- the reference itself against an independent float64 einsum (GQA grouping, scale, bottom-right
  causal, windows, varlen boundaries), and deliberately wrong references fail the model comparison;
- for llama, mistral, qwen2, qwen3 x causal / bidirectional x left / right padding: embeddings and
  the real tokens' final states of the flash_attention_2 model equal the sdpa model's to 1e-5, for an
  equal-length batch (transformers calls flash_attn_func) and a padded one (flash_attn_varlen_func),
  and each text alone equals its row of the padded batch; every call got `causal` = the mode;
- under bidirectional the first token's state changes when only the last token changes (both
  paths); under causal it does not;
- LoRA + gradient checkpointing: the trainable parameters' gradients equal sdpa's;
- Mistral's sliding window: causal agrees with sdpa; bidirectional with a window shorter than the
  text does NOT in transformers 5.24 (flash passes window (w-1, w-1), the sdpa/eager mask keeps
  |i - j| <= w): pinned here so a transformers change is noticed.
"""
from __future__ import annotations

import math

import pytest
import torch

from dsembed.modeling import build_model
from tests.conftest import make_tiny_recipe, tiny_backbone_config

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
TOL = 1e-5
UNEQUAL = ["hello world", "a much longer text than the others here", "x", "medium sized one"]
EQUAL = ["abcdefgh", "ijklmnop", "qrstuvwx"]  # same byte length: no padding, the dense path


# ----------------------------------------------------------------------------- the reference alone

def _explicit(q, k, v, causal, scale=None, window=(-1, -1)):
    """float64 softmax(q k^T * scale + mask) v for one sequence, GQA by grouping query heads.
    q [Sq, H, Dh], k/v [Sk, Hk, Dh] -> [Sq, H, Dh]."""
    sq, h, d = q.shape
    sk, hk, _ = k.shape
    qg = q.double().reshape(sq, hk, h // hk, d)  # query heads h = g * (H/Hk) + r use kv head g
    scores = torch.einsum("sgrd,tgd->grst", qg, k.double()) * (scale or 1 / math.sqrt(d))  # [Hk, H/Hk, Sq, Sk]
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    for i in range(sq):
        for j in range(sk):
            diag = i + sk - sq
            if causal and j > diag:
                allowed[i, j] = False
            if window[0] >= 0 and j < diag - window[0]:
                allowed[i, j] = False
            if window[1] >= 0 and j > diag + window[1]:
                allowed[i, j] = False
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    out = torch.einsum("grst,tgd->sgrd", probs, v.double())
    return out.reshape(sq, h, d).float()


@pytest.mark.parametrize("causal", [False, True])
def test_reference_dense_matches_explicit_attention(flash_reference, causal):
    fa = flash_reference
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, heads, 8, generator=gen) for heads in (6, 2, 2))
    out = fa.flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal)
    for b in range(2):
        assert torch.allclose(out[b], _explicit(q[b], k[b], v[b], causal, 0.3), atol=1e-5)
    assert fa.CALLS["flash_attn_func"] == 1


def test_reference_bottom_right_causal_and_windows(flash_reference):
    fa = flash_reference
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 3, 2, 4, generator=gen), torch.randn(1, 6, 2, 4, generator=gen), torch.randn(1, 6, 2, 4, generator=gen)
    for causal, window in [(True, (-1, -1)), (False, (1, 1)), (True, (2, -1)), (False, (0, 2))]:
        out = fa.flash_attn_func(q, k, v, causal=causal, window_size=window)
        assert torch.allclose(out[0], _explicit(q[0], k[0], v[0], causal, None, window), atol=1e-5), (causal, window)
    blind = fa.flash_attn_func(k, q, q, causal=True)  # Sq 6 > Sk 3: the first 3 queries see no key
    assert torch.equal(blind[0, :3], torch.zeros_like(blind[0, :3]))


def test_reference_varlen_keeps_sequences_apart(flash_reference):
    fa = flash_reference
    from flash_attn.bert_padding import pad_input, unpad_input

    gen = torch.Generator().manual_seed(2)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])  # left padded
    q, k, v = (torch.randn(3, 5, heads, 4, generator=gen) for heads in (4, 2, 2))
    qu, idx, cu, max_len, used = unpad_input(q, mask)
    ku, vu = unpad_input(k, mask)[0], unpad_input(v, mask)[0]
    assert cu.tolist() == [0, 3, 8, 9] and max_len == 5 and used.tolist() == [3, 5, 1] and cu.dtype == torch.int32
    for causal in (False, True):
        out = pad_input(fa.flash_attn_varlen_func(qu, ku, vu, cu, cu, max_len, max_len, causal=causal), idx, 3, 5)
        for b in range(3):
            real = mask[b].bool()
            assert torch.allclose(out[b][real], _explicit(q[b][real], k[b][real], v[b][real], causal), atol=1e-5)
            assert torch.equal(out[b][~real], torch.zeros_like(out[b][~real]))
    with pytest.raises(ValueError, match="max_seqlen"):
        fa.flash_attn_varlen_func(qu, ku, vu, cu, cu, 2, 2)


# ----------------------------------------------------------------------------- through dsembed + transformers

def _pair(arch: str, mode: str, side: str, **model):
    """(sdpa model, flash_attention_2 model) with the same weights, eval mode."""
    pooling = {"type": "multi_layer_attention", "layers": "all", "num_latents": 4, "num_heads": 2, "head_dim": 8}
    torch.manual_seed(0)
    sdpa = build_model(make_tiny_recipe(arch, pooling=pooling, attention=mode, padding_side=side, **model)).eval()
    flash = build_model(make_tiny_recipe(arch, pooling=pooling, attention=mode, padding_side=side,
                                         attn_implementation="flash_attention_2", **model)).eval()
    flash.load_state_dict(sdpa.state_dict())
    assert flash.backbone.config._attn_implementation == "flash_attention_2"
    return sdpa, flash


def _outputs(model, batch):
    with torch.no_grad():
        emb = model(batch["input_ids"], batch["attention_mask"])  # [B, D]
        states = model.run_backbone(batch["input_ids"], batch["attention_mask"])[0]  # [B, T, D]
    return emb, states[batch["attention_mask"].bool()]  # real tokens only: flash leaves zeros at pads


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
@pytest.mark.parametrize("arch", ARCHS)
def test_flash_path_equals_sdpa(flash_reference, arch, mode, side):
    fa = flash_reference
    seen: list[bool] = []
    sdpa, flash = _pair(arch, mode, side)
    layers = flash.backbone.config.num_hidden_layers
    # transformers holds the functions it imported at build time; record `causal` through `attend`
    attend = fa.attend

    def recording(q, k, v, causal, *args):
        seen.append(causal)
        return attend(q, k, v, causal, *args)

    fa.attend = recording
    try:
        padded = sdpa.tokenize(UNEQUAL)
        assert (padded["attention_mask"] == 0).any()
        before = dict(fa.CALLS)
        for a, b in zip(_outputs(sdpa, padded), _outputs(flash, padded)):
            assert _max_diff(a, b) <= TOL
        assert fa.CALLS["flash_attn_varlen_func"] - before["flash_attn_varlen_func"] == 2 * layers
        assert fa.CALLS["flash_attn_func"] == before["flash_attn_func"]

        full = sdpa.tokenize(EQUAL)
        assert bool(full["attention_mask"].all())
        before = dict(fa.CALLS)
        for a, b in zip(_outputs(sdpa, full), _outputs(flash, full)):
            assert _max_diff(a, b) <= TOL
        assert fa.CALLS["flash_attn_func"] - before["flash_attn_func"] == 2 * layers
        assert fa.CALLS["flash_attn_varlen_func"] == before["flash_attn_varlen_func"]

        batch_emb = _outputs(flash, padded)[0]
        for i, text in enumerate(UNEQUAL):  # alone: no padding, the dense path
            assert _max_diff(_outputs(flash, flash.tokenize([text]))[0][0], batch_emb[i]) <= TOL
    finally:
        fa.attend = attend
    assert seen and set(seen) == {mode == "causal"}


def _first_token_shift(model, texts, side):
    """How far the first real token's final state moves when only each text's last real token changes."""
    batch = model.tokenize(texts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    changed = ids.clone()
    lengths = mask.sum(1)
    first = (mask.shape[1] - lengths) if side == "left" else torch.zeros_like(lengths)
    last = first + lengths - 1
    rows = torch.arange(len(texts))
    changed[rows, last] = (ids[rows, last] + 7) % 250 + 3
    with torch.no_grad():
        a = model.run_backbone(ids, mask)[0][rows, first]  # [B, D]
        b = model.run_backbone(changed, mask)[0][rows, first]
    return (a - b).abs().amax(dim=1)  # [B]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_bidirectional_first_token_sees_the_last(flash_reference, arch, side):
    fa = flash_reference
    for mode in ("causal", "bidirectional"):
        _, flash = _pair(arch, mode, side)
        for texts in (UNEQUAL, EQUAL):
            before = dict(fa.CALLS)
            shift = _first_token_shift(flash, texts, side)
            path = "flash_attn_varlen_func" if texts is UNEQUAL else "flash_attn_func"
            assert fa.CALLS[path] > before[path]
            if mode == "causal":  # every text has >= 2 tokens (EOS appended): first != last
                assert bool((shift == 0).all()), shift
            else:
                assert bool((shift > 1e-4).all()), shift


def test_gradients_with_lora_and_checkpointing_equal_sdpa(flash_reference):
    for arch in ("llama", "qwen2"):
        sdpa, flash = _pair(arch, "bidirectional", "left", lora=True, gradient_checkpointing=True)
        grads = []
        for m in (sdpa, flash):
            m.train()
            batch = m.tokenize(UNEQUAL)
            emb = m(batch["input_ids"], batch["attention_mask"])
            (emb @ emb.T).square().sum().backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and any("lora_B" in n for n in grads[0])
        for name in grads[0]:
            assert _max_diff(grads[0][name], grads[1][name]) <= 1e-4 * max(1.0, grads[0][name].abs().max().item()), name


def test_mistral_sliding_window(flash_reference):
    window = {"random_init": tiny_backbone_config("mistral", sliding_window=3)}
    batch_texts = ["hello world", "a much longer text here"]
    sdpa, flash = _pair("mistral", "causal", "left", **window)
    batch = sdpa.tokenize(batch_texts)
    for a, b in zip(_outputs(sdpa, batch), _outputs(flash, batch)):
        assert _max_diff(a, b) <= TOL
    sdpa, flash = _pair("mistral", "bidirectional", "left", **window)
    assert _max_diff(_outputs(sdpa, batch)[1], _outputs(flash, batch)[1]) > 1e-2  # transformers 5.24: w vs w - 1
    wider = {"random_init": tiny_backbone_config("mistral", sliding_window=4)}
    _, flash_wider = _pair("mistral", "bidirectional", "left", **wider)
    flash_wider.load_state_dict(sdpa.state_dict())
    assert _max_diff(_outputs(sdpa, batch)[1], _outputs(flash_wider, batch)[1]) <= TOL  # the same, one wider


# ----------------------------------------------------------------------------- a wrong reference must fail

def _wrong_ignores_causal(fa):
    attend = fa.attend
    return lambda q, k, v, causal, *rest: attend(q, k, v, False, *rest)


def _wrong_gqa_tiling(fa):
    attend = fa.attend

    def wrong(q, k, v, causal, *rest):  # query head h on kv head h % Hk instead of h // (H / Hk)
        rep = q.shape[1] // k.shape[1]
        return attend(q, k.repeat(1, rep, 1), v.repeat(1, rep, 1), causal, *rest)
    return wrong


def _wrong_scale(fa):
    attend = fa.attend
    return lambda q, k, v, causal, scale, *rest: attend(q, k, v, causal, 1.0, *rest)


@pytest.mark.parametrize("wrong", [_wrong_ignores_causal, _wrong_gqa_tiling, _wrong_scale])
def test_a_wrong_reference_fails_the_comparison(flash_reference, monkeypatch, wrong):
    fa = flash_reference
    sdpa, flash = _pair("qwen2", "causal", "left")
    monkeypatch.setattr(fa, "attend", wrong(fa))
    batch = sdpa.tokenize(UNEQUAL)
    assert _max_diff(_outputs(sdpa, batch)[1], _outputs(flash, batch)[1]) > 1e-3


def test_a_varlen_that_mixes_sequences_fails(flash_reference, monkeypatch):
    fa = flash_reference
    varlen = fa.flash_attn_varlen_func

    def leaky(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
              causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
              return_attn_probs=False, block_table=None):  # one sequence: every token sees every text
        whole = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        return varlen(q, k, v, whole, whole, q.shape[0], k.shape[0], dropout_p, softmax_scale, causal)

    monkeypatch.setattr(fa, "flash_attn_varlen_func", leaky)  # before the build: transformers imports it then
    sdpa, flash = _pair("llama", "bidirectional", "right")
    batch = sdpa.tokenize(UNEQUAL)
    assert _max_diff(_outputs(sdpa, batch)[0], _outputs(flash, batch)[0]) > 1e-3


# ----------------------------------------------------------------------------- where `causal` comes from; exports

def test_causal_argument_follows_the_config(flash_reference, monkeypatch):
    """transformers 5.24's forward wrapper (utils/generic.py) passes config.is_causal as the `is_causal`
    keyword, which flash_attention_forward prefers to the module's `is_causal`: the config decides."""
    fa = flash_reference
    seen: list[bool] = []
    attend = fa.attend
    monkeypatch.setattr(fa, "attend", lambda q, k, v, causal, *rest: (seen.append(causal), attend(q, k, v, causal, *rest))[1])
    _, flash = _pair("llama", "bidirectional", "left")
    for module in flash.modules():
        if "is_causal" in vars(module) and isinstance(module.is_causal, bool):
            module.is_causal = True  # the modules say causal, the config says bidirectional
    _outputs(flash, flash.tokenize(UNEQUAL))
    assert seen and not any(seen)


def test_float32_export_of_a_flash_run_loads_with_sdpa(flash_reference, tmp_path, capsys):
    """A bf16 flash run with merged LoRA is exported in float32, which flash-attn refuses: load uses sdpa."""
    from dsembed import EmbeddingModel

    fa = flash_reference
    fa.HALF_ONLY = True  # refuse float32 as the real kernels do
    recipe = make_tiny_recipe("qwen2", attention="bidirectional", lora=True, dtype="bfloat16",
                              attn_implementation="flash_attention_2")
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = model.tokenize(UNEQUAL)
    with torch.no_grad():
        live = model(batch["input_ids"], batch["attention_mask"]).float()  # bf16 through the reference
    model.save(tmp_path / "export")
    loaded = EmbeddingModel.load(tmp_path / "export")
    assert loaded.backbone.dtype == torch.float32 and loaded.backbone.config._attn_implementation == "sdpa"
    assert "flash-attn computes in fp16 / bf16 only" in capsys.readouterr().err
    with torch.no_grad():
        again = loaded(batch["input_ids"], batch["attention_mask"])
    assert torch.nn.functional.cosine_similarity(live, again).min().item() > 0.999
    fp32 = build_model(make_tiny_recipe("qwen2", attn_implementation="flash_attention_2")).eval()
    with pytest.raises(RuntimeError, match="fp16 and bf16"), torch.no_grad():
        fp32(batch["input_ids"], batch["attention_mask"])


def test_flash_is_kept_only_where_flash_attn_can_run_it(flash_reference):
    from dsembed.modeling.backbone import available_attn_implementation as pick

    assert pick("flash_attention_2", torch.bfloat16) == "flash_attention_2"
    assert pick("flash_attention_2", torch.float16, "cuda:0") == "flash_attention_2"
    assert pick("flash_attention_2", torch.float32) == "sdpa"
    assert pick("flash_attention_2", torch.bfloat16, "cpu") == "sdpa"
    assert pick("sdpa", torch.float32, "cpu") == "sdpa" and pick("eager") == "eager"


def test_a_float32_flash_recipe_is_refused_at_validation():
    from dsembed.errors import RecipeError
    from dsembed.recipe_rules import validate

    with pytest.raises(RecipeError, match=r"model\.attn_implementation = flash_attention_2 with model\.dtype float32"):
        validate(make_tiny_recipe("llama", attn_implementation="flash_attention_2"))
    validate(make_tiny_recipe("llama", attn_implementation="flash_attention_2", dtype="bfloat16"))
