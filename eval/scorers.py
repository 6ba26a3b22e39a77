"""The judges: one ``EvalConfig`` (the ``eval:`` section) and one builder of its scorers.

    scorers = build_scorers(cfg.eval, device)      # Scorers(asr, speaker, quality)
    wers = scorers.wer(wavs, sample_rate, texts)   # resample-then-score, per utterance
    sims = scorers.sim(wavs, sample_rate, refs)

Evaluation, pair ranking and GRPO's direct reward all build their scorers here, from the same
section, so training and evaluation judge with the same models unless a config says otherwise.
Importing this module loads no model: the backends are imported when ``build_scorers`` runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, get_args

import numpy as np

from eval.defects import DefectConfig

# Registries' names (eval.asr.ASR_BACKENDS, eval.speaker.SPEAKER_ENCODERS, eval.quality), held to
# the registries in tests/test_config.py.
AsrName = Literal["pocketsphinx", "whisper"]
SpeakerName = Literal["resemblyzer", "ecapa", "wavlm"]
QualityName = Literal["none", "dnsmos_p808", "dnsmos", "utmos"]


@dataclass
class EvalConfig:
    """How each round's policy is scored on the test split."""

    max_utterances: int = field(default=0, metadata={"help": "test utterances scored (a fixed subset); 0 = all"})
    split: Literal["test", "dev"] = field(default="test", metadata={
        "help": "the split every round is scored on: test (what a run reports) or dev (what a study chooses "
                "settings on; `speechalign study --final test` then scores the chosen ones on test once)"})
    asr: AsrName = field(default="pocketsphinx", metadata={"help": "ASR backend for WER: pocketsphinx (embedded) or whisper"})
    asr_model: str | None = field(default=None, metadata={
        "help": "whisper: hub id (already cached) or local folder, e.g. openai/whisper-large-v3; "
                "pocketsphinx: a model folder (null = the one the package ships)"})
    speaker: SpeakerName = field(default="resemblyzer", metadata={
        "help": "speaker encoder for SIM: resemblyzer (embedded), ecapa (speechbrain) or wavlm (WavLMForXVector)"})
    speaker_model: str | None = field(default=None, metadata={
        "help": "ecapa: local copy of speechbrain/spkrec-ecapa-voxceleb; wavlm: hub id (cached) or folder, "
                "e.g. microsoft/wavlm-base-plus-sv; null = the backend's default id"})
    quality: QualityName = field(default="dnsmos_p808", metadata={
        "help": "per-utterance MOS proxy: dnsmos_p808 (0.1 s CPU/utt), dnsmos (+ P.835 SIG/BAK/OVRL, 2 s CPU/utt), "
                "utmos (needs utmos_checkpoint) or none"})
    utmos_checkpoint: str | None = field(default=None, metadata={
        "help": "quality=utmos: a UTMOS predictor exported to TorchScript (see eval/quality.py)"})
    allow_download: bool = field(default=False, metadata={
        "help": "let whisper/ecapa/wavlm fetch an uncached hub id (needs network); off: nothing is downloaded"})
    extra_sets: list[str] = field(default_factory=list, metadata={
        "help": "more test sets scored every round beside data.test (manifests or LibriSpeech/LibriTTS/VCTK "
                "folders), e.g. VCTK for cross-corpus zero-shot; results in eval/<folder name>/"})
    prompt_min_seconds: float = field(default=3.0, metadata={
        "help": "voice prompt: another utterance of the target speaker at least this long (else the longest); "
                "the policy keeps policy.prompt_seconds of it. 0 = any length"})
    ear: str | None = field(default=None, metadata={
        "help": "a second ear beside the ASR: a saved CTC phone ear (eval/ear.py, scripts/train_ear.py) that scores "
                "every evaluated clip's phone error rate (per) and the CTC NLL of its text's phones (ear_nll); "
                "null = the ASR alone. WER stays the headline; the ear is read beside it"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature at evaluation; 0 = greedy"})
    top_k: int = field(default=50, metadata={"help": "top-k at evaluation"})
    top_p: float = field(default=1.0, metadata={"help": "top-p at evaluation"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generate() call"})
    save_audio: int = field(default=8, metadata={
        "help": "write the synthesised wavs of the first N evaluation utterances (the same N every round, "
                "round_k/eval/audio/<id>.wav) for listening and the HTML report"})
    gap_utterances: int = field(default=32, metadata={
        "help": "held-out (dev + test) utterances of the golden-vs-synthetic gap analysis (eval/gap.py), a fixed "
                "seeded subset sampled from every round's policy; 0 = off"})
    defect: DefectConfig = field(default_factory=DefectConfig, metadata={
        "help": "the pause detector (eval/defects.py): every evaluated clip's longest internal pause and whether it "
                "is the defect (metric 'defect'); the 'pause' pair scorer and GRPO reward use it too"})
    probes: int = field(default=0, metadata={
        "help": "held-out (dev + test) utterances of the probe set (align/probes.py): golden streams against copies "
                "with a planted pause, shuffled or duplicated frames; every round reports how many of them its "
                "policy prefers more than round 0 did (probe_accuracy). Interleaved policies; 0 = off"})
    defect_samples: int = field(default=0, metadata={
        "help": "extra samples per evaluated utterance judged by the pause detector alone (no ASR; from the rendered "
                "log-mel where the policy has a phone renderer), so the defect rate is measured on (1 + N) samples "
                "per utterance"})

    def __post_init__(self):
        if self.split not in ("test", "dev"):
            raise ValueError(f"eval.split={self.split!r}: choose test or dev")
        if self.max_utterances < 0 or self.batch_size < 1:
            raise ValueError("eval.max_utterances >= 0 and eval.batch_size >= 1 are required")
        for key, choices in (("asr", AsrName), ("speaker", SpeakerName), ("quality", QualityName)):
            if getattr(self, key) not in get_args(choices):
                raise ValueError(f"eval.{key}={getattr(self, key)!r}: choose one of {list(get_args(choices))}")
        if self.quality == "utmos" and not self.utmos_checkpoint:
            raise ValueError("eval.quality=utmos needs eval.utmos_checkpoint (a TorchScript UTMOS file)")
        if self.prompt_min_seconds < 0:
            raise ValueError(f"eval.prompt_min_seconds={self.prompt_min_seconds} must be >= 0")
        if min(self.save_audio, self.gap_utterances, self.defect_samples, self.probes) < 0:
            raise ValueError("eval.save_audio, eval.gap_utterances, eval.defect_samples and eval.probes must be >= 0 "
                             "(0 = off)")

    def asr_kwargs(self, device: str) -> dict:
        """Constructor arguments of the configured ASR backend."""
        if self.asr == "whisper":
            return {"device": device, "allow_download": self.allow_download,
                    **({"model": self.asr_model} if self.asr_model else {})}
        return {"model_dir": self.asr_model} if self.asr_model else {}

    def speaker_kwargs(self, device: str) -> dict:
        """Constructor arguments of the configured speaker encoder."""
        if self.speaker == "resemblyzer":
            return {"device": device}
        return {"device": device, "allow_download": self.allow_download,
                **({"model": self.speaker_model} if self.speaker_model else {})}

    def quality_kwargs(self, device: str) -> dict:
        """Constructor arguments of the configured quality model."""
        return {"checkpoint": self.utmos_checkpoint, "device": device} if self.quality == "utmos" else {}


class Scorers:
    """The judges of one ``eval:`` section, each built on first use (pairing by WER loads no speaker model).

    ``asr``, ``speaker``, ``quality`` (None when ``eval.quality: none``) and ``dnsmos`` (the configured
    quality model when it reports DNSMOS, else DNSMOS P.808: the pair scorer of that name) are the models;
    ``wer``, ``sim`` and ``quality_scores`` resample and score.
    """

    def __init__(self, ecfg: EvalConfig, device: str):
        self.ecfg, self.device = ecfg, device

    @cached_property
    def asr(self):
        from eval.asr import build_asr

        return build_asr(self.ecfg.asr, **self.ecfg.asr_kwargs(self.device))

    @cached_property
    def speaker(self):
        from eval.speaker import build_speaker_encoder

        return build_speaker_encoder(self.ecfg.speaker, **self.ecfg.speaker_kwargs(self.device))

    @cached_property
    def quality(self):
        from eval.quality import build_quality

        return build_quality(self.ecfg.quality, **self.ecfg.quality_kwargs(self.device))

    @cached_property
    def dnsmos(self):
        if self.ecfg.quality in ("dnsmos_p808", "dnsmos"):
            return self.quality
        from eval.quality import build_quality

        return build_quality("dnsmos_p808")

    @cached_property
    def ear(self):
        """The second ear (eval/ear.py) of ``eval.ear``, or None."""
        if not self.ecfg.ear:
            return None
        from eval.ear import Ear

        return Ear.load(self.ecfg.ear)

    def phones(self, wavs: list[np.ndarray], sample_rate: int, texts: list[str]) -> list[dict[str, float]]:
        """The second ear's verdict per wav (float32 [n] at ``sample_rate``; empty = silence: every phone missed):
        ``per``, ``phone_errors``, ``ref_phones`` and ``ear_nll`` (nats per reference phone); ``{}`` each without
        ``eval.ear``."""
        if self.ear is None:
            return [{} for _ in wavs]
        import torch

        from eval.ear import score_logmel

        ear = self.ear
        mels = [ear.features(w, ear.cfg.sample_rate) if len(w) else torch.zeros(0, ear.cfg.n_mels)
                for w in resample_all(wavs, sample_rate, ear.cfg.sample_rate)]
        return [{"per": s.per, "phone_errors": s.per * len(s.ref), "ref_phones": float(len(s.ref)),
                 "ear_nll": s.nll} for s in score_logmel(ear, mels, texts)]

    def wer(self, wavs: list[np.ndarray], sample_rate: int, texts: list[str]) -> tuple[list[float], list[str]]:
        """Per-utterance WER of ``wavs`` (float32 [n] each at ``sample_rate``; empty = silence) and the
        hypotheses."""
        from eval.asr import utterance_wer

        hyps = self.asr.transcribe(resample_all(wavs, sample_rate, self.asr.sample_rate))
        return [utterance_wer(t, h) for t, h in zip(texts, hyps)], hyps

    def sim(self, wavs: list[np.ndarray], sample_rate: int, refs: list[np.ndarray]) -> np.ndarray:
        """Speaker similarity of each wav to its reference recording (at ``self.speaker.sample_rate``), as
        the encoder returns it (float32 [B]: means over it are taken at that precision)."""
        return np.asarray(self.speaker.similarity(resample_all(wavs, sample_rate, self.speaker.sample_rate), refs))

    def quality_scores(self, wavs: list[np.ndarray], sample_rate: int, model=None) -> list[dict[str, float]]:
        """The quality model's keys per wav (NaN for silence); ``{}`` each without a quality model.
        ``model``: another quality model than the configured one (e.g. ``self.dnsmos``)."""
        model = self.quality if model is None else model
        if model is None:
            return [{} for _ in wavs]
        return model.score(resample_all(wavs, sample_rate, model.sample_rate))


def resample_all(wavs: list[np.ndarray], orig_sr: int, target_sr: int) -> list[np.ndarray]:
    """Each wav at ``target_sr``; empty wavs stay empty (the scorers score them as silence)."""
    from models.audio import resample

    return [resample(w, orig_sr, target_sr) if len(w) else w for w in wavs]


def build_scorers(ecfg: EvalConfig, device: str) -> Scorers:
    """The judges of the ``eval:`` section (built lazily): the one way evaluation, pairing and rewards get them."""
    return Scorers(ecfg, device)
