"""Bad user data through the run's data path: clear errors naming the file, or recorded skips."""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from align.audio import AudioError
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
