"""Bad user data through the run's data path: clear errors naming the file, or recorded skips."""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from models.audio import AudioError
from align.config import load_config
from align.run import Context, RunDir


@pytest.fixture
def user_data(real_speech_dir, tmp_path):
    """A manifest of real recordings plus a corrupt, an empty, a stereo 44.1 kHz and a 30 s file."""
    d = tmp_path / "data"
    d.mkdir()
    rows = [json.loads(line) for line in (real_speech_dir / "manifest.jsonl").read_text().splitlines()]
    for r in rows:
        shutil.copy(real_speech_dir / r["audio"], d / r["audio"])
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wav file" * 10)
    sf.write(d / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    t = np.linspace(0, 1, 44100, dtype=np.float32)
    sf.write(d / "stereo.wav", np.stack([np.sin(2e3 * t), np.sin(3e3 * t)], 1) * 0.1, 44100)
    sf.write(d / "long.wav", np.zeros(16000 * 30, dtype=np.float32), 16000)
    extra = [
        {"id": "stereo", "audio": "stereo.wav", "text": "a stereo file", "speaker": "spk1"},
        {"id": "no_text", "audio": "spk1_snt1.wav", "text": "", "speaker": "spk1"},
        {"id": "gone", "audio": "missing.wav", "text": "missing file", "speaker": "spk1"},
        {"id": "long", "audio": "long.wav", "text": "long", "speaker": "spk1", "duration": 30.0},
        {"id": "corrupt", "audio": "corrupt.wav", "text": "corrupt", "speaker": "spk2"},
        {"id": "empty", "audio": "empty.wav", "text": "empty", "speaker": "spk2"},
    ]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _ctx(user_data, tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "data.source=manifests",
                             f"data.train={user_data / 'train.jsonl'}", f"data.test={user_data / 'test.jsonl'}",
                             "data.max_seconds=20", "codec.codebook_size=16", "codec.n_q=2"])
    return Context(cfg, RunDir(cfg))


def test_skips_are_recorded_and_bad_audio_names_the_file(user_data, tmp_path):
    ctx = _ctx(user_data, tmp_path)
    train = {u.id: u for u in ctx.splits.train}
    skipped = {json.loads(line)["id"] for line in (ctx.run.root / "skipped.jsonl").read_text().splitlines()}
    assert {"no_text", "gone", "long"} <= skipped
    assert "no_text" not in train and "stereo" in train
    # stereo at 44.1 kHz is mixed down and resampled
    wav = ctx.load_wav(train["stereo"])
    assert wav.ndim == 1 and abs(len(wav) - 16000) <= 1
    for bad in ("corrupt", "empty"):
        with pytest.raises(AudioError, match=f"{bad}.wav"):
            ctx.load_wav(train[bad])


def test_codec_fit_fails_on_corrupt_training_audio_with_the_path(user_data, tmp_path):
    ctx = _ctx(user_data, tmp_path)
    with pytest.raises(AudioError, match="corrupt.wav|empty.wav"):
        ctx.codec


def test_eval_scores_the_good_rows_and_skips_hostile_ones_with_reasons(ci_run, real_speech_dir, tmp_path, caplog):
    """``speechalign eval`` on a manifest of real rows among hostile ones: no traceback, every good row scored,
    every bad row skipped with its reason. A 5,000-word text is refused before any model work (it used to ask
    for 11 GB and, with more rows around it, be killed out of memory)."""
    from align.cli import main

    d = tmp_path / "hostile"
    d.mkdir()
    real = [json.loads(line) for line in (real_speech_dir / "manifest.jsonl").read_text().splitlines()][:6]
    for r in real:
        shutil.copy(real_speech_dir / r["audio"], d / r["audio"])
    prompt = real[0]["audio"]
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wav file" * 10)
    sf.write(d / "zero.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(d / "ten_minutes.wav", np.zeros(16000 * 600, dtype=np.int16), 16000, subtype="PCM_16")
    t = np.linspace(0, 1, 44100, dtype=np.float32)
    sf.write(d / "stereo44k.wav", np.stack([np.sin(2e3 * t), np.sin(3e3 * t)], 1) * 0.1, 44100)
    sf.write(d / "rate8k.wav", 0.1 * np.sin(np.linspace(0, 2000, 8000)).astype(np.float32), 8000)
    sf.write(d / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    words = " ".join(["speech"] * 5000)
    good = [{**r, "prompt_audio": prompt} for r in real]
    odd_but_valid = [  # unusual, but a policy can be evaluated on them
        {"id": "stereo44k", "audio": "stereo44k.wav", "text": "a stereo file", "speaker": "spk1", "prompt_audio": prompt},
        {"id": "rate8k", "audio": "rate8k.wav", "text": "eight kilohertz", "speaker": "spk1", "prompt_audio": prompt},
        {"id": "silent", "audio": "silent.wav", "text": "nothing at all", "speaker": "spk1", "prompt_audio": prompt},
        {"id": "unicode", "audio": real[1]["audio"], "text": "café naïve résumé ☃", "speaker": "spk1",
         "prompt_audio": prompt},
    ]
    hostile = {
        "huge_text": {"audio": real[1]["audio"], "text": words},
        "corrupt": {"audio": "corrupt.wav", "text": "corrupt reference"},
        "zero_len": {"audio": "zero.wav", "text": "zero samples"},
        "ten_min": {"audio": real[1]["audio"], "text": "a ten minute prompt", "prompt_audio": "ten_minutes.wav"},
        "gone": {"audio": "missing.wav", "text": "missing file"},
        "no_text": {"audio": real[1]["audio"], "text": ""},
        "bad_prompt": {"audio": real[1]["audio"], "text": "corrupt prompt", "prompt_audio": "corrupt.wav"},
    }
    rows = good[:3] + [{"id": k, "speaker": "spk1", "prompt_audio": prompt, **v} for k, v in hostile.items()]
    rows += odd_but_valid + good[3:]
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "eval.json"
    with caplog.at_level("WARNING", logger="speechalign"):
        assert main(["eval", "--policy", str(ci_run / "round_001" / "policy"), "--manifest", str(d / "manifest.jsonl"),
                     "--out", str(out)]) == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info]  # skips are warnings, no traceback
    result = json.loads(out.read_text())
    scored = [r["id"] for r in result["rows"]]
    assert scored == [r["id"] for r in good[:3] + odd_but_valid + good[3:]]  # nothing lost, order kept
    assert all(np.isfinite(r["wer"]) and np.isfinite(r["sim"]) for r in result["rows"])
    reasons = {s["id"]: s["reason"] for s in result["skipped"]}
    assert set(reasons) == set(hostile)
    assert "tokens long" in reasons["huge_text"] and "at most" in reasons["huge_text"]
    assert "corrupt.wav" in reasons["corrupt"] and "corrupt.wav" in reasons["bad_prompt"]
    assert "0 samples" in reasons["zero_len"] and "longer than the limit" in reasons["ten_min"]


def test_eval_of_an_unparsable_manifest_is_one_clear_line(ci_run, tmp_path, caplog):
    from align.cli import main

    (tmp_path / "m.jsonl").write_text('{"id": "a", "audio": "a.wav", "text": "hi", "speaker": "s"}\nnot json\n')
    with caplog.at_level("ERROR", logger="speechalign"):
        code = main(["eval", "--policy", str(ci_run / "round_001" / "policy"), "--manifest", str(tmp_path / "m.jsonl"),
                     "--out", str(tmp_path / "o.json")])
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and not (tmp_path / "o.json").exists()
    # one line naming the file and the line, no traceback
    assert len(errors) == 1 and errors[0].exc_info is None and "m.jsonl" in errors[0].getMessage()


def test_generate_refuses_a_text_longer_than_the_policy_takes():
    from tests.fakes import tiny_policy

    policy = tiny_policy()
    limit = policy.max_text_tokens
    assert 0 < limit < 512
    with pytest.raises(ValueError, match=f"at most {limit}"):
        policy.generate(["a " * 400], [torch.zeros(1, 4, dtype=torch.long)])


def test_a_policy_missing_its_nar_is_refused_not_scored_on_rvq1_alone(tmp_path):
    from models.codec import CodecConfig, MelRVQCodec
    from models.codec_lm import Policy
    from models.layout import build_tokenizer
    from models.nar import NARConfig, build_nar
    from tests.fakes import tiny_lm

    tok = build_tokenizer(16)
    codec = MelRVQCodec(CodecConfig(n_q=2, codebook_size=16), torch.randn(2, 16, 80))
    nar = build_nar(NARConfig.named("tiny", 2, 16))
    policy = Policy(tiny_lm(len(tok)), tok, nar, codec, {"prompt_seconds": 0.1, "max_seconds": 1.0,
                                                          "frames_per_char": 1.0})
    policy.save(tmp_path / "policy")
    assert Policy.load(tmp_path / "policy").nar is not None
    shutil.rmtree(tmp_path / "policy" / "nar")
    with pytest.raises(ValueError, match="no nar/ folder"):
        Policy.load(tmp_path / "policy")
    policy.nar = None
    with pytest.raises(ValueError, match="no NAR for levels 2..2"):
        policy.render(torch.tensor([1, 2, 3]), torch.zeros(2, 4, dtype=torch.long))
