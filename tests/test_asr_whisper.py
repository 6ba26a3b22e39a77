"""Whisper ASR through the real loading path: a tiny Whisper saved locally in the hub layout."""
import json

import numpy as np
import pytest
import torch

from eval.asr import WhisperASR, build_asr

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]


def save_tiny_whisper(path, multilingual=True):
    """A folder laid out like openai/whisper-*: config, weights, generation config and processor files,
    with a byte-level BPE tokenizer and Whisper's special tokens built here."""
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("t", "h"), ("th", "e"), ("\u0120", "the")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = WhisperTokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    ids = dict(zip(SPECIALS, tok.convert_tokens_to_ids(SPECIALS)))
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(path)
    eot = ids["<|endoftext|>"]
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=len(tok), num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=64, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=ids["<|startoftranscript|>"]))
    gen = dict(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=ids["<|startoftranscript|>"],
               no_timestamps_token_id=ids["<|notimestamps|>"], max_length=64, is_multilingual=multilingual,
               # as in the real checkpoints: special tokens other than end-of-text never appear in text
               suppress_tokens=[ids[t] for t in SPECIALS[1:]], begin_suppress_tokens=[220, eot])
    if multilingual:
        gen.update(lang_to_id={"<|en|>": ids["<|en|>"]},
                   task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]})
    model.generation_config = GenerationConfig(**gen)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    return save_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper")


def test_whisper_loads_local_folder_and_transcribes_batched(tiny_whisper):
    asr = build_asr("whisper", model=str(tiny_whisper), batch_size=2, max_new_tokens=6)
    assert isinstance(asr, WhisperASR) and asr.sample_rate == 16000
    assert asr._generate_kwargs == {"language": "en", "task": "transcribe"}
    rng = np.random.default_rng(0)
    wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 8000, 24000)]
    wavs.append(np.zeros(16000, dtype=np.float32))  # silence: '' without decoding
    hyps = asr.transcribe(wavs)
    assert len(hyps) == 4 and all(isinstance(h, str) for h in hyps) and hyps[3] == ""
    assert any(hyps[:3])  # random weights still emit text tokens (specials are suppressed)
    # greedy and per-utterance: batching does not change a transcript
    assert [asr.transcribe([w])[0] for w in wavs[:3]] == hyps[:3]


def test_whisper_english_only_checkpoint_gets_no_language(tmp_path):
    asr = WhisperASR(str(save_tiny_whisper(tmp_path / "en", multilingual=False)), max_new_tokens=3)
    assert asr._generate_kwargs == {}
    assert len(asr.transcribe([0.1 * np.ones(8000, dtype=np.float32)])) == 1


def test_whisper_unreachable_hub_id_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match="huggingface-cli download .*eval.asr_model"):
        WhisperASR("openai/whisper-not-cached-here")


def test_processor_files_are_the_hub_layout(tiny_whisper):
    names = {p.name for p in tiny_whisper.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert json.loads((tiny_whisper / "generation_config.json").read_text())["is_multilingual"] is True
