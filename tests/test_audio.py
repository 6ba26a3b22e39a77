import json
import os

import numpy as np
import pytest
import soundfile as sf

from models.audio import AudioError, is_silent_or_short, load_audio, resample, save_audio


def _sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wav: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / sr)[spec.argmax()])


def test_real_22k_file_resamples_to_16k(real_speech_dir):
    items = [json.loads(line) for line in (real_speech_dir / "manifest.jsonl").open()]
    lj = next(m for m in items if m["speaker"] == "LJ")
    path = real_speech_dir / lj["audio"]
    info = sf.info(str(path))
    assert info.samplerate == 22050
    wav = load_audio(path, 16000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - info.frames * 16000 / 22050) <= 1
    assert 0.01 < np.abs(wav).max() <= 1.0


def test_real_16k_file_is_read_unchanged(real_speech_dir):
    path = real_speech_dir / "spk1_snt1.wav"
    raw, sr = sf.read(str(path), dtype="float32")
    assert sr == 16000
    np.testing.assert_array_equal(load_audio(path, 16000), raw)


def test_stereo_is_mixed_down(tmp_path):
    left = _sine(440, 16000, 0.5)
    stereo = np.stack([left, -0.5 * left], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), stereo, 16000, subtype="FLOAT")
    wav = load_audio(path, 16000)
    assert wav.shape == (8000,)
    np.testing.assert_allclose(wav, 0.25 * left, atol=1e-6)


@pytest.mark.parametrize("file_sr", [44100, 8000])
def test_odd_rates_resample_and_keep_pitch(tmp_path, file_sr):
    path = tmp_path / f"tone_{file_sr}.wav"
    sf.write(str(path), _sine(440, file_sr, 1.0), file_sr, subtype="PCM_16")
    wav = load_audio(path, 16000)
    assert abs(len(wav) - 16000) <= 1
    assert abs(_peak_hz(wav, 16000) - 440) < 2.0
    # Polyphase filtering keeps the level: a 0.5-amplitude tone stays near 0.5.
    assert abs(np.abs(wav[1000:-1000]).max() - 0.5) < 0.02


def test_resample_identity_and_shape():
    x = np.random.randn(1000).astype(np.float32)
    assert resample(x, 16000, 16000) is x
    assert resample(x, 16000, 24000).shape == (1500,)
    assert resample(np.stack([x, x]), 16000, 8000).shape == (2, 500)
    with pytest.raises(ValueError, match="positive integer"):
        resample(x, 0, 16000)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="not found") as e:
        load_audio(path, 16000)
    assert str(path) in str(e.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AudioError, match="cannot read audio") as e:
        load_audio(path, 16000)
    assert str(path) in str(e.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="0 samples") as e:
        load_audio(path, 16000)
    assert str(path) in str(e.value)


def test_nan_file(tmp_path):
    path = tmp_path / "nan.wav"
    wav = _sine(440, 16000, 0.2)
    wav[100] = np.nan
    sf.write(str(path), wav, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN") as e:
        load_audio(path, 16000)
    assert str(path) in str(e.value)


def test_too_long_file_names_the_config_key(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(str(path), _sine(440, 16000, 2.0), 16000)
    with pytest.raises(AudioError, match="data.max_seconds") as e:
        load_audio(path, 16000, max_seconds=1.5)
    assert str(path) in str(e.value)
    assert len(load_audio(path, 16000, max_seconds=2.0)) == 32000


def test_save_load_round_trip(tmp_path):
    wav = _sine(300, 16000, 0.5, amp=0.8)
    path = tmp_path / "deep" / "er" / "out.wav"
    save_audio(path, wav, 16000)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.format) == \
        (16000, 1, "PCM_16", "WAV")
    np.testing.assert_allclose(load_audio(path, 16000), wav, atol=1.0 / 32767)
    # Overwriting goes through a rename and leaves no temp file behind.
    save_audio(path, 0.5 * wav, 16000)
    np.testing.assert_allclose(load_audio(path, 16000), 0.5 * wav, atol=1.0 / 32767)
    assert os.listdir(path.parent) == ["out.wav"]


def test_save_clips_and_rejects_bad_input(tmp_path):
    path = tmp_path / "clip.wav"
    save_audio(path, np.array([2.0, -3.0, 0.5], dtype=np.float32), 16000)
    np.testing.assert_allclose(load_audio(path, 16000), [1.0, -1.0, 0.5], atol=1.0 / 32767)
    with pytest.raises(AudioError, match="squeeze"):
        save_audio(tmp_path / "x.wav", np.zeros((1, 100)), 16000)
    with pytest.raises(AudioError, match="NaN"):
        save_audio(tmp_path / "x.wav", np.full(100, np.nan), 16000)
    assert not (tmp_path / "x.wav").exists()
    assert os.listdir(tmp_path) == ["clip.wav"]


def test_is_silent_or_short():
    assert is_silent_or_short(np.zeros(16000, np.float32), 16000)
    assert is_silent_or_short(_sine(440, 16000, 0.05), 16000)  # loud but 50 ms
    assert is_silent_or_short(np.zeros(0, np.float32), 16000)
    rng = np.random.default_rng(0)
    assert is_silent_or_short((1e-4 * rng.standard_normal(16000)).astype(np.float32), 16000)
    assert not is_silent_or_short(_sine(440, 16000, 0.2, amp=0.01), 16000)
