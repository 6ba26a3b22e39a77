"""ASR backends and word error rate.

A backend is any object with `name`, `sample_rate` and `transcribe(wavs) -> list[str]`; it
returns raw hypotheses, and WER normalises both sides with `eval.text.normalize_text`, so every
backend is scored the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jiwer
import numpy as np

from align.audio import check_mono, is_silent_or_short
from eval.text import normalize_text

log = logging.getLogger("speechalign.eval.asr")


class PocketSphinxASR:
    """CMU PocketSphinx with the US English acoustic model, language model and dictionary it ships.

    Small, CPU-only and fully offline, so it runs in tests and on machines without a GPU; it is
    far weaker than a neural ASR (corpus WER 0.28 on the 13 real recordings in
    shared/data/real_speech, 0.11 on flite voices), so use it to compare rounds, not as an
    absolute intelligibility figure.
    """

    name = "pocketsphinx"
    sample_rate = 16000

    def __init__(self, model_dir: str | None = None):
        """
        Args:
            model_dir: folder holding `en-us/en-us/` (acoustic model), `en-us/en-us.lm.bin` and
                `en-us/cmudict-en-us.dict`; None: the copy inside the pocketsphinx package.
        """
        import pocketsphinx

        root = Path(model_dir) if model_dir is not None else Path(pocketsphinx.get_model_path())
        hmm, lm, dic = root / "en-us" / "en-us", root / "en-us" / "en-us.lm.bin", \
            root / "en-us" / "cmudict-en-us.dict"
        missing = [str(p) for p in (hmm, lm, dic) if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"pocketsphinx model files not found: {missing}; pass model_dir=None to use the "
                f"en-us model bundled with the pocketsphinx package, or reinstall pocketsphinx")
        # loglevel FATAL: the decoder otherwise prints hundreds of INFO lines to stderr.
        self._decoder = pocketsphinx.Decoder(hmm=str(hmm), lm=str(lm), dict=str(dic),
                                             samprate=self.sample_rate, loglevel="FATAL")

    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        """Decode each waveform independently.

        Args:
            wavs: B float32 `[n_samples]` arrays, mono at 16 kHz, in [-1, 1] (clipped otherwise).

        Returns:
            B raw hypotheses (lowercase words, not normalised). Silence or audio shorter than
            0.1 s gives '' without decoding (pocketsphinx would otherwise hallucinate a word),
            with one warning per call; so does audio the decoder finds no words in.
        """
        out, degenerate = [], []
        for i, wav in enumerate(wavs):
            wav = check_mono(wav, f"waveform {i}")
            if is_silent_or_short(wav, self.sample_rate):
                degenerate.append(i)
                out.append("")
                continue
            pcm = (np.clip(wav, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
            # full_utt=True decodes the whole utterance at once with batch cepstral mean
            # normalisation, so a hypothesis does not depend on what was decoded before it.
            self._decoder.start_utt()
            self._decoder.process_raw(pcm, no_search=False, full_utt=True)
            self._decoder.end_utt()
            hyp = self._decoder.hyp()
            out.append(hyp.hypstr.strip() if hyp is not None else "")
        if degenerate:
            log.warning("pocketsphinx: %d of %d waveforms are silent or shorter than 0.1 s "
                        "(indices %s); transcribed as ''", len(degenerate), len(wavs),
                        degenerate[:20])
        return out


ASR_BACKENDS = {"pocketsphinx": PocketSphinxASR}


def build_asr(name: str = "pocketsphinx", **kwargs):
    """Build an ASR backend by name; kwargs go to its constructor."""
    if name not in ASR_BACKENDS:
        raise ValueError(f"unknown ASR backend {name!r}; known: {sorted(ASR_BACKENDS)}")
    return ASR_BACKENDS[name](**kwargs)


def utterance_wer(reference: str, hypothesis: str) -> float:
    """WER of one hypothesis: (substitutions + deletions + insertions) / reference words.

    Both sides go through `normalize_text`. Can exceed 1.0 when the hypothesis has insertions.

    Raises:
        ValueError: the reference is empty after normalisation (WER is undefined).
    """
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        raise ValueError(f"reference {reference!r} is empty after normalisation, so WER is "
                         f"undefined; drop the item or fix its transcript")
    return float(jiwer.wer(ref, hyp))


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER: total errors over all pairs / total reference words (not a mean of
    per-utterance WERs, so long utterances weigh more).

    Raises:
        ValueError: lists of different lengths, an empty list, or a reference that is empty
            after normalisation.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"corpus_wer got {len(references)} references and {len(hypotheses)} "
                         f"hypotheses; pass one hypothesis per reference, in the same order")
    if not references:
        raise ValueError("corpus_wer got no utterances; evaluate at least one item")
    refs = [normalize_text(r) for r in references]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"references at indices {empty[:20]} are empty after normalisation; "
                         f"drop those items or fix their transcripts")
    return float(jiwer.wer(refs, [normalize_text(h) for h in hypotheses]))

