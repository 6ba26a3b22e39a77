"""The run configuration: one dataclass per section, loaded from YAML, unknown keys rejected.

    cfg = load_config("configs/tiny.yaml", overrides=["dpo.beta=0.2"])

Sections live beside the code they configure (``CorpusConfig`` in ``align/corpus.py``,
``CodecConfig`` in ``models/codec.py`` ...); this module only composes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from align.base import BaseConfig
from align.configutil import apply_overrides, from_dict, load_yaml, to_dict
from align.corpus import CorpusConfig
from align.speechgpt_gen import SpeechGPTGenConfig
from align.methods import TrainConfig
from align.stages import DPOStageConfig, EvalConfig, PairConfig, SampleConfig
from models.codec import CodecConfig
from models.codec_lm import PolicyConfig


@dataclass
class DataConfig:
    """Where training and evaluation utterances come from."""

    source: str = field(default="embedded", metadata={
        "help": "'embedded' builds the flite corpus offline (see corpus:); 'manifests' reads the paths below"})
    corpus_dir: str = field(default="runs/_corpus", metadata={
        "help": "where the embedded corpus is written (shared by runs with the same corpus config)"})
    train: str | None = field(default=None, metadata={
        "help": "source=manifests: training manifest (JSONL/CSV) or LibriSpeech/LibriTTS/VCTK folder"})
    dev: str | None = field(default=None, metadata={"help": "source=manifests: dev manifest or folder (optional)"})
    test: str | None = field(default=None, metadata={"help": "source=manifests: test manifest or folder"})
    max_seconds: float = field(default=10.0, metadata={
        "help": "utterances longer than this are skipped (and recorded) rather than trained on"})
    max_train_utterances: int | None = field(default=None, metadata={
        "help": "cap on training utterances (first N after a seeded shuffle); null = all"})

    def __post_init__(self):
        if self.source not in ("embedded", "manifests"):
            raise ValueError(f"data.source={self.source!r}: choose 'embedded' or 'manifests'")
        if self.source == "manifests" and (not self.train or not self.test):
            raise ValueError("data.source=manifests needs data.train and data.test (manifest files or corpus folders)")
        if self.max_seconds <= 0:
            raise ValueError(f"data.max_seconds={self.max_seconds} must be > 0")


# Which way is better, per gated metric: +1 = higher is better, -1 = lower is better.
GATE_DIRECTIONS = {"wer": -1, "sim": +1, "dnsmos": +1}


@dataclass
class GateConfig:
    """``speechalign gate``: when a run's final round counts as a regression against a baseline.

    A metric fails when the whole bootstrap CI of (run - baseline), oriented so that positive means
    worse, lies above its tolerance: noise (a CI that reaches below the tolerance) passes.
    """

    metrics: list[str] = field(default_factory=lambda: ["wer", "sim"], metadata={
        "help": f"metrics the gate checks (any of {sorted(GATE_DIRECTIONS)}; dnsmos only where rows carry it)"})
    wer_tolerance: float = field(default=0.05, metadata={
        "help": "corpus-WER increase (absolute, 0.05 = 5 points) allowed beyond the CI"})
    sim_tolerance: float = field(default=0.02, metadata={"help": "mean speaker-SIM decrease allowed beyond the CI"})
    dnsmos_tolerance: float = field(default=0.1, metadata={"help": "mean DNSMOS decrease allowed beyond the CI"})
    confidence: float = field(default=0.95, metadata={"help": "two-sided bootstrap CI level"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed (the gate is deterministic for a seed)"})

    def __post_init__(self):
        unknown = sorted(set(self.metrics) - set(GATE_DIRECTIONS))
        if unknown or not self.metrics:
            raise ValueError(f"gate.metrics={self.metrics}: choose a non-empty subset of {sorted(GATE_DIRECTIONS)}")
        if min(self.wer_tolerance, self.sim_tolerance, self.dnsmos_tolerance) < 0:
            raise ValueError("gate tolerances must be >= 0 (0 = any significant regression fails)")
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"gate.confidence={self.confidence} must be in [0.5, 1), e.g. 0.95")
        if self.n_boot < 100:
            raise ValueError(f"gate.n_boot={self.n_boot} is too few for a CI; use >= 100 (default 2000)")

    def tolerance(self, metric: str) -> float:
        return getattr(self, f"{metric}_tolerance")


@dataclass
class RunConfig:
    """A whole SpeechAlign run: base stage (round 0) then ``rounds`` rounds of sample/pair/train/evaluate
    (``train.method``: dpo by default)."""

    name: str = field(default="tiny", metadata={"help": "run name: outputs go to <out_dir>/<name>/"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of run directories"})
    cache_dir: str = field(default="runs/_cache", metadata={
        "help": "golden codec tokens and fitted codecs, reused across rounds and runs"})
    seed: int = field(default=0, metadata={"help": "seed for every stage (each derives its own from it)"})
    rounds: int = field(default=3, metadata={"help": "alignment rounds after the base stage"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if present), cpu or cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = all cores"})
    data: DataConfig = field(default_factory=DataConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    speechgpt_gen: SpeechGPTGenConfig = field(default_factory=SpeechGPTGenConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    pair: PairConfig = field(default_factory=PairConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self):
        if self.rounds < 0:
            raise ValueError(f"rounds={self.rounds} must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: choose auto, cpu or cuda")
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r} must be a non-empty folder name")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (or defaults when ``path`` is None) + ``key.sub=value`` overrides -> RunConfig."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


def config_to_dict(cfg: RunConfig) -> dict:
    return to_dict(cfg)
