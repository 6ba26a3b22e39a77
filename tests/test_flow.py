"""Flow-matching perceptual model: chains, velocity target, prompt masking, solvers, synthesis; codec
latents; the SoundStorm-style masked NAR."""
import numpy as np
import pytest
import torch

from models.codec import CodecConfig, EncodecCodec, MelRVQCodec
from models.flow import FlowConfig, FlowModel, flow_batch, flow_target, integrate, nfe, path_and_velocity, prior

D = 80


def _codec(n_q=3, K=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    books = torch.randn(n_q, K, D, generator=g) / torch.arange(1, n_q + 1)[:, None, None]  # finer levels smaller
    return MelRVQCodec(CodecConfig(n_q=n_q, codebook_size=K, griffin_lim_iters=4, nnls_iters=2), books - 3.0)


def _tiny(chain="implicit", **kw):
    torch.manual_seed(0)
    return FlowModel(FlowConfig(latent_dim=D, dim=32, depth=2, heads=2, ffn=64, conv_kernel=5, chain=chain, **kw))


# -- the chains ---------------------------------------------------------------------------------
def test_prior_is_centred_on_semantics_only_for_the_implicit_chain():
    v1, noise = torch.randn(2, 5, D), torch.randn(2, 5, D)
    assert torch.equal(prior("implicit", v1, noise), noise + v1)
    assert torch.equal(prior("explicit", v1, noise), noise)
    x1 = torch.randn(2, 5, D)
    assert torch.equal(flow_target("implicit", x1, v1), x1)
    assert torch.allclose(flow_target("explicit", x1, v1), x1 - v1)


def test_straight_path_and_velocity_by_hand():
    x0 = torch.tensor([[[1.0, -2.0]]])
    y = torch.tensor([[[3.0, 2.0]]])
    w, v = path_and_velocity(x0, y, torch.tensor([0.25]))
    assert torch.allclose(w, torch.tensor([[[1.5, -1.0]]]))  # 0.75 * x0 + 0.25 * y
    assert torch.allclose(v, torch.tensor([[[2.0, 4.0]]]))   # y - x0


def test_path_runs_from_the_prior_to_the_target_at_its_velocity():
    x0, y = torch.randn(3, 4, D), torch.randn(3, 4, D)
    w0, v = path_and_velocity(x0, y, torch.zeros(3))
    w1, _ = path_and_velocity(x0, y, torch.ones(3))
    assert torch.allclose(w0, x0) and torch.allclose(w1, y, atol=1e-6)
    # the velocity is dw/dt at every t (finite differences, float64 to keep them exact enough)
    x0d, yd = x0.double(), y.double()
    for t in (0.1, 0.5, 0.9):
        a, v_t = path_and_velocity(x0d, yd, torch.full((3,), t, dtype=torch.float64))
        b, _ = path_and_velocity(x0d, yd, torch.full((3,), t + 1e-6, dtype=torch.float64))
        assert torch.allclose((b - a) / 1e-6, v_t, atol=1e-5)
    assert torch.allclose(v, y - x0)


@pytest.mark.parametrize("chain", ["implicit", "explicit"])
@pytest.mark.parametrize("solver,steps", [("euler", 1), ("euler", 5), ("midpoint", 3)])
def test_synthesis_with_the_exact_field_returns_the_target_latent(chain, solver, steps, monkeypatch):
    """With the true conditional field towards a known latent in place of the network, ``synthesize``
    (prior, solver, the explicit chain's + v1, de-normalisation) must give back exactly that latent."""
    model = _tiny(chain)
    g = torch.Generator().manual_seed(0)
    model.set_normalizer([torch.randn(30, D, generator=g) * 2.0 + 0.5])  # a non-trivial mean and scale
    x1, v1 = torch.randn(7, D, generator=g) * 2.0 + 0.5, torch.randn(7, D, generator=g)
    y = flow_target(chain, model.normalize(x1), model.normalize(v1))[None]  # [1, T, D] in the flow's units

    def exact_field(w, t, context, cond=None, mask=None, guidance=0.0):
        return (y - w) / (1 - t.view(-1, 1, 1))  # straight to y from wherever w is

    monkeypatch.setattr(model, "velocity", exact_field)
    out = model.synthesize(v1, steps=steps, solver=solver, guidance=0.0, generator=torch.Generator().manual_seed(1))
    assert out.shape == (7, D) and torch.allclose(out, x1, atol=1e-4)


@pytest.mark.parametrize("chain", ["implicit", "explicit"])
def test_loss_regresses_the_chains_velocity_on_non_prompt_frames(chain):
    model = _tiny(chain)
    x1, v1 = torch.randn(2, 12, D), torch.randn(2, 12, D)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    prompt_len = torch.tensor([4, 0])
    loss, parts = model.loss(x1, v1, mask, prompt_len=prompt_len, generator=torch.Generator().manual_seed(1),
                             return_parts=True)
    x1n, v1n = model.normalize(x1) * mask[..., None], model.normalize(v1) * mask[..., None]
    noise = parts["x0"] - (v1n if chain == "implicit" else 0)
    assert noise[mask].std() == pytest.approx(1.0, abs=0.1)  # the prior is N(0, I) (+ v1)
    y = x1n if chain == "implicit" else x1n - v1n
    assert torch.allclose(parts["target"], y - parts["x0"], atol=1e-6)
    t = parts["t"].view(-1, 1, 1)
    assert torch.allclose(parts["w"], (1 - t) * parts["x0"] + t * y, atol=1e-6)
    # prompt prefix: visible as context, left out of the loss; padding too
    assert torch.allclose(parts["context"][0, :4], x1n[0, :4]) and not parts["context"][0, 4:].any()
    assert not parts["context"][1].any()
    assert parts["scored"][0].tolist() == [False] * 4 + [True] * 8
    assert parts["scored"][1].tolist() == [True] * 9 + [False] * 3
    err = ((parts["pred"] - parts["target"]) ** 2).mean(-1)
    assert loss.item() == pytest.approx(err[parts["scored"]].mean().item(), rel=1e-6)


def test_prompt_frames_do_not_reach_the_loss():
    """Changing the target on prompt frames (they are context) changes the loss only through the context."""
    model = _tiny()
    x1, v1 = torch.randn(1, 10, D), torch.randn(1, 10, D)
    mask = torch.ones(1, 10, dtype=torch.bool)
    _, parts = model.loss(x1, v1, mask, prompt_len=torch.tensor([6]), generator=torch.Generator().manual_seed(0),
                          return_parts=True)
    pred = parts["pred"].detach().requires_grad_(True)
    ((pred - parts["target"]) ** 2).mean(-1)[parts["scored"]].mean().backward()
    assert not pred.grad[0, :6].any() and pred.grad[0, 6:].abs().sum() > 0


def test_random_prompt_lengths_stay_below_the_cap_and_the_utterance():
    model = _tiny(max_prompt_frames=5)
    mask = torch.ones(64, 20, dtype=torch.bool)
    mask[:, 8:] = torch.rand(64, 12) > 2  # lengths 8
    _, parts = model.loss(torch.randn(64, 20, D), torch.randn(64, 20, D), mask, return_parts=True,
                          generator=torch.Generator().manual_seed(0))
    lens = parts["prompt"].sum(1)
    assert lens.max() <= 5 and lens.min() == 0 and len(set(lens.tolist())) > 2
    assert (parts["scored"].sum(1) >= 3).all()


# -- the solver ---------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["euler", "midpoint"])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_constant_field_integrates_exactly(solver, steps):
    x0, c = torch.randn(4, D), torch.randn(4, D)
    assert torch.allclose(integrate(lambda x, t: c, x0, steps, solver), x0 + c, atol=1e-5)


def test_midpoint_is_exact_for_a_field_linear_in_time():
    x0 = torch.randn(3)
    # dx/dt = 1 + 2t  =>  x(1) = x0 + 2
    assert torch.allclose(integrate(lambda x, t: torch.full_like(x, 1 + 2 * t), x0, 2, "midpoint"), x0 + 2)
    assert not torch.allclose(integrate(lambda x, t: torch.full_like(x, 1 + 2 * t), x0, 2, "euler"), x0 + 2)


def test_euler_follows_the_straight_conditional_path_exactly():
    """The optimal field towards one point, (x1 - x) / (1 - t), is straight: Euler lands on x1 at any NFE."""
    x0, x1 = torch.randn(5), torch.randn(5)
    for steps in (1, 2, 7):
        assert torch.allclose(integrate(lambda x, t: (x1 - x) / (1 - t), x0, steps, "euler"), x1, atol=1e-5)
    assert nfe(8, "midpoint") == 16 and nfe(8, "euler") == 8


def test_config_validation_names_the_fix():
    with pytest.raises(ValueError, match="chain"):
        FlowConfig(chain="sideways")
    with pytest.raises(ValueError, match="cfg_dropout"):
        FlowConfig(guidance=1.0)
    with pytest.raises(ValueError, match="flow size"):
        FlowConfig.named("huge", D)
    paper = FlowConfig.named("paper", D)
    assert (paper.dim, paper.depth, paper.heads) == (1024, 12, 16)


# -- codec latents ------------------------------------------------------------------------------
def test_mel_codec_latents_and_decode_latent_match_decode():
    codec = _codec()
    codes = torch.randint(0, 16, (3, 30))
    assert torch.allclose(codec.latent(codes), codec.dequantize(codes))
    assert torch.allclose(codec.semantic_latent(codes), codec.codebooks[0][codes[0]])
    assert torch.allclose(codec.semantic_latent(codes[0]), codec.semantic_latent(codes))
    torch.manual_seed(0)
    a = codec.decode(codes)
    torch.manual_seed(0)
    b = codec.decode_latent(codec.latent(codes))
    assert a.shape == b.shape == (29 * 256,) and np.allclose(a, b, atol=1e-5)
    assert np.isfinite(codec.decode_latent(torch.full((10, D), 1e6))).all()  # overshooting latents stay finite
    with pytest.raises(ValueError, match="latent must be"):
        codec.decode_latent(torch.zeros(10, 7))


def test_encodec_latent_is_the_summed_quantizer_output():
    codec = EncodecCodec(CodecConfig(backend="encodec", bandwidth=1.5, allow_random_weights=True))
    layers = codec.model.quantizer.vq.layers
    # Untrained encodec codebooks are all zeros (k-means init on first use), which would make every
    # latent 0 and any sum identity hold: give each level its own seeded random codebook first.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            layer._codebook.embed.copy_(torch.randn(layer._codebook.embed.shape, generator=g))
    codes = torch.randint(0, 1024, (2, 9), generator=g)  # bandwidth 1.5: n_q = 2
    latent = codec.latent(codes)
    assert latent.shape == (9, codec.latent_dim)
    by_level = [layers[q]._codebook.embed[codes[q]] for q in range(2)]  # each level's vectors, by hand
    assert torch.allclose(latent, by_level[0] + by_level[1], atol=1e-5)
    assert torch.allclose(codec.semantic_latent(codes), by_level[0], atol=1e-5)
    assert torch.allclose(codec.semantic_latent(codes[0]), by_level[0], atol=1e-5)
    assert not torch.allclose(latent, by_level[0], atol=1e-2)  # the second level does contribute
    assert np.allclose(codec.decode_latent(latent), codec.decode(codes), atol=1e-5)


# -- training and synthesis ---------------------------------------------------------------------
def _train(model, codec, steps=12):
    torch.manual_seed(0)
    codes = [torch.randint(0, 16, (3, n)) for n in (20, 24, 28, 30)]
    data = [(codec.latent(c), codec.semantic_latent(c)) for c in codes]
    model.set_normalizer([x for x, _ in data])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model.loss(*flow_batch(data), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


@pytest.mark.parametrize("chain", ["implicit", "explicit"])
def test_tiny_flow_trains_and_renders_audio(chain, tmp_path):
    codec = _codec()
    model, losses = _train(_tiny(chain, cfg_dropout=0.2, guidance=0.5), codec)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    first, prompt = torch.randint(0, 16, (25,)), torch.randint(0, 16, (3, 12))
    torch.manual_seed(0)  # Griffin-Lim starts from random phases
    wav = model.render(codec, first, prompt, seed=3)
    assert wav.shape == (24 * 256,) and np.isfinite(wav).all() and np.abs(wav).max() > 0
    torch.manual_seed(0)
    assert np.allclose(wav, model.render(codec, first, prompt, seed=3), atol=1e-6)  # the flow noise is seeded
    latent = model.synthesize(codec.semantic_latent(first), steps=2, solver="euler", guidance=0.0)
    assert latent.shape == (25, D) and torch.isfinite(latent).all()
    model.save(tmp_path / "flow")
    again = FlowModel.load(tmp_path / "flow")
    torch.manual_seed(0)
    assert again.cfg == model.cfg and np.allclose(again.render(codec, first, prompt, seed=3), wav, atol=1e-6)


def test_policy_renders_through_its_flow_and_round_trips(tmp_path):
    from models.codec_lm import Policy, build_lm
    from models.layout import build_tokenizer

    codec = _codec()
    model, _ = _train(_tiny(), codec, steps=2)
    tok = build_tokenizer(16)
    policy = Policy(build_lm("tiny", len(tok), 256, seed=0), tok, None, codec,
                    {"prompt_seconds": 0.2, "max_seconds": 1.0, "frames_per_char": 2.0}, flow=model)
    first, prompt = torch.randint(0, 16, (20,)), torch.randint(0, 16, (3, 40))
    torch.manual_seed(0)
    wav = policy.render(first, prompt)
    assert wav.shape == (19 * 256,)
    policy.save(tmp_path / "p")
    loaded = Policy.load(tmp_path / "p")
    assert loaded.meta["renderer"] == "flow" and loaded.flow is not None and loaded.nar is None
    torch.manual_seed(0)
    assert np.allclose(loaded.render(first, prompt), wav, atol=1e-5)
    assert policy.render(torch.zeros(0, dtype=torch.long), prompt).size == 0


# -- SoundStorm-style masked NAR ----------------------------------------------------------------
def _masked_nar():
    from models.nar import NARConfig, build_nar

    torch.manual_seed(0)
    return build_nar(NARConfig(n_q=3, codebook_size=16, dim=32, layers=2, heads=2, ffn=64, kind="soundstorm",
                               decode_steps=4))


def test_masked_nar_cosine_masking():
    nar = _masked_nar()
    target = torch.randint(0, 16, (3, 3, 10))
    tm = torch.ones(3, 10, dtype=torch.bool)
    tm[2, 6:] = False
    inp, chosen = nar.mask_for_training(target, tm, level=2, u=torch.tensor([0.0, 0.999, 0.5]))
    assert chosen[0].all()                                    # u = 0: cos(0) = 1, everything masked
    assert chosen[1].sum() == 1                               # u -> 1: at least one frame
    assert chosen[2].sum() == 5 and not chosen[2, 6:].any()   # ceil(cos(pi/4) * 6) of the real frames
    assert (inp[:, 2] == nar.mask_id).all() and torch.equal(inp[:, 0], target[:, 0])
    assert torch.equal(inp[:, 1] == nar.mask_id, chosen)


def test_masked_nar_trains_decodes_and_reloads(tmp_path):
    from models.nar import load_nar, nar_batch

    nar = _masked_nar()
    items = [(torch.randint(0, 16, (3, 6)), torch.randint(0, 16, (3, n))) for n in (8, 12)]
    prompt, target, pm, tm = nar_batch(items)
    opt = torch.optim.AdamW(nar.parameters(), lr=1e-3)
    before = [p.clone() for p in nar.parameters()]
    for level in (2, 3):
        loss = nar.loss(prompt, target, pm, tm, level)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, nar.parameters()))
    nar.eval()
    out = nar.generate(items[0][0], items[0][1][0])
    assert out.shape == (3, 8) and (out < 16).all() and torch.equal(out[0], items[0][1][0])
    nar.save(tmp_path / "nar")
    again = load_nar(tmp_path / "nar")
    assert type(again).__name__ == "MaskedNARModel"
    assert torch.equal(again.generate(items[0][0], items[0][1][0]), out)
