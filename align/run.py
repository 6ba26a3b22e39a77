"""The run directory and the shared context every stage reads.

    runs/<name>/config.yaml  state.json  metrics.jsonl  log.txt  skipped.jsonl
    runs/<name>/round_000/policy/ eval/                 # the base stage's model and its baseline
    runs/<name>/round_001/samples/ pairs/ train/ eval/ policy/

Every path a stage reads or writes is a ``RunDir`` method (``samples_dir(k)``, ``train_dir(k)`` ...).

``state.json`` records which (round, stage) pairs are done, written atomically after each stage,
so a killed run resumes at the first unfinished stage. Stages write into temp folders and rename,
so a half-written stage leaves nothing a resume could mistake for output.

Under ``accelerate launch`` (align/dist.py) rank 0 alone writes the run's files (config, state, log); the
other ranks read them after a barrier, so no two processes race on one file or folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import yaml

from align.config import RunConfig, config_to_dict
from align.dist import Ranks, process_ranks
from models.data import Skip, Utterance, choose_prompt, load_any
from models.io import atomic_dir, atomic_write_text, write_json, write_jsonl
from models.rundir import RunLayout
from models.codec import Codec, build_codec, codec_sample_rate, load_codec

log = logging.getLogger("speechalign")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use device=cpu or auto")
    return device


class RunDir(RunLayout):
    """One run directory: its paths (``RunLayout``), its config, ``state.json`` and log."""

    def __init__(self, cfg: RunConfig, ranks: Ranks | None = None):
        super().__init__(cfg.run_dir)
        self.cfg = cfg
        self.ranks = ranks or process_ranks()
        if self.ranks.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self._check_config()
            self._attach_log()
            self._migrate()
        self.ranks.barrier()
        if not self.ranks.is_main:
            self._check_config()  # reads the config rank 0 wrote: every rank runs the same experiment

    def _migrate(self) -> None:
        """Bring a run directory of older code up to date, or refuse it with the reason.

        The round's training stage was called ``dpo`` (state key and ``round_k/dpo/``) before it ran every
        ``train.method``; such a run's stage and folders are renamed to ``train`` once, atomically per folder.
        """
        state = self.state()
        renamed = False
        for k, stages in state["done"].items():
            if LEGACY_TRAIN_STAGE in stages:
                if "train" in stages:
                    raise ValueError(f"{self.state_path} marks both 'dpo' and 'train' done in round {k}; it was written "
                                     "by two code versions at once. Move the run aside and start it again")
                stages["train"] = stages.pop(LEGACY_TRAIN_STAGE)
                renamed = True
        for folder in sorted(self.root.glob("round_[0-9]*")):
            old, new = folder / LEGACY_TRAIN_STAGE, folder / self.train_dir(0).name
            if old.is_dir() and not new.exists():
                old.rename(new)
                renamed = True
        if renamed:
            write_json(self.state_path, state)
            log.info("%s: renamed the training stage 'dpo' -> 'train' (state.json and round_k/dpo/)", self.root)

    def _check_config(self) -> None:
        """Resume only with the same config: a different one would mix two experiments in one folder."""
        path = self.root / "config.yaml"
        current = config_to_dict(self.cfg)
        if path.exists():
            # Keys added to the config since the run started take their defaults, so a code update that
            # adds an option does not strand existing runs.
            saved = _with_defaults(yaml.safe_load(path.read_text()), config_to_dict(RunConfig()), RunConfig)
            # gate.* only judges a finished run against a baseline (it changes nothing the run computes), so a
            # tolerance chosen after the runs were made (benchmarks/gate_power.py) does not strand them; out_dir is
            # how this folder was found, so however it was spelt (relative to another working directory, or
            # absolute) it named this folder
            ignored = {"gate": None, "out_dir": None}
            diff = _diff({**saved, **ignored}, {**current, **ignored})
            if diff:
                raise ValueError(
                    f"{self.root} holds a run with a different config ({', '.join(diff[:6])}); resume with the same "
                    f"config, or start a new run with --set name=<new name>")
        else:
            atomic_write_text(path, yaml.safe_dump(current, sort_keys=False))

    def _attach_log(self) -> None:
        logger = logging.getLogger("speechalign")
        target = str((self.root / "log.txt").resolve())
        if not any(getattr(h, "baseFilename", None) == target for h in logger.handlers):
            handler = logging.FileHandler(target)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)

    # -- state -----------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def state(self) -> dict:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"done": {}}

    def done(self, k: int, stage: str) -> bool:
        return stage in self.state()["done"].get(str(k), {})

    def mark_done(self, k: int, stage: str, seconds: float) -> None:
        """Record a finished stage (rank 0 writes; every rank returns once the state says so)."""
        self.ranks.barrier()  # every rank has finished the stage's work
        if self.ranks.is_main:
            state = self.state()
            state["done"].setdefault(str(k), {})[stage] = {"seconds": round(seconds, 2), "finished": time.time()}
            write_json(self.state_path, state)
        self.ranks.barrier()

    def stage_seconds(self, k: int) -> dict[str, float]:
        return {s: v["seconds"] for s, v in self.state()["done"].get(str(k), {}).items()}


# The training stage's name (state.json key and round folder) before it ran every train.method.
LEGACY_TRAIN_STAGE = "dpo"


def _with_defaults(saved, defaults, section=None):
    """The saved config with the keys added to the schema since it was written, at their defaults. Only sections
    (dataclasses) are filled in key by key: a mapping-valued setting (``pair.weights``) is the saved one as it is."""
    import dataclasses
    import typing

    if not isinstance(saved, dict) or not isinstance(defaults, dict) or section is None:
        return saved
    hints = typing.get_type_hints(section)
    sub = {f.name: hints[f.name] if dataclasses.is_dataclass(hints.get(f.name)) else None
           for f in dataclasses.fields(section)}
    out = {k: _with_defaults(saved[k], defaults.get(k), sub.get(k)) for k in saved}
    out.update({k: v for k, v in defaults.items() if k not in saved})
    return out


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


# ---------------------------------------------------------------------------------------------
@dataclass
class Splits:
    train: list[Utterance]
    dev: list[Utterance]
    test: list[Utterance]
    skipped: list[Skip] = field(default_factory=list)
    # checkpoint choice's split (train.validate_every), held out of the dev table; empty when there is none
    val: list[Utterance] = field(default_factory=list)


class Context:
    """What every stage needs: config, run directory, data splits, codec and cached golden tokens.

    Everything is built lazily and at most once, so a resumed run pays only for what it uses.
    """

    def __init__(self, cfg: RunConfig, run: RunDir | None):
        # run=None: data and codec only (``speechalign prepare``), no run directory is created.
        self.cfg = cfg
        self.run = run
        self.ranks = run.ranks if run is not None else process_ranks()
        self.device = self.ranks.device(resolve_device(cfg.device))
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)

    # -- data ------------------------------------------------------------------------------------
    @cached_property
    def splits(self) -> Splits:
        cfg = self.cfg
        if cfg.data.source == "embedded":
            from align.corpus import prepare_corpus

            tag = hashlib.sha1(json.dumps(cfg.corpus.identity(), sort_keys=True).encode()).hexdigest()[:10]
            paths = prepare_corpus(cfg.corpus, Path(cfg.data.corpus_dir) / f"flite-{tag}")
            sources = {"train": paths["train"], "dev": paths["dev"], "test": paths["test"], "val": paths.get("val")}
        else:
            sources = {"train": cfg.data.train, "dev": cfg.data.dev, "test": cfg.data.test, "val": cfg.data.val}
        out, skipped = {}, []
        for split, src in sources.items():
            if src is None:
                out[split] = []
                continue
            utts, skips = load_any(src)
            keep = []
            for u in utts:
                if u.duration is not None and u.duration > cfg.data.max_seconds:
                    skips.append(Skip(u.id, f"{u.duration:.1f} s > data.max_seconds={cfg.data.max_seconds}"))
                else:
                    keep.append(u)
            out[split] = keep
            skipped += [Skip(s.id, f"{split}: {s.reason}") for s in skips]
        if cfg.data.max_train_utterances:
            rng = random.Random(cfg.seed)
            train = sorted(out["train"], key=lambda u: u.id)
            rng.shuffle(train)
            out["train"] = sorted(train[: cfg.data.max_train_utterances], key=lambda u: u.id)
        where = "the log"
        if skipped:
            if self.run is not None:
                where = str(self.run.root / "skipped.jsonl")
                if self.ranks.is_main:
                    write_jsonl(self.run.root / "skipped.jsonl", [s.__dict__ for s in skipped])
            log.warning("%d utterances skipped (see %s): %s", len(skipped), where,
                        "; ".join(f"{s.id}: {s.reason}" for s in skipped[:5]))
        for split in ("train", "test"):
            if not out[split]:
                raise ValueError(f"the {split} split is empty after skipping bad rows; see {where}")
        return Splits(out["train"], out["dev"], out["test"], skipped, out["val"])

    def prompt_for(self, utt: Utterance, pool: list[Utterance], salt: int = 0, min_seconds: float = 0.0) -> Utterance:
        """A different utterance of the same speaker as the voice prompt (deterministic); see choose_prompt."""
        return choose_prompt(utt, pool, self.cfg.seed + salt, min_seconds=min_seconds)

    # -- judges ----------------------------------------------------------------------------------
    @cached_property
    def scorers(self):
        """The ``eval:`` section's judges (built on first use): evaluation, pair ranking and GRPO's direct
        reward all score with these, so training and evaluation agree on what is better."""
        from eval.scorers import build_scorers

        return build_scorers(self.cfg.eval, self.device)

    # -- codec -----------------------------------------------------------------------------------
    @cached_property
    def codec(self) -> Codec:
        """The run's codec: a started run's own (its round-0 policy's ``codec/``), ``policy.pretrained``'s, or one
        fitted once per (codec config, training audio) and cached in cache_dir.

        A run resumed on another machine, whose fit of the same config can differ (k-means on another CPU), so goes
        on with the codebooks its policies were trained on instead of pairing their tokens with another codebook's.
        """
        cfg = self.cfg
        own = self.run.policy_dir(0) / "codec" if self.run is not None else None
        if own is not None and (own / "codec.json").is_file():
            return load_codec(own)
        if cfg.policy.pretrained:
            return load_codec(Path(cfg.policy.pretrained) / "codec")
        codec_cfg = config_to_dict(cfg)["codec"]
        codec_cfg.pop("allow_random_weights")  # a permission, not part of what is fitted
        key = hashlib.sha1(json.dumps({"codec": codec_cfg,
                                       "train": [u.audio for u in self.splits.train]}).encode()).hexdigest()[:16]
        path = Path(cfg.cache_dir) / "codecs" / key
        if (path / "codec.json").exists():
            return load_codec(path)
        fit_wavs = None
        if cfg.codec.backend == "mel_rvq":
            from tqdm import tqdm

            fit_wavs = [self.load_wav(u) for u in tqdm(self.splits.train, desc="codec fit audio", leave=False)]
        log.info("fitting/building the %s codec (cached in %s)", cfg.codec.backend, path)
        codec = build_codec(cfg.codec, fit_wavs)
        with atomic_dir(path, keep_existing=True) as tmp:  # another process may have built it meanwhile
            codec.save(tmp)
        return codec

    def load_wav(self, utt: Utterance) -> np.ndarray:
        """An utterance's audio, mono float32 at the codec's rate."""
        from models.audio import load_audio

        return load_audio(utt.audio, self.sample_rate, self.cfg.data.max_seconds)

    @property
    def sample_rate(self) -> int:
        """The codec's sample rate, known from the config before the codec exists (it is fitted on audio
        loaded at this rate)."""
        if "codec" in self.__dict__:  # built (or loaded from a pretrained policy): ask it
            return self.codec.sample_rate
        return codec_sample_rate(self.cfg.codec)

    def store(self, kind: str, policy_dir: Path, what: dict):
        """A stage's finished batches (``models.io.BatchStore``) in a cache folder named by everything they depend on:
        the policy directory's files, the code that computes them and the library versions (``models.digest``), and
        ``what`` (the items with their texts and prompt codes, the settings, the seeds). So a killed stage resumes at
        its first unfinished batch, the same policy run again on the same items with the same settings (a study's
        variants at round 0 and in round 1's sampling and judging) reads the batches instead of computing them, and
        code that would compute something else (a changed sampler, renderer or ASR wrapper) never reads them.
        ``meta.json`` in the folder says what it was keyed on (``speechalign cache`` lists and prunes entries)."""
        from models.digest import code_digest, dir_digest
        from models.io import BatchStore

        policy, code = dir_digest(policy_dir), code_digest()
        h = hashlib.sha1(kind.encode())
        h.update(policy.encode())
        h.update(code.encode())
        h.update(json.dumps(what, sort_keys=True, default=str).encode())
        store = BatchStore(Path(self.cfg.cache_dir) / kind / h.hexdigest()[:20])
        store.meta = {"kind": kind, "policy_dir": str(policy_dir), "policy_digest": policy, "code_digest": code,
                      "run": str(self.run.root) if self.run is not None else None}
        return store

    def prompt_digest(self, utts: list[Utterance]) -> str:
        """sha1 of the voice-prompt codes of ``utts`` (what the policy is conditioned on), for cache keys: the same
        utterance id in another corpus or manifest speaks other audio."""
        h = hashlib.sha1()
        for u in utts:
            h.update(self.codes(u).numpy().astype(np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()

    def check_codec(self, policy_dir: Path) -> None:
        """Refuse a policy trained with another codec than the one this run encodes golden tokens with (their tokens
        would index another codebook), naming both."""
        from models.codec_lm import read_meta

        theirs = read_meta(policy_dir).get("codec_identity")
        if theirs is not None and theirs != self.codec.identity:
            raise ValueError(f"{policy_dir} was trained with codec {theirs}, but this run encodes with "
                             f"{self.codec.identity}: golden and policy tokens would come from different codebooks. "
                             "Run it with the codec it was trained with (start it from that policy, "
                             "policy.pretrained=<dir>), or train a new run")

    def golden_stream(self, utt: Utterance, fmt) -> torch.LongTensor:
        """The golden speech of ``utt`` in a sequence format's stream: RVQ-1 codes [T], or for the interleaved
        layout each text unit's marker before its frames [T + units] (from the audio's phone alignment)."""
        from models.layout import interleave
        from models.phones import alignment_path, frame_units, read_alignment

        first = self.codes(utt)[0]
        if fmt.units is None:
            return first
        segments = read_alignment(utt.audio)
        if segments is None:
            raise ValueError(f"{utt.id}: the interleaved layout needs a phone alignment of {utt.audio} "
                             f"({alignment_path(utt.audio)} is missing); the embedded corpus writes them, for your "
                             "own data run `speechalign align <manifest>` (pocketsphinx, offline) or use "
                             "policy.layout=plain")
        units = fmt.units(utt.text)
        try:
            return interleave(first, frame_units(segments, units, len(first), self.codec.frame_rate), units)
        except ValueError as e:
            raise ValueError(f"{utt.id}: cannot align its {len(units)} text units to {len(first)} frames: {e}") from e

    def codes(self, utt: Utterance) -> torch.LongTensor:
        """Golden codes of an utterance: LongTensor [n_q, T], encoded once per (codec, audio file)."""
        from models.digest import code_digest

        codec = self.codec
        st = os.stat(utt.audio)
        key = hashlib.sha1(f"{os.path.abspath(utt.audio)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        # the codec's weights (identity) and the code that loads and encodes audio (models/: codec, audio)
        path = (Path(self.cfg.cache_dir) / "codes" / f"{codec.identity}-{code_digest(packages=('models',))}"
                / key[:2] / f"{key}.npy")
        if path.exists():
            return torch.from_numpy(np.load(path).astype(np.int64))
        codes = codec.encode(self.load_wav(utt))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
        np.save(tmp, codes.numpy().astype(np.int16 if codec.codebook_size < 32768 else np.int32))
        os.replace(tmp, path)
        return codes
