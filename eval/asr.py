"""ASR backends and word error rate.

A backend is any object with `name`, `sample_rate` and `transcribe(wavs) -> list[str]`; it
returns raw hypotheses, and WER normalises both sides with `models.text.normalize_text`, so every
backend is scored the same way.

Backends: `pocketsphinx` (embedded, CPU, offline; the default) and `whisper` (transformers'
WhisperForConditionalGeneration, a hub id or a local folder; English, greedy, batched). Whisper
writes numbers as digits and adds punctuation and case; `normalize_text` spells digits out and
drops case and punctuation on both sides, which is what Whisper's own English normaliser achieves
the other way round (words -> digits). One known difference: a year that Whisper writes as
"1813" reads "one thousand eight hundred thirteen" after normalisation, so a reference that spells
it "eighteen thirteen" costs those words; LibriSpeech references spell numbers out in words, so
this affects only hypotheses, and the same way in every round.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jiwer
import numpy as np
import torch

from models.audio import check_mono, is_silent_or_short
from models.text import normalize_text

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

    def __init__(self, model_dir: str | None = None, workers: int = 0):
        """
        Args:
            model_dir: folder holding `en-us/en-us/` (acoustic model), `en-us/en-us.lm.bin` and
                `en-us/cmudict-en-us.dict`; None: the copy inside the pocketsphinx package.
            workers: decoding processes for long lists (the decoder holds the GIL, so threads do
                not help); 0 = one per CPU core, at most 4. Results do not depend on it.
        """
        self.model_dir = model_dir
        self.workers = workers or min(4, os.cpu_count() or 1)
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
        # The decoder carries feature state (cepstral mean and more) from one utterance to the
        # next, so a hypothesis depended on what was decoded before it (measured: the same audio
        # got different words in another order). Re-initialising the feature pipeline and the CMN
        # estimate before every utterance (~0.1 ms) makes each transcript a function of its audio.
        self._cmn_init = self._decoder.get_cmn()

    def _pool(self):
        """The decoding processes, started once and reused by every call (a start costs ~2 s of imports, which a
        stage that scores in batches would otherwise pay per batch); shut down with this object."""
        if getattr(self, "_executor", None) is None:
            import weakref
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            # spawn, not fork: the parent may hold torch's thread pools, which do not survive a fork
            self._executor = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                                 initializer=_init_worker, initargs=(self.model_dir,))
            weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        return self._executor

    def _decode(self, wav: np.ndarray) -> str:
        pcm = (np.clip(wav, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        # full_utt=True decodes the whole utterance at once with batch cepstral mean
        # normalisation.
        self._decoder.reinit_feat()
        self._decoder.set_cmn(self._cmn_init)
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, no_search=False, full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""

    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        """Decode each waveform independently.

        Args:
            wavs: B float32 `[n_samples]` arrays, mono at 16 kHz, in [-1, 1] (clipped otherwise).

        Returns:
            B raw hypotheses (lowercase words, not normalised). Silence or audio shorter than
            0.1 s gives '' without decoding (pocketsphinx would otherwise hallucinate a word),
            with one warning per call; so does audio the decoder finds no words in.
        """
        wavs = [check_mono(w, f"waveform {i}") for i, w in enumerate(wavs)]
        degenerate = [i for i, w in enumerate(wavs) if is_silent_or_short(w, self.sample_rate)]
        todo = [i for i in range(len(wavs)) if i not in set(degenerate)]
        out = [""] * len(wavs)
        if self.workers > 1 and len(todo) >= 4 * self.workers:
            chunks = [todo[j::self.workers] for j in range(self.workers)]
            for chunk, hyps in zip(chunks, self._pool().map(_worker_decode, [[wavs[i] for i in c] for c in chunks])):
                for i, h in zip(chunk, hyps):
                    out[i] = h
        else:
            for i in todo:
                out[i] = self._decode(wavs[i])
        if degenerate:
            log.warning("pocketsphinx: %d of %d waveforms are silent or shorter than 0.1 s "
                        "(indices %s); transcribed as ''", len(degenerate), len(wavs),
                        degenerate[:20])
        return out


_WORKER_ASR: "PocketSphinxASR | None" = None


def _init_worker(model_dir):
    global _WORKER_ASR
    _WORKER_ASR = PocketSphinxASR(model_dir, workers=1)
    _exit_with_parent()


def _exit_with_parent() -> None:
    """A decoding process whose parent was killed (SIGKILL gives it no chance to shut its pool down) is re-parented;
    it leaves then instead of waiting on a queue nobody writes to (seen: orphans spinning for half an hour)."""
    import threading
    import time

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _worker_decode(wavs: list[np.ndarray]) -> list[str]:
    return [_WORKER_ASR._decode(w) for w in wavs]


class WhisperASR:
    """Whisper through transformers: English, greedy, batched, short-form (<= 30 s per utterance).

    Loads ``WhisperForConditionalGeneration`` and ``WhisperProcessor`` from a hub id (e.g.
    ``openai/whisper-large-v3``, the paper's WER model) or a local folder written by
    ``save_pretrained``. By default nothing is downloaded (``local_files_only``): a hub id must
    already be in the Hugging Face cache.
    """

    name = "whisper"
    sample_rate = 16000

    def __init__(self, model: str = "openai/whisper-large-v3", device: str = "cpu", batch_size: int = 16,
                 max_new_tokens: int = 128, allow_download: bool = False):
        """
        Args:
            model: hub id or local folder with config.json, model weights, generation_config.json
                and the processor files (tokenizer + preprocessor_config.json).
            device: torch device; on CUDA the model runs in float16.
            batch_size: utterances per generate() call.
            max_new_tokens: cap on transcript tokens per utterance (Whisper's limit is 448).
            allow_download: let transformers fetch a hub id that is not cached (needs network;
                off by default so that nothing in an evaluation reaches for the network).
        """
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.model_id, self.device, self.batch_size, self.max_new_tokens = model, device, batch_size, max_new_tokens
        local_only = not allow_download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        try:
            self.processor = WhisperProcessor.from_pretrained(model, local_files_only=local_only)
            dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
            self.model = WhisperForConditionalGeneration.from_pretrained(
                model, local_files_only=local_only, dtype=dtype).to(device).eval()
        except OSError as e:
            raise ValueError(
                f"whisper model {model!r} could not be loaded ({str(e).splitlines()[0]}). It is neither a local "
                "folder nor in the Hugging Face cache, and downloads are off: on a machine with network run "
                f"`huggingface-cli download {model} --local-dir DIR` (or save_pretrained a model there), copy DIR "
                "here and set eval.asr_model=DIR") from e
        gc = self.model.generation_config
        # Multilingual checkpoints are told the language and task; English-only ones (*.en) refuse them.
        self._generate_kwargs = ({"language": "en", "task": "transcribe"} if getattr(gc, "is_multilingual", False)
                                 else {})

    @torch.no_grad()
    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        """Transcribe each waveform.

        Args:
            wavs: B float32 `[n_samples]` arrays, mono at 16 kHz. Longer than 30 s is cut to
                30 s by the feature extractor (with a warning): Whisper's short-form limit.

        Returns:
            B raw hypotheses (Whisper's case and punctuation; not normalised). Silence or audio
            shorter than 0.1 s gives '' without decoding, as for pocketsphinx.
        """
        from tqdm import tqdm

        wavs = [check_mono(w, f"waveform {i}") for i, w in enumerate(wavs)]
        degenerate = [i for i, w in enumerate(wavs) if is_silent_or_short(w, self.sample_rate)]
        long = [i for i, w in enumerate(wavs) if len(w) > 30 * self.sample_rate]
        if long:
            log.warning("whisper: %d waveforms are longer than 30 s and are cut to 30 s (indices %s)",
                        len(long), long[:20])
        todo = [i for i in range(len(wavs)) if i not in set(degenerate)]
        out = [""] * len(wavs)
        for start in tqdm(range(0, len(todo), self.batch_size), desc="whisper", leave=False,
                          disable=len(todo) <= self.batch_size):
            idx = todo[start:start + self.batch_size]
            feats = self.processor.feature_extractor(
                [wavs[i] for i in idx], sampling_rate=self.sample_rate, return_tensors="pt",
                return_attention_mask=True)
            tokens = self.model.generate(
                feats.input_features.to(self.device, self.model.dtype),
                attention_mask=feats.attention_mask.to(self.device), do_sample=False, num_beams=1,
                max_new_tokens=self.max_new_tokens, **self._generate_kwargs)
            for i, text in zip(idx, self.processor.batch_decode(tokens, skip_special_tokens=True)):
                out[i] = text.strip()
        if degenerate:
            log.warning("whisper: %d of %d waveforms are silent or shorter than 0.1 s (indices %s); "
                        "transcribed as ''", len(degenerate), len(wavs), degenerate[:20])
        return out


ASR_BACKENDS = {"pocketsphinx": PocketSphinxASR, "whisper": WhisperASR}


def build_asr(name: str = "pocketsphinx", **kwargs):
    """Build an ASR backend by name; kwargs go to its constructor (whisper: model=, device=, ...)."""
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

