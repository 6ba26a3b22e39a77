"""The run configuration: the schema of every section, loaded from YAML, unknown keys rejected.

    cfg = load_config("configs/tiny.yaml", overrides=["dpo.beta=0.2"])

This module is the schema only: it imports no stage, trainer or model code, so reading a YAML
(``speechalign gate``, the dry run, the report) stays cheap. Choices are ``Literal`` types;
``tests/test_config.py`` holds each registry (base stages, pair strategies, methods, scorers) to
its ``Literal``. Sections that configure a model or an evaluator live beside it and are composed
here: ``CodecConfig`` (models/codec.py), ``PolicyConfig`` (models/codec_lm.py), ``RewardConfig``
(models/reward.py), ``EvalConfig`` (eval/scorers.py), ``GateConfig`` (eval/gate.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

from models.configutil import apply_overrides, check_choice, from_dict, load_yaml, to_dict
from eval.gate import GateConfig
from eval.scorers import EvalConfig
from models.codec import CodecConfig
from models.codec_lm import PolicyConfig
from models.reward import RewardConfig

# Voices Debian's flite ships (the embedded corpus, align/corpus.py), one speaker each. awb_time is left
# out: it is a limited-domain voice that only speaks clock times. kal is 8 kHz (resampled like any other
# rate mismatch); the others are 16 kHz.
FLITE_VOICES = ("slt", "awb", "rms", "kal16", "kal")
# Corpus fields that change what is on disk; `num_workers` only changes how fast it gets there.
CORPUS_IDENTITY_EXCLUDE = ("num_workers",)
# Data defects the embedded corpus can plant in its train split (align/corpus.py, the positive control).
CORPUS_DEFECTS = ("none", "pause")

# Registries' names, checked against the registries themselves in tests/test_config.py.
BaseStageName = Literal["sft", "speechgpt", "speechgpt_gen"]
PairStrategyName = Literal["golden_vs_synthetic", "ranked_samples", "human", "mixed"]
PairScorerName = Literal["wer", "sim", "dnsmos", "pause", "per", "ear_nll"]
MethodName = Literal["dpo", "sft_control", "reward_bon", "grpo", "coh"]
GRPORewardName = Literal["reward_model", "wer", "wer_sim", "pause", "ear"]


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
    val: str | None = field(default=None, metadata={
        "help": "source=manifests: the validation manifest or folder that train.validate_every chooses checkpoints "
                "on, held out of the dev table (optional)"})
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


@dataclass
class CorpusConfig:
    """How to build the embedded flite corpus (see module docstring)."""

    n_sentences: int = field(default=400, metadata={
        "help": "distinct sentences in all, dev and test included; >= 300 for real runs, a handful for tests"})
    n_dev_sentences: int = field(default=20, metadata={
        "help": "sentences held out for dev (spoken by every voice), never seen in train"})
    n_test_sentences: int = field(default=40, metadata={
        "help": "sentences held out for test (spoken by every voice), never seen in train or dev"})
    n_val_sentences: int = field(default=0, metadata={
        "help": "sentences of a validation split (spoken by every voice) that train.validate_every chooses "
                "checkpoints on, so the dev table grades choices it did not make; drawn after the n_sentences others "
                "(train, dev and test do not move)"})
    voices: list[str] = field(default_factory=lambda: ["slt", "awb", "rms", "kal16"], metadata={
        "help": f"flite voices, one speaker each; available: {', '.join(FLITE_VOICES)}"})
    voices_per_sentence: int = field(default=2, metadata={
        "help": "voices that speak each train sentence (dev/test sentences get all voices); more = more "
                "audio per sentence, fewer = more sentences per hour"})
    sample_rate: int = field(default=16000, metadata={
        "help": "sample rate of the written wavs in Hz; voices at another native rate are resampled"})
    seed: int = field(default=0, metadata={"help": "seed for sentence generation and voice assignment"})
    trim_silence: bool = field(default=True, metadata={
        "help": "trim flite's ~0.2 s leading / ~0.1 s trailing silence, keeping 50 ms each side"})
    num_workers: int = field(default=2, metadata={
        "help": "flite processes run at once; does not change the output (not part of the corpus identity)"})
    defect: str = field(default="none", metadata={
        "help": "a data defect planted in a fraction of the TRAIN utterances (the positive control, "
                "configs/positive_control.yaml): 'pause' = the sentence spoken in two parts with a long silence "
                "between two of its words (at a random word boundary); 'none' = clean. Dev, test and val stay clean"})
    defect_fraction: float = field(default=0.3, metadata={
        "help": "share of train utterances that carry the defect (each drawn on its own, seeded by its id)"})
    pause_seconds: list[float] = field(default_factory=lambda: [0.5, 0.8], metadata={
        "help": "defect=pause: the silence's length in seconds, drawn uniformly from [lo, hi]"})

    def __post_init__(self):
        for key in ("n_sentences", "n_dev_sentences", "n_test_sentences", "n_val_sentences", "voices_per_sentence",
                    "sample_rate", "seed", "num_workers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"corpus.{key}={value!r} must be an integer")
        if self.n_dev_sentences < 1 or self.n_test_sentences < 1:
            raise ValueError(
                f"corpus.n_dev_sentences={self.n_dev_sentences} and corpus.n_test_sentences="
                f"{self.n_test_sentences} must both be >= 1: empty dev/test manifests cannot be evaluated")
        if self.n_val_sentences < 0:
            raise ValueError(f"corpus.n_val_sentences={self.n_val_sentences} must be >= 0 (0: no validation split)")
        if self.n_sentences <= self.n_dev_sentences + self.n_test_sentences:
            raise ValueError(
                f"corpus.n_sentences={self.n_sentences} leaves no train sentence after "
                f"{self.n_dev_sentences} dev + {self.n_test_sentences} test; raise n_sentences above "
                f"{self.n_dev_sentences + self.n_test_sentences} (>= 300 for a real run)")
        if isinstance(self.voices, str):
            raise ValueError(f"corpus.voices={self.voices!r} must be a list of voice names, e.g. [slt, awb]")
        self.voices = list(self.voices)
        if not self.voices:
            raise ValueError(f"corpus.voices is empty; pick from {', '.join(FLITE_VOICES)}")
        unknown = [v for v in self.voices if v not in FLITE_VOICES]
        if unknown:
            raise ValueError(
                f"corpus.voices has unknown voice(s) {', '.join(map(repr, unknown))}; available: "
                f"{', '.join(FLITE_VOICES)}")
        if len(set(self.voices)) != len(self.voices):
            raise ValueError(f"corpus.voices={self.voices} repeats a voice; list each voice once")
        if not 1 <= self.voices_per_sentence <= len(self.voices):
            raise ValueError(
                f"corpus.voices_per_sentence={self.voices_per_sentence} must be between 1 and the number "
                f"of voices ({len(self.voices)})")
        if not 8000 <= self.sample_rate <= 48000:
            raise ValueError(f"corpus.sample_rate={self.sample_rate} must be between 8000 and 48000 Hz (16000 "
                             "is what the codecs expect)")
        if not isinstance(self.trim_silence, bool):
            raise ValueError(f"corpus.trim_silence={self.trim_silence!r} must be true or false")
        if self.num_workers < 1:
            raise ValueError(f"corpus.num_workers={self.num_workers} must be >= 1")
        if self.defect not in CORPUS_DEFECTS:
            raise ValueError(f"corpus.defect={self.defect!r}: choose one of {', '.join(CORPUS_DEFECTS)}")
        if not 0.0 <= self.defect_fraction <= 1.0:
            raise ValueError(f"corpus.defect_fraction={self.defect_fraction} must be in [0, 1]")
        self.pause_seconds = [float(x) for x in self.pause_seconds]
        if len(self.pause_seconds) != 2 or not 0 < self.pause_seconds[0] <= self.pause_seconds[1] <= 5:
            raise ValueError(f"corpus.pause_seconds={self.pause_seconds} must be [lo, hi] with 0 < lo <= hi <= 5")

    @classmethod
    def from_dict(cls, d: dict) -> "CorpusConfig":
        """Build from a YAML mapping; unknown keys raise ValueError listing the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown corpus key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**d)

    def identity(self) -> dict:
        """The fields that decide what the corpus holds (compared to reuse a finished build). A field added later is
        left out at its default, so corpora built before it keep their identity (and their folder)."""
        added_later = {"n_val_sentences": 0, "defect": "none"}
        out = {k: v for k, v in asdict(self).items()
               if k not in CORPUS_IDENTITY_EXCLUDE and not (k in added_later and v == added_later[k])}
        if self.defect == "none":  # the defect's settings shape nothing when there is none
            out.pop("defect_fraction"), out.pop("pause_seconds")
        return out


@dataclass
class SampleConfig:
    """How the current policy speaks the training texts each round."""

    prompts_per_round: int = field(default=256, metadata={
        "help": "training utterances sampled per round (a fresh seeded subset each round); 0 = all"})
    n: int = field(default=1, metadata={"help": "samples per prompt (best-of-N and ranking strategies use > 1)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; 0 = greedy"})
    top_k: int = field(default=50, metadata={"help": "top-k filter; 0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus filter; 1 = off"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generate() call"})
    temperatures: list[float] = field(default_factory=list, metadata={
        "help": "per-sample temperatures, cycled over the sample index (sample j uses temperatures[j % len]); "
                "empty = sample.temperature for all. Samples of one checkpoint at one temperature sound alike, "
                "and ranking needs them to differ"})
    top_ps: list[float] = field(default_factory=list, metadata={
        "help": "per-sample top-p values, cycled like temperatures; empty = sample.top_p for all"})

    def __post_init__(self):
        if self.n < 1 or self.batch_size < 1 or self.prompts_per_round < 0:
            raise ValueError("sample.n and sample.batch_size must be >= 1, sample.prompts_per_round >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("sample.temperature >= 0, 0 < sample.top_p <= 1 and sample.top_k >= 0 are required")
        if any(t < 0 for t in self.temperatures) or any(not 0 < p <= 1 for p in self.top_ps):
            raise ValueError("sample.temperatures must be >= 0 and sample.top_ps in (0, 1]")

    def settings(self, j: int) -> tuple[float, float]:
        """(temperature, top_p) of sample index j."""
        t = self.temperatures[j % len(self.temperatures)] if self.temperatures else self.temperature
        p = self.top_ps[j % len(self.top_ps)] if self.top_ps else self.top_p
        return t, p

    @property
    def varied(self) -> bool:
        return bool(self.temperatures or self.top_ps)


@dataclass
class DPOStageConfig:
    """The ``dpo:`` section: the optimiser budget of the round's ``train`` stage, whatever ``train.method``
    (steps, learning_rate, batch_size, grad_accum, warmup_ratio, LoRA: sft_control and coh use them too,
    so methods compare at equal cost), and DPO's own loss settings (beta, loss_type, ...) for trl.DPOTrainer
    with round k-1's policy as the reference."""

    beta: float = field(default=0.1, metadata={"help": "KL strength; beta -> 0 ignores the reference"})
    loss_type: str = field(default="sigmoid", metadata={
        "help": "any loss_type trl.DPOConfig accepts: sigmoid, ipo, hinge, robust, sigmoid_norm, ..."})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate (paper scale: 5e-7)"})
    steps: int = field(default=60, metadata={"help": "optimiser steps per round"})
    batch_size: int = field(default=8, metadata={"help": "pairs per micro-step over all processes (each takes "
                                                          "batch_size / N of them): the same steps for any N"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    sft_weight: float = field(default=0.0, metadata={
        "help": "weight of an SFT term on the chosen (golden) tokens added to the DPO loss (RPO-style); "
                "keeps the chosen log-probs from falling with the rejected ones"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps for linear warm-up"})
    max_length: int = field(default=1024, metadata={"help": "longest prompt + completion in tokens"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of all weights; "
                                                         "merged into the saved policy"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={
        "help": "modules LoRA wraps"})
    save_steps: int = field(default=20, metadata={
        "help": "trainer checkpoint every N steps; a killed DPO resumes from the last one"})
    precompute_ref: bool = field(default=False, metadata={
        "help": "score every pair under the frozen reference once before training (TRL's "
                "precompute_ref_log_probs) instead of a reference forward pass in every step"})
    # Extra parameters of some TRL loss types (passed to trl.DPOConfig as they are).
    label_smoothing: float = field(default=0.0, metadata={
        "help": "robust: probability that a preference label is flipped, in [0, 0.5) (paper: 0.1); exo_pair: "
                "its epsilon (paper: 1e-3)"})
    discopop_tau: float = field(default=0.05, metadata={"help": "discopop: temperature of the log-ratio modulation"})
    ld_alpha: float | None = field(default=None, metadata={
        "help": "LD-DPO: weight of the tokens beyond the shorter sequence's length, in [0, 1]; null = off. "
                "Codec sequences differ in length, and summed log-probs favour the shorter"})
    f_divergence_type: str = field(default="reverse_kl", metadata={
        "help": "f-DPO regulariser: reverse_kl, forward_kl, js_divergence, alpha_divergence"})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={
        "help": "alpha of f_divergence_type=alpha_divergence"})
    use_weighting: bool = field(default=False, metadata={
        "help": "WPO: weight pairs by the policy's length-normalised probability of them"})
    scoring: Literal["rule", "full_softmax"] = field(default="rule", metadata={
        "help": "what the trainer's log-probs are over: rule (the policy's emit rule, the distribution its sampler "
                "draws from: models/walk.py) or full_softmax (the whole vocabulary, as TRL scores by default; kept for "
                "the comparison in configs/studies/efficacy.yaml, variant golden_full_softmax)"})

    def __post_init__(self):
        if self.sft_weight < 0:
            raise ValueError(f"dpo.sft_weight={self.sft_weight} must be >= 0")
        if self.loss_type == "robust" and not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing}: robust DPO needs it in [0, 0.5)")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ValueError(f"dpo.ld_alpha={self.ld_alpha} must be in [0, 1] or null")
        if self.f_divergence_type not in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
            raise ValueError(f"dpo.f_divergence_type={self.f_divergence_type!r}: choose reverse_kl, forward_kl, "
                             "js_divergence or alpha_divergence")
        if self.beta <= 0:
            raise ValueError(f"dpo.beta={self.beta} must be > 0")
        check_choice(self.scoring, Literal["rule", "full_softmax"], "dpo.scoring")
        if self.learning_rate <= 0 or self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("dpo.learning_rate > 0 and dpo.steps, dpo.batch_size, dpo.grad_accum >= 1 are required")
        # loss_type is checked against the installed TRL when a run starts (align.methods.check_loss_type):
        # the schema does not import the trainer.


@dataclass
class PairConfig:
    """How samples become preference pairs, and how rounds use them."""

    strategy: PairStrategyName = field(default="golden_vs_synthetic", metadata={
        "help": "golden_vs_synthetic: golden tokens chosen, each synthetic sample rejected; ranked_samples: best vs "
                "worst of each prompt's sample.n samples by score (needs sample.n >= 2); human: what raters preferred "
                "in `speechalign listen` (pair.human_db); mixed: the pairs of every strategy in pair.mixed"})
    mixed: list[PairStrategyName] = field(default_factory=lambda: ["golden_vs_synthetic", "ranked_samples"], metadata={
        "help": "strategy=mixed: the strategies whose pairs are pooled, e.g. [golden_vs_synthetic, human]"})
    human_db: str | None = field(default=None, metadata={
        "help": "strategy=human (or in pair.mixed): the judgments database of `speechalign listen`; null = "
                "<run>/listen/judgments.sqlite. Judged clips are evaluation clips: a round trained on them is no "
                "longer held out on those utterances (the pair stage counts them in stats.json)"})
    min_distance: float = field(default=0.05, metadata={
        "help": "drop pairs whose two code sequences are this close (normalised edit distance): "
                "a near-copy carries no preference signal"})
    max_pairs: int = field(default=0, metadata={"help": "cap on this round's new pairs; 0 = no cap"})
    scorers: list[PairScorerName] = field(default_factory=lambda: ["wer", "sim", "dnsmos"], metadata={
        "help": "ranked_samples: scores computed per sample (rendered audio); unavailable ones are skipped"})
    rank_by: str = field(default="weighted", metadata={
        "help": "ranked_samples: 'weighted' (sum of weights x scores) or 'pareto' (non-dominated fronts on "
                "(WER, SIM), weighted score breaks ties within a front)"})
    weights: dict[str, float] = field(default_factory=lambda: {"wer": -1.0, "sim": 1.0, "dnsmos": 0.25}, metadata={
        "help": "ranked_samples: weight of each score in the weighted score (negative = lower is better)"})
    min_gap: float = field(default=0.05, metadata={
        "help": "ranked_samples: drop a prompt whose best and worst weighted scores differ by less; exact ties "
                "are always dropped"})
    max_chosen_wer: float = field(default=0.5, metadata={
        "help": "ranked_samples: drop a prompt whose best sample's WER is above this: a bad 'chosen' teaches "
                "nothing good"})
    length_band: list[float] = field(default_factory=lambda: [0.5, 2.0], metadata={
        "help": "ranked_samples: drop a prompt whose best sample is shorter or longer than [lo, hi] x the golden "
                "utterance of its text (in frames): a sanity band on what a pair teaches; [0, 1e9] = off"})
    golden_candidate: bool = field(default=False, metadata={
        "help": "ranked_samples: the golden tokens join each prompt's samples as one more candidate, judged like them "
                "(chosen when they judge best; a pair then teaches the golden tokens over the worst sample)"})
    allow_empty: bool = field(default=False, metadata={
        "help": "a round whose every pair is filtered out keeps round k-1's policy (with a warning) instead of "
                "stopping the run: for a judge that finds nothing left to prefer (the positive control once its "
                "defect is gone); false = stop and say which filter dropped them"})
    data: str = field(default="fresh", metadata={
        "help": "fresh: train on this round's pairs only; accumulate: also on the kept pairs of earlier rounds"})
    accumulate_rounds: int = field(default=0, metadata={
        "help": "data=accumulate: how many earlier rounds to add; 0 = all"})

    def __post_init__(self):
        check_choice(self.strategy, PairStrategyName, "pair.strategy")
        for name in self.mixed:
            check_choice(name, PairStrategyName, "pair.mixed[]")
        if "mixed" in self.mixed or (self.strategy == "mixed" and not self.mixed):
            raise ValueError(f"pair.mixed={self.mixed}: list the strategies to pool (not 'mixed' itself)")
        if not 0 <= self.min_distance < 1:
            raise ValueError(f"pair.min_distance={self.min_distance} must be in [0, 1)")
        if self.rank_by not in ("weighted", "pareto"):
            raise ValueError(f"pair.rank_by={self.rank_by!r}: choose 'weighted' or 'pareto'")
        unknown = [s for s in self.scorers if s not in get_args(PairScorerName)]
        if unknown:
            raise ValueError(f"pair.scorers {unknown} unknown; registered scorers: {sorted(get_args(PairScorerName))}")
        if self.min_gap < 0 or self.max_chosen_wer < 0:
            raise ValueError("pair.min_gap and pair.max_chosen_wer must be >= 0")
        band = self.length_band
        if len(band) != 2 or not 0 <= band[0] <= 1 <= band[1]:
            raise ValueError(f"pair.length_band={band}: give [lo, hi] with 0 <= lo <= 1 <= hi, e.g. [0.5, 2.0]")
        if self.data not in ("fresh", "accumulate"):
            raise ValueError(f"pair.data={self.data!r}: choose 'fresh' or 'accumulate'")
        if self.accumulate_rounds < 0:
            raise ValueError(f"pair.accumulate_rounds={self.accumulate_rounds} must be >= 0")


@dataclass
class GRPOStageConfig:
    """RL through trl.GRPOTrainer: group-relative advantages over num_generations samples per prompt."""

    reward: GRPORewardName = field(default="reward_model", metadata={
        "help": "reward_model: a reward model trained on the round's pairs (train.reward); wer: -WER of the "
                "rendered completion; wer_sim: -WER + sim_weight x SIM (ASR + speaker encoder per completion: slow); "
                "pause: 1 for a completion without the pause defect, 0 with it (eval/defects.py; no ASR); "
                "ear: exp(-NLL) of the text's phones under the second ear (eval.ear; no Griffin-Lim, no ASR)"})
    steps: int = field(default=8, metadata={"help": "optimiser steps"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    num_generations: int = field(default=4, metadata={"help": "completions per prompt (the group)"})
    prompts_per_step: int = field(default=2, metadata={
        "help": "prompts per optimiser step, over all processes (each takes its share)"})
    beta: float = field(default=0.04, metadata={
        "help": "KL to round k-1's policy; 0 = no reference model (faster, free to drift)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the completions"})
    top_k: int = field(default=50, metadata={"help": "top-k of the completions; 0 = off"})
    max_completion_frames: int = field(default=0, metadata={
        "help": "longest completion in codec frames; 0 = policy.max_seconds x codec frame rate"})
    loss_type: str = field(default="dapo", metadata={"help": "trl.GRPOConfig loss_type: grpo, dr_grpo, dapo, bnpo, ..."})
    sim_weight: float = field(default=1.0, metadata={"help": "wer_sim: weight of SIM against -WER"})
    pause_weight: float = field(default=0.0, metadata={
        "help": "wer / wer_sim / ear: subtracted from the reward of a completion with the pause defect (eval/defects.py)"})

    def __post_init__(self):
        check_choice(self.reward, GRPORewardName, "train.grpo.reward")
        if self.pause_weight < 0:
            raise ValueError(f"train.grpo.pause_weight={self.pause_weight} must be >= 0 (it is subtracted)")
        if self.num_generations < 2:
            raise ValueError("train.grpo.num_generations must be >= 2 (advantages are relative within a group)")
        if self.steps < 1 or self.prompts_per_step < 1 or self.learning_rate <= 0 or self.beta < 0:
            raise ValueError("train.grpo.steps, prompts_per_step >= 1, learning_rate > 0 and beta >= 0 are required")


@dataclass
class TrainConfig:
    """Which method trains each round's policy (the round's 'dpo' stage), and the non-DPO methods' settings.

    DPO's own settings stay in the ``dpo:`` section; sft_control and coh reuse its steps, learning_rate
    and batch_size so that every method gets the same budget.
    """

    method: MethodName = field(default="dpo", metadata={
        "help": "dpo | sft_control (continue-SFT on golden tokens) | reward_bon (reward model + Best-of-N) | "
                "grpo (RL via trl.GRPOTrainer) | coh (Chain-of-Hindsight)"})
    best_of_n: int = field(default=4, metadata={"help": "reward_bon: samples drawn per returned sample"})
    best_of_n_length_band: list[float] = field(default_factory=lambda: [0.5, 2.0], metadata={
        "help": "reward_bon: only samples whose length is within [lo, hi] x the text's expected length may win "
                "(the closest when none is); [0, 1e9] turns the guard off"})
    validate_every: int = field(default=0, metadata={
        "help": "speak and score a validation subset every N optimiser steps (and at step 0: round k-1's policy) and "
                "keep the best checkpoint as the round's policy (align/validation.py); needs a validation split held "
                "out of dev (corpus.n_val_sentences or data.val); 0 = off, the last step's weights"})
    validate_utterances: int = field(default=40, metadata={
        "help": "validate_every > 0: validation-split utterances spoken at each validation (a fixed seeded subset "
                "of corpus.n_val_sentences' / data.val's, which the dev table never grades)"})
    coh_rejected: bool = field(default=True, metadata={
        "help": "coh: also train on <bad>-hinted rejected sequences (false: only <good>-hinted chosen)"})
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOStageConfig = field(default_factory=GRPOStageConfig)

    def __post_init__(self):
        check_choice(self.method, MethodName, "train.method")
        if self.validate_every < 0 or self.validate_utterances < 1:
            raise ValueError(f"train.validate_every={self.validate_every} must be >= 0 and train.validate_utterances="
                             f"{self.validate_utterances} >= 1")
        if self.best_of_n < 1:
            raise ValueError(f"train.best_of_n={self.best_of_n} must be >= 1")
        band = self.best_of_n_length_band
        if len(band) != 2 or not 0 <= band[0] <= 1 <= band[1]:
            raise ValueError(f"train.best_of_n_length_band={band}: give [lo, hi] with 0 <= lo <= 1 <= hi, "
                             "e.g. [0.5, 2.0]")


@dataclass
class SpeechGPTStageConfig:
    """Budget of one training stage (AdamW, linear warm-up then cosine to 0, as the published scripts)."""

    steps: int = field(default=0, metadata={"help": "optimiser steps; 0 = derive from epochs"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the stage's data when steps == 0"})
    batch_size: int = field(default=8, metadata={"help": "sequences per device per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps of linear warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_length: int = field(default=1024, metadata={
        "help": "stage 1: block size of the packed unit stream; stages 2-3: longest example (truncated)"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps for resuming; 0 = never"})
    log_every: int = field(default=20, metadata={"help": "log the running loss every N steps"})

    def __post_init__(self):
        if self.steps < 0 or self.epochs <= 0:
            raise ValueError(f"steps={self.steps} must be >= 0 and epochs={self.epochs} > 0")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_length < 8:
            raise ValueError("batch_size and grad_accum must be >= 1, max_length >= 8")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or self.save_steps < 0 or self.log_every < 1:
            raise ValueError("lr > 0, 0 <= warmup_ratio < 1, save_steps >= 0 and log_every >= 1 are required")


@dataclass
class SpeechGPTConfig:
    """The SpeechGPT base stage (``base.stage: speechgpt``)."""

    units: Literal["codec_rvq1", "hubert"] = field(default="codec_rvq1", metadata={
        "help": "codec_rvq1: the run codec's first RVQ level (embedded default, rendered by NAR + codec); "
                "hubert: HuBERT layer features + a k-means we fit (needs hubert_path and a unit vocoder to speak)"})
    hubert_path: str | None = field(default=None, metadata={"help": "units=hubert: local HubertModel directory"})
    hubert_layer: int = field(default=11, metadata={"help": "units=hubert: hidden layer to cluster (published: 11)"})
    n_units: int = field(default=1000, metadata={"help": "units=hubert: k-means clusters (published: 1000)"})
    kmeans_max_frames: int = field(default=100_000, metadata={"help": "units=hubert: frames sampled for k-means"})
    dedup: bool = field(default=False, metadata={
        "help": "remove consecutive duplicate units (published for HuBERT units). Off for codec units: the "
                "NAR + codec decoder need one unit per frame to keep durations"})
    size: str = field(default="tiny", metadata={"help": "fresh Llama shape when base_model is null: tiny, small, 7b"})
    base_model: str | None = field(default=None, metadata={
        "help": "local directory of a pretrained causal LM (e.g. LLaMA-7B) to start from; null = fresh model"})
    round0: Literal["stage2", "stage3"] = field(default="stage2", metadata={
        "help": "which model the alignment loop starts from: stage2 (cross-modal SFT) or stage3 (+ CoM LoRA, merged)"})
    # One default for all three (a nested YAML section is built from these defaults, key by key);
    # configs/speechgpt-7b.yaml spells out the published per-stage values.
    stage1: SpeechGPTStageConfig = field(default_factory=SpeechGPTStageConfig, metadata={
        "help": "modality-adaptation pre-training (full LM, packed unit blocks of max_length)"})
    stage2: SpeechGPTStageConfig = field(default_factory=SpeechGPTStageConfig, metadata={
        "help": "cross-modal instruction fine-tuning (full SFT)"})
    stage3: SpeechGPTStageConfig = field(default_factory=SpeechGPTStageConfig, metadata={
        "help": "chain-of-modality instruction fine-tuning (LoRA)"})
    lora_r: int = field(default=8, metadata={"help": "stage 3 LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "stage 3 LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "stage 3 LoRA dropout"})
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": "stage 3 modules LoRA wraps"})
    qa_pairs: int = field(default=64, metadata={
        "help": "stage 3: template question/answer pairs spoken with the corpus voices (x4 modality directions)"})
    nar_size: str = field(default="tiny", metadata={"help": "NAR size (codec units): tiny, base, paper"})
    nar_steps: int = field(default=400, metadata={"help": "NAR optimiser steps (codec units with n_q > 1)"})
    nar_batch_size: int = field(default=16, metadata={"help": "NAR utterances per step"})
    nar_lr: float = field(default=1e-3, metadata={"help": "NAR peak learning rate"})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={
        "help": "accelerate mixed precision (bf16 on GPUs that have it; no on CPU)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory (7B)"})

    def __post_init__(self):
        from models.speechgpt import SPEECHGPT_SIZES

        if self.size not in SPEECHGPT_SIZES:
            raise ValueError(f"base.speechgpt.size={self.size!r} unknown; choose one of {sorted(SPEECHGPT_SIZES)}")
        if self.units == "hubert" and not self.hubert_path:
            raise ValueError("base.speechgpt.units=hubert needs base.speechgpt.hubert_path (a local HuBERT folder)")
        if self.units == "codec_rvq1" and self.dedup:
            raise ValueError("base.speechgpt.dedup=true drops the frame timing the NAR + codec decoder need to speak "
                             "codec units; keep dedup false with units=codec_rvq1")
        if self.lora_r < 1 or self.lora_alpha < 1 or not 0 <= self.lora_dropout < 1 or not self.lora_targets:
            raise ValueError("base.speechgpt: lora_r, lora_alpha >= 1, 0 <= lora_dropout < 1, lora_targets non-empty")
        if self.qa_pairs < 1 or self.n_units < 2 or self.nar_steps < 0 or self.nar_batch_size < 1:
            raise ValueError("base.speechgpt: qa_pairs >= 1, n_units >= 2, nar_steps >= 0, nar_batch_size >= 1")


@dataclass
class SpeechGPTGenConfig:
    """The flow-matching half of the SpeechGPT-Gen base stage (the AR half uses ``base:``)."""

    flow_size: str = field(default="tiny", metadata={
        "help": "flow size: tiny (4 x 128, CPU minutes) or paper (conformer 1024 x 12, 16 heads)"})
    chain: str = field(default="implicit", metadata={
        "help": "implicit: prior N(0,I) + RVQ-1 latent (SpeechGPT-Gen); explicit: RVQ-1 latent as input"})
    steps: int = field(default=600, metadata={"help": "flow optimiser steps"})
    batch_size: int = field(default=16, metadata={"help": "utterances per flow step"})
    lr: float = field(default=1e-3, metadata={"help": "flow peak learning rate (AdamW, cosine, warm-up)"})
    warmup_steps: int = field(default=50, metadata={"help": "flow linear warm-up steps"})
    crop_frames: int = field(default=0, metadata={
        "help": "train on random windows of at most this many frames (0 = whole utterances); the prompt "
                "prefix is drawn inside the window. Cuts CPU cost roughly in proportion"})
    max_prompt_frames: int = field(default=300, metadata={
        "help": "longest random prompt prefix in training (the paper's 300 frames)"})
    cfg_dropout: float = field(default=0.0, metadata={
        "help": "train without the prompt context with this probability (> 0 allows guidance)"})
    solver: str = field(default="midpoint", metadata={"help": "ODE solver when rendering: euler or midpoint"})
    ode_steps: int = field(default=8, metadata={
        "help": "solver steps when rendering (NFE = 2 x steps for midpoint); the paper used 8-16"})
    guidance: float = field(default=0.0, metadata={"help": "classifier-free guidance strength; 0 = off"})

    def __post_init__(self):
        from models.flow import CHAINS, FLOW_SIZES, SOLVERS

        if self.flow_size not in FLOW_SIZES:
            raise ValueError(f"speechgpt_gen.flow_size={self.flow_size!r} unknown; choose one of {sorted(FLOW_SIZES)}")
        if self.chain not in CHAINS:
            raise ValueError(f"speechgpt_gen.chain={self.chain!r}: choose one of {CHAINS}")
        if self.solver not in SOLVERS:
            raise ValueError(f"speechgpt_gen.solver={self.solver!r}: choose one of {SOLVERS}")
        for key in ("steps", "batch_size", "ode_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"speechgpt_gen.{key}={getattr(self, key)} must be >= 1")
        if self.lr <= 0 or self.warmup_steps < 0 or self.max_prompt_frames < 0:
            raise ValueError("speechgpt_gen.lr > 0, warmup_steps >= 0 and max_prompt_frames >= 0 are required")
        if self.crop_frames != 0 and self.crop_frames < 8:
            raise ValueError(f"speechgpt_gen.crop_frames={self.crop_frames}: use 0 (no crop) or >= 8 frames")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"speechgpt_gen.cfg_dropout={self.cfg_dropout} must be in [0, 1)")
        if self.guidance < 0 or (self.guidance > 0 and self.cfg_dropout == 0):
            raise ValueError(f"speechgpt_gen.guidance={self.guidance}: must be >= 0, and > 0 needs cfg_dropout > 0")

    def flow_config(self, latent_dim: int):
        from models.flow import FlowConfig

        return FlowConfig.named(self.flow_size, latent_dim, chain=self.chain, max_prompt_frames=self.max_prompt_frames,
                                cfg_dropout=self.cfg_dropout, solver=self.solver, steps=self.ode_steps,
                                guidance=self.guidance)


@dataclass
class BaseConfig:
    """Round 0: which base stage builds the starting policy (align/base/), and its training budget."""

    stage: BaseStageName = field(default="sft", metadata={
        "help": "base stage: sft (AR + NAR teacher forcing), speechgpt (three-stage unit LM, see speechgpt:) "
                "or speechgpt_gen (AR + flow-matching renderer)"})
    steps: int = field(default=1500, metadata={"help": "AR optimiser steps"})
    batch_size: int = field(default=16, metadata={"help": "AR sequences per step"})
    lr: float = field(default=2e-3, metadata={"help": "AR peak learning rate (AdamW, cosine, warm-up)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    nar_steps: int = field(default=800, metadata={
        "help": "NAR (or phone renderer, policy.renderer) optimiser steps (0 = no NAR; needs codec.n_q == 1)"})
    nar_batch_size: int = field(default=16, metadata={"help": "NAR utterances per step"})
    nar_lr: float = field(default=1e-3, metadata={"help": "NAR peak learning rate"})
    renderer_code_noise: float = field(default=0.0, metadata={
        "help": "phone renderer training: probability that an RVQ-1 code is replaced by a random one, so the "
                "renderer leans on the phones where the AR's codes go wrong (0 = golden codes only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    log_every: int = field(default=100, metadata={"help": "log the running loss every N steps"})
    speechgpt: SpeechGPTConfig = field(default_factory=SpeechGPTConfig, metadata={
        "help": "stage=speechgpt: units, model size, the three stages' budgets, LoRA (align/base/speechgpt.py)"})

    def __post_init__(self):
        check_choice(self.stage, BaseStageName, "base.stage")
        for key in ("steps", "batch_size", "nar_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"base.{key}={getattr(self, key)} must be >= 1")
        if self.nar_steps < 0:
            raise ValueError(f"base.nar_steps={self.nar_steps} must be >= 0")
        if not (self.lr > 0 and self.nar_lr > 0):
            raise ValueError("base.lr and base.nar_lr must be > 0")
        if not 0.0 <= self.renderer_code_noise < 1.0:
            raise ValueError(f"base.renderer_code_noise={self.renderer_code_noise} must be in [0, 1)")


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
        has_val = bool(self.data.val) if self.data.source == "manifests" else self.corpus.n_val_sentences > 0
        if self.train.validate_every and self.rounds > 0 and not has_val:
            raise ValueError("train.validate_every chooses checkpoints on a validation split held out of dev (the dev "
                             "table must not grade its own choice), and this config has none: set "
                             "corpus.n_val_sentences (the embedded corpus, e.g. 10) or data.val (your manifests)")

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
