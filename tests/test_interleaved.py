"""The interleaved layout: phone alignments, streams, constrained generation and the phone renderer."""
import numpy as np
import pytest
import torch

from models.codec import CodecConfig, MelRVQCodec
from models.codec_lm import Policy, build_lm
from models.layout import (TEXT_UNITS, build_tokenizer, format_for, interleave, interleaved_completion_str,
                           parse_interleaved, split_stream, text_units, unit_marker)
from models.phones import frame_units, parse_psdur, segments_from_ends

K = 32


def test_psdur_segments_rescale_and_shift():
    ends = parse_psdur("pau:0.200 dh:0.250 ax:0.300 pau:0.500\n")
    assert ends == [("pau", 0.2), ("dh", 0.25), ("ax", 0.3), ("pau", 0.5)]
    segs = segments_from_ends(ends, scale=2.0, offset=0.1)
    assert segs[0] == ("pau", -0.1, pytest.approx(0.3))
    assert segs[1] == ("dh", pytest.approx(0.3), pytest.approx(0.4))
    with pytest.raises(ValueError, match="segment"):
        parse_psdur("garbage")


def test_frame_units_maps_flite_phones_onto_dictionary_units():
    # flite says "t ax" for "to", the dictionary "T UW": a substitution keeps the segment's frames
    segs = [("pau", 0.0, 0.1), ("t", 0.1, 0.2), ("ax", 0.2, 0.4), ("pau", 0.4, 0.5), ("d", 0.5, 0.6)]
    fu = frame_units(segs, ["T", "UW", "D"], n_frames=7, frame_rate=10.0)  # frame t at t / 10 s
    # frames 0 (leading silence) -> first unit; 4 (pause) -> the unit before it
    assert fu.tolist() == [0, 0, 1, 1, 1, 2, 2]


def test_frame_units_gives_every_unit_a_frame_and_refuses_too_few_frames():
    segs = [("k", 0.0, 0.5), ("ae", 0.5, 0.5), ("t", 0.5, 1.0)]  # a zero-length vowel
    fu = frame_units(segs, ["K", "AE", "T"], n_frames=10, frame_rate=10.0)
    assert np.bincount(fu, minlength=3).min() >= 1 and (np.diff(fu) >= 0).all() and len(fu) == 10
    # a unit the alignment lacks altogether still gets a frame
    fu = frame_units([("k", 0.0, 0.5), ("t", 0.5, 1.0)], ["K", "AE", "T"], n_frames=10, frame_rate=10.0)
    assert sorted(set(fu.tolist())) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot hold"):
        frame_units(segs, ["K", "AE", "T"], n_frames=2, frame_rate=10.0)


def test_stream_round_trips_through_strings_and_tokens():
    tok = build_tokenizer(K)
    units = text_units("hi there", "phones")
    assert units == ["HH", "AY", "DH", "EH", "R"]
    codes = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])
    stream = interleave(codes, [0, 0, 1, 2, 2, 3, 3, 4], units)
    assert stream.tolist()[:4] == [unit_marker("HH"), 5, 6, unit_marker("AY")]
    s = interleaved_completion_str(stream)
    assert s == " HH <a5> <a6> AY <a7> DH <a8> <a9> EH <a10> <a11> R <a12> <eos>"
    assert parse_interleaved(s).tolist() == stream.tolist()
    got_codes, ids, pos = split_stream(stream)
    assert got_codes.tolist() == codes.tolist()
    assert [TEXT_UNITS[i] for i in ids.tolist()] == ["HH", "HH", "AY", "DH", "DH", "EH", "EH", "R"]
    assert pos.tolist() == [0, 0, 1, 2, 2, 3, 3, 4]
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == len(stream) + 1  # one token per stream item, + <eos>
    with pytest.raises(ValueError, match="every unit"):
        interleave(codes, [0, 0, 2, 2, 2, 3, 3, 4], units)  # AY skipped


def _policy(cap=6):
    tok = build_tokenizer(K)
    codec = MelRVQCodec(CodecConfig(n_q=1, codebook_size=K), torch.randn(1, K, 80))
    lm = build_lm("tiny", len(tok), 1024, seed=0)
    meta = {"prompt_seconds": 0.1, "max_seconds": 4.0, "frames_per_char": 2.0, "text_frontend": "phones",
            "format": "interleaved", "max_frames_per_unit": cap}
    return Policy(lm, tok, None, codec, meta)


def test_generation_walks_every_unit_in_order_within_the_cap():
    """Even an untrained LM says each unit once, in order, 1..cap frames each, then stops."""
    policy = _policy(cap=6)
    texts = ["the cat sat", "hello there my friend"]
    prompts = [torch.randint(0, K, (1, 20)) for _ in texts]
    out = policy.generate(texts, prompts, n=3, temperature=1.0, top_k=0, seed=1, batch_size=2)
    for text, samples in zip(texts, out):
        for stream in samples:
            markers = [TEXT_UNITS[-1 - v] for v in stream.tolist() if v < 0]
            assert markers == text_units(text, "phones")
            counts = torch.bincount(split_stream(stream)[2])
            assert counts.min() >= 1 and counts.max() <= 6
            assert stream.tolist()[0] < 0  # a unit first
    again = policy.generate(texts, prompts, n=3, temperature=1.0, top_k=0, seed=1, batch_size=2)
    assert all(torch.equal(a, b) for sa, sb in zip(out, again) for a, b in zip(sa, sb))
    assert format_for(policy.meta).frames(out[0][0]).min() >= 0


def test_phone_renderer_learns_and_round_trips(tmp_path):
    """A few steps lower the L1 loss on a fixed batch; save/load gives the same latent."""
    from models.renderer import PhoneRenderer, RendererConfig, renderer_batch

    torch.manual_seed(0)
    cfg = RendererConfig(latent_dim=8, codebook_size=K, dim=32, layers=1, heads=2, ffn=64)
    model = PhoneRenderer(cfg)
    rows = []
    for _ in range(4):
        T = 12
        pos = torch.sort(torch.randint(0, 4, (T,))).values
        pos = torch.unique_consecutive(pos, return_inverse=True)[1]
        ids = torch.randint(0, len(TEXT_UNITS), (int(pos.max()) + 1,))[pos]
        rows.append((torch.randn(5, 8), torch.randint(0, K, (T,)), ids, pos, torch.randn(T, 8)))
    batch = renderer_batch(rows)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(batch).item()
    for _ in range(40):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    model.save(tmp_path / "r")
    again = PhoneRenderer.load(tmp_path / "r")
    p, c, u, pos, _ = rows[0]
    assert torch.allclose(model.eval().generate(p, c, u, pos), again.generate(p, c, u, pos), atol=1e-6)
    assert model.generate(p, c, u, pos).shape == (len(c), 8)


def test_corrupt_codes_replaces_about_the_rate_reproducibly():
    """A rate of 0.3 changes ~0.3 x 255/256 of the codes, all inside the codebook; the same seed gives the
    same draw, another seed another; rate 0 returns the codes untouched."""
    from models.renderer import corrupt_codes

    codes = torch.randint(0, K, (20000,), generator=torch.Generator().manual_seed(0))
    out = corrupt_codes(codes, 0.3, K, torch.Generator().manual_seed(1))
    changed = (out != codes).float().mean().item()
    assert abs(changed - 0.3 * (K - 1) / K) < 0.015
    assert out.min() >= 0 and out.max() < K and out.dtype == codes.dtype
    assert torch.equal(out, corrupt_codes(codes, 0.3, K, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, corrupt_codes(codes, 0.3, K, torch.Generator().manual_seed(2)))
    assert corrupt_codes(codes, 0.0, K, torch.Generator().manual_seed(1)) is codes


def test_pocketsphinx_aligns_a_real_recording_and_the_cli_writes_alignments(real_speech_dir, tmp_path):
    """Forced alignment of real speech gives ordered phone segments that frame_units can use; a manifest's
    recordings get their .align.json; text pocketsphinx cannot align is reported, not written."""
    import json
    import shutil

    from models.audio import load_audio
    from models.phones import align_manifest, alignment_path, pocketsphinx_segments, read_alignment

    text = "THE CHILD ALMOST HURT THE SMALL DOG"
    wav = load_audio(real_speech_dir / "spk1_snt1.wav", 16000)
    segs = pocketsphinx_segments(wav, text)
    speech = [p for p, _, _ in segs if p not in ("SIL", "sil", "pau")]
    assert speech[:4] == ["DH", "AH", "CH", "AY"]
    assert all(s <= e for _, s, e in segs) and all(a[2] <= b[1] + 1e-9 for a, b in zip(segs, segs[1:]))
    assert segs[-1][2] <= len(wav) / 16000 + 0.02 and segs[-1][2] > 0.5 * len(wav) / 16000
    units = text_units(text, "phones")
    fu = frame_units(segs, units, n_frames=len(wav) // 256 + 1, frame_rate=16000 / 256)
    assert np.bincount(fu).min() >= 1 and fu[-1] == len(units) - 1

    shutil.copy(real_speech_dir / "spk1_snt1.wav", tmp_path / "a.wav")
    shutil.copy(real_speech_dir / "spk1_snt2.wav", tmp_path / "b.wav")
    rows = [{"id": "a", "audio": "a.wav", "text": text, "speaker": "s"},
            {"id": "b", "audio": "b.wav", "text": "zzkq blorf", "speaker": "s"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = align_manifest(str(tmp_path / "m.jsonl"))
    assert out["aligned"] == 1 and [f["id"] for f in out["failed"]] == ["b"]
    assert read_alignment(tmp_path / "a.wav")[0][0] in ("SIL", "DH") and not alignment_path(tmp_path / "b.wav").exists()
