"""The codec bar: does a round trip through the codec keep speech intelligible and the voice?

On a set of utterances it measures
  * WER of the raw audio and of decoded golden tokens (same ASR, same normaliser);
  * SIM of each reconstruction to its original, against the mean SIM of two *different*
    utterances of the same speaker (a round trip must not lose more identity than a change of
    sentence does).
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np


def codec_roundtrip(codec, utts, *, asr, speaker, load) -> dict:
    """utts: Utterances; load(utt) -> wav at codec.sample_rate. Returns the figures and per-utt rows."""
    from models.audio import resample
    from eval.asr import corpus_wer

    t0 = time.time()
    raws = [load(u) for u in utts]
    recons = [codec.decode(codec.encode(w)) for w in raws]
    t_codec = time.time() - t0
    to_asr = lambda w: resample(w, codec.sample_rate, asr.sample_rate)
    to_spk = lambda w: resample(w, codec.sample_rate, speaker.sample_rate)
    hyp_raw = asr.transcribe([to_asr(w) for w in raws])
    hyp_rec = asr.transcribe([to_asr(w) for w in recons])
    refs = [u.text for u in utts]
    emb_raw = speaker.embed([to_spk(w) for w in raws])
    emb_rec = speaker.embed([to_spk(w) for w in recons])
    sim_recon = (emb_raw * emb_rec).sum(-1)
    by_spk = defaultdict(list)
    for i, u in enumerate(utts):
        by_spk[u.speaker].append(i)
    same = []
    for idx in by_spk.values():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                if utts[idx[a]].text != utts[idx[b]].text:
                    same.append(float(emb_raw[idx[a]] @ emb_raw[idx[b]]))
    return {
        "n": len(utts),
        "wer_raw": corpus_wer(refs, hyp_raw),
        "wer_codec": corpus_wer(refs, hyp_rec),
        "sim_recon": float(np.mean(sim_recon)),
        "sim_same_speaker_other_utt": float(np.mean(same)) if same else float("nan"),
        "codec_seconds_per_audio_second": t_codec / max(1e-9, sum(len(w) for w in raws) / codec.sample_rate),
        "codec": codec.identity,
    }
