import itertools
import json
import logging

import numpy as np
import pytest

from models.audio import load_audio
from eval.asr import PocketSphinxASR, build_asr, corpus_wer, utterance_wer
from eval.speaker import ResemblyzerSpeaker, build_speaker_encoder
from models.text import int_to_words, normalize_text


def _real(real_speech_dir):
    items = [json.loads(line) for line in (real_speech_dir / "manifest.jsonl").open()]
    wavs = [load_audio(real_speech_dir / m["audio"], 16000) for m in items]
    return items, wavs


# Built once per module: loading is the slow part, and evaluations reuse one object too.
@pytest.fixture(scope="module")
def asr():
    return build_asr("pocketsphinx")


@pytest.fixture(scope="module")
def speaker():
    return build_speaker_encoder("resemblyzer")


# ---- text normalisation ----------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("THE CHILD ALMOST HURT THE SMALL DOG", "the child almost hurt the small dog"),
    ("Hello, world! How are you?", "hello world how are you"),
    ("Don't stop -- it's John's.", "don't stop it's john's"),
    ("\u2018Quoted\u2019 words and the dogs' bones", "quoted words and the dogs bones"),
    ("Rock \u2019n\u2019 roll", "rock n roll"),
    ("I have 2 dogs", "i have two dogs"),
    ("0 7 13 21 40 99", "zero seven thirteen twenty one forty ninety nine"),
    ("105 apples", "one hundred five apples"),
    ("In 1813", "in one thousand eight hundred thirteen"),
    ("1,000,000 is big", "one zero zero zero zero zero zero is big"),
    ("12,345", "twelve thousand three hundred forty five"),
    ("999999", "nine hundred ninety nine thousand nine hundred ninety nine"),
    ("call 007", "call zero zero seven"),
    ("3.5 kg", "three point five kg"),
    ("the 21st and 3rd and 12th", "the twenty first and third and twelfth"),
    ("mp3", "mp three"),
    ("50%", "fifty percent"),
    ("well-known snake_case", "well known snake case"),
    ("\uff21\uff22\uff23 \uff11", "abc one"),  # fullwidth letters and digit, NFKC
    ("  lots\tof \n space  ", "lots of space"),
    ("?!...", ""),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_int_to_words_range():
    assert int_to_words(0) == "zero"
    assert int_to_words(100) == "one hundred"
    assert int_to_words(1000) == "one thousand"
    assert int_to_words(20019) == "twenty thousand nineteen"
    with pytest.raises(ValueError, match="digit by digit"):
        int_to_words(1_000_000)


# ---- WER -------------------------------------------------------------------------------------

def test_utterance_wer_hand_computed():
    # "sat" -> "sit" is 1 substitution, the second "the" is 1 deletion: 2 errors / 6 words.
    assert utterance_wer("the cat sat on the mat", "the cat sit on mat") == pytest.approx(2 / 6)
    assert utterance_wer("The cat, sat!", "the CAT sat") == 0.0
    assert utterance_wer("I have 2 dogs", "i have two dogs") == 0.0
    assert utterance_wer("a b", "a b c d") == pytest.approx(1.0)  # 2 insertions / 2 words
    assert utterance_wer("a b c", "") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty after normalisation"):
        utterance_wer("...", "anything")


def test_corpus_wer_hand_computed():
    # 1 substitution + 2 deletions over 5 reference words; the mean of per-utterance WERs
    # would be (1/3 + 1) / 2 instead.
    assert corpus_wer(["a b c", "d e"], ["a x c", ""]) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="same order"):
        corpus_wer(["a"], [])
    with pytest.raises(ValueError, match="indices \\[1\\]"):
        corpus_wer(["a", "!"], ["a", "b"])


def test_registries_name_the_known_backends():
    with pytest.raises(ValueError, match="pocketsphinx.*whisper"):
        build_asr("wav2vec")
    with pytest.raises(ValueError, match="ecapa.*resemblyzer.*wavlm"):
        build_speaker_encoder("titanet")


# ---- pocketsphinx ----------------------------------------------------------------------------

def test_pocketsphinx_wer_on_real_speech(asr, real_speech_dir):
    assert isinstance(asr, PocketSphinxASR)
    items, wavs = _real(real_speech_dir)
    hyps = asr.transcribe(wavs)
    assert len(hyps) == 13 and all(isinstance(h, str) for h in hyps)
    # Measured 0.278 with the bundled en-us model; 0.4 leaves room for decoder version drift
    # while still catching a broken resampler or a wrong sample rate (which give > 0.8).
    assert corpus_wer([m["text"] for m in items], hyps) < 0.4
    by_id = dict(zip([m["id"] for m in items], hyps))
    assert normalize_text(by_id["spk1_snt5"]) == "sunday is the best part of the week"
    # Decoding is per utterance: the same input gives the same output whatever came before.
    assert asr.transcribe([wavs[0]]) == [hyps[0]]


def test_pocketsphinx_degenerate_inputs_give_empty(asr, caplog):
    rng = np.random.default_rng(0)
    wavs = [np.zeros(16000, np.float32),                                  # digital silence
            (1e-4 * rng.standard_normal(32000)).astype(np.float32),      # noise floor
            (0.5 * rng.standard_normal(800)).astype(np.float32),         # 50 ms
            np.zeros(0, np.float32)]
    with caplog.at_level(logging.WARNING, logger="speechalign"):
        assert asr.transcribe(wavs) == ["", "", "", ""]
    assert "4 of 4" in caplog.text
    with pytest.raises(ValueError, match="NaN"):
        asr.transcribe([np.full(16000, np.nan, np.float32)])


# ---- resemblyzer -----------------------------------------------------------------------------

def test_resemblyzer_separates_real_speakers(speaker, real_speech_dir):
    assert isinstance(speaker, ResemblyzerSpeaker)
    items, wavs = _real(real_speech_dir)
    emb = speaker.embed(wavs)
    assert emb.shape == (13, 256) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sims = emb @ emb.T
    pairs = list(itertools.combinations(range(len(items)), 2))
    same = [sims[i, j] for i, j in pairs if items[i]["speaker"] == items[j]["speaker"]]
    diff = [sims[i, j] for i, j in pairs if items[i]["speaker"] != items[j]["speaker"]]
    # Measured 0.83 vs 0.51.
    assert np.mean(same) > np.mean(diff) + 0.2
    # similarity() is the row-wise cosine of the same embeddings.
    np.testing.assert_allclose(speaker.similarity(wavs[:3], wavs[1:4]),
                               [sims[0, 1], sims[1, 2], sims[2, 3]], atol=1e-5)


def test_resemblyzer_ignores_long_pauses(speaker, real_speech_dir):
    # VAD trimming is why we run resemblyzer's preprocessing: 2 s pauses of noise floor in a
    # clip barely move its embedding (measured 0.94 mean self-similarity; 0.80 untrimmed).
    _, wavs = _real(real_speech_dir)
    rng = np.random.default_rng(0)
    pause = (1e-3 * rng.standard_normal(32000)).astype(np.float32)
    clips = wavs[:4]
    padded = [np.concatenate([pause, w[: len(w) // 2], pause, w[len(w) // 2:], pause])
              for w in clips]
    assert speaker.similarity(clips, padded).mean() > 0.88


def test_resemblyzer_silence_gives_zero(speaker, real_speech_dir, caplog):
    _, wavs = _real(real_speech_dir)
    silence = [np.zeros(16000, np.float32), np.zeros(400, np.float32), np.zeros(0, np.float32)]
    with caplog.at_level(logging.WARNING, logger="speechalign"):
        emb = speaker.embed(silence)
        sims = speaker.similarity(silence, wavs[:3])
    assert not emb.any()
    assert sims.tolist() == [0.0, 0.0, 0.0]
    assert "zero embeddings" in caplog.text
    with pytest.raises(ValueError, match="equal-length"):
        speaker.similarity(wavs[:2], wavs[:1])


def test_pocketsphinx_transcripts_do_not_depend_on_order_or_workers(real_speech_dir):
    """Each transcript is a function of its own audio: same words in any order, serial or in parallel."""
    from models.data import load_manifest
    from eval.asr import PocketSphinxASR

    utts, _ = load_manifest(real_speech_dir / "manifest.jsonl")
    wavs = [load_audio(u.audio, 16000) for u in utts[:8]]
    serial = PocketSphinxASR(workers=1)
    forward = serial.transcribe(wavs)
    assert serial.transcribe(wavs[::-1])[::-1] == forward
    assert PocketSphinxASR(workers=2).transcribe(wavs) == forward
