"""Zero-shot voice prompts: another utterance of the same speaker, at least N seconds when there is one."""
import pytest

from align.config import load_config
from models.data import audio_seconds, choose_prompt, load_manifest


def test_prompt_prefers_long_enough_same_speaker_utterances(real_speech_dir):
    utts, _ = load_manifest(real_speech_dir / "manifest.jsonl")
    seconds = {u.id: audio_seconds(u) for u in utts}
    for u in utts:
        p = choose_prompt(u, utts, seed=0, min_seconds=2.5)
        assert p.speaker == u.speaker and p.id != u.id
        others = [o for o in utts if o.speaker == u.speaker and o.id != u.id]
        if any(seconds[o.id] >= 2.5 for o in others):
            assert seconds[p.id] >= 2.5
        else:  # spk2's clips are all ~2 s: the longest other one
            assert seconds[p.id] == max(seconds[o.id] for o in others)
    # min_seconds=0 keeps the original (hash-based) pick
    assert all(choose_prompt(u, utts, 0) == choose_prompt(u, utts, 0, min_seconds=0.0) for u in utts)
    lj = next(u for u in utts if u.id == "LJ002-0020")
    assert choose_prompt(lj, utts, 0, min_seconds=3.0).id == "LJ050-0131"  # the only LJ clip over 3 s


def test_eval_config_validates_backends():
    cfg = load_config(None, ["eval.asr=whisper", "eval.asr_model=/m/whisper", "eval.speaker=wavlm"]).eval
    assert cfg.asr_kwargs("cuda") == {"device": "cuda", "allow_download": False, "model": "/m/whisper"}
    assert cfg.speaker_kwargs("cpu") == {"device": "cpu", "allow_download": False}
    for bad, match in (("eval.asr=kaldi", "pocketsphinx"), ("eval.speaker=x", "resemblyzer"),
                       ("eval.quality=pesq", "dnsmos_p808"), ("eval.quality=utmos", "utmos_checkpoint")):
        with pytest.raises(ValueError, match=match):
            load_config(None, [bad])
