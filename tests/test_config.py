"""Configs: every shipped YAML loads; unknown keys and bad values fail with the key and the fix."""
import math

import pytest

from align.config import RunConfig, load_config

from .conftest import REPO

# run configs; configs/accelerate/ holds accelerate launch files (tests/test_dryrun.py reads those), configs/studies/
# study files (below)
CONFIGS = sorted(p for p in (REPO / "configs").glob("**/*.yaml") if p.parent.name not in ("accelerate", "studies"))
STUDIES = sorted((REPO / "configs" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.name


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_every_shipped_study_loads_and_every_run_of_it_is_a_valid_config(path):
    """A study's variants are only overrides: each of its runs must load (unknown keys, bad values fail here)."""
    from align.study import load_study, plan

    study = load_study(path)
    specs = plan(study)
    assert {s.variant for s in specs if s.variant} == set(study.variants)
    for spec in specs:
        cfg = load_config(REPO / spec.config, spec.overrides)
        assert cfg.name == spec.name and cfg.eval.split == "dev"


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "ci.yaml"} <= names


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("dpo:\n  betta: 0.1\n")
    with pytest.raises(ValueError, match=r"dpo\.betta.*known keys.*beta"):
        load_config(p)
    p.write_text("rounds: 2\nsurprise: 1\n")
    with pytest.raises(ValueError, match="surprise"):
        load_config(p)


@pytest.mark.parametrize("override, match", [
    ("dpo.beta=-1", "dpo.beta"),
    ("rounds=two", "rounds"),
    ("codec.backend=mp3", "codec.backend"),
    ("policy.size=huge", "policy.size"),
    ("sample.top_p=0", "top_p"),
    ("data.source=manifests", "data.train"),
    ("corpus.voices=[nobody]", "nobody"),
    ("base.renderer_code_noise=1.0", "renderer_code_noise"),
])
def test_bad_values_fail_clearly(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_overrides_and_numeric_strings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dpo:\n  learning_rate: 5e-7\n")  # YAML reads 5e-7 as a string
    cfg = load_config(p, ["dpo.beta=0.3", "corpus.voices=[slt, awb]", "eval.max_utterances=5"])
    assert cfg.dpo.learning_rate == 5e-7 and cfg.dpo.beta == 0.3
    assert cfg.corpus.voices == ["slt", "awb"] and cfg.eval.max_utterances == 5


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(p)


def test_cli_reports_config_errors_without_traceback(tmp_path, caplog):
    from align.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text("nonsense: 1\n")
    assert main(["run", str(p)]) == 2
    assert "nonsense" in caplog.text


def test_resume_accepts_a_config_saved_before_new_options_existed(tmp_path, monkeypatch):
    """A run started before an option was added resumes (the option takes its default); a real change is refused."""
    import yaml

    from align.config import config_to_dict, load_config
    from align.run import RunDir

    cfg = load_config(None, [f"out_dir={tmp_path}", "name=old"])
    saved = config_to_dict(cfg)
    del saved["policy"]["text_frontend"]
    del saved["eval"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(saved))
    RunDir(cfg)  # no error
    # the gate's tolerances judge a finished run and change nothing it computes: they may differ
    RunDir(load_config(None, [f"out_dir={tmp_path}", "name=old", "gate.wer_tolerance=0.3"]))
    # the folder is found through out_dir: another spelling of it (relative to the working directory) is the same run
    monkeypatch.chdir(tmp_path.parent)
    RunDir(load_config(None, [f"out_dir={tmp_path.name}", "name=old"]))
    with pytest.raises(ValueError, match="different config"):
        RunDir(load_config(None, [f"out_dir={tmp_path}", "name=old", "dpo.beta=0.3"]))


def test_registries_match_the_schema_choices():
    """Each Literal choice of the schema names a registered implementation, and every registered one is a choice."""
    from typing import get_args

    from align import config as C
    from align.base import BASE_STAGES, base_stage
    from align.methods import METHODS
    from align.pairs import PAIR_STRATEGIES, SCORERS
    from eval.asr import ASR_BACKENDS
    from eval.quality import QUALITY_MODELS
    from eval.scorers import AsrName, QualityName, SpeakerName
    from eval.speaker import SPEAKER_ENCODERS

    assert set(get_args(C.BaseStageName)) == set(BASE_STAGES)
    assert all(callable(base_stage(name)) for name in BASE_STAGES)
    assert set(get_args(C.PairStrategyName)) == set(PAIR_STRATEGIES)
    assert set(get_args(C.PairScorerName)) == set(SCORERS)
    assert set(get_args(C.MethodName)) == set(METHODS)
    assert set(get_args(AsrName)) == set(ASR_BACKENDS)
    assert set(get_args(SpeakerName)) == set(SPEAKER_ENCODERS)
    assert set(get_args(QualityName)) == set(QUALITY_MODELS) | {"none"}


def test_choice_fields_reject_unknown_names_with_the_choices():
    with pytest.raises(ValueError, match=r"base.stage: 'valle' is not one of \['sft', 'speechgpt', 'speechgpt_gen'\]"):
        load_config(None, ["base.stage=valle"])
    with pytest.raises(ValueError, match="pair.strategy"):
        load_config(None, ["pair.strategy=best"])
    with pytest.raises(ValueError, match="eval.asr"):
        load_config(None, ["eval.asr=kaldi"])


def test_scorers_of_pairing_rewards_and_evaluation_come_from_one_eval_section(tmp_path, monkeypatch):
    """A non-default eval.asr_model / eval.speaker reaches pair ranking, GRPO's direct reward and evaluation."""
    import numpy as np

    import eval.asr
    import eval.speaker
    from align import methods, pairs
    from align.run import Context

    built = []

    class StubASR:
        sample_rate = 16000

        def transcribe(self, wavs):
            return ["hello"] * len(wavs)

    class StubSpeaker:
        sample_rate = 16000

        def similarity(self, wavs, refs):
            return [0.5] * len(wavs)

    monkeypatch.setitem(eval.asr.ASR_BACKENDS, "pocketsphinx",
                        lambda **kw: built.append(("asr", kw)) or StubASR())
    monkeypatch.setitem(eval.speaker.SPEAKER_ENCODERS, "resemblyzer",
                        lambda **kw: built.append(("speaker", kw)) or StubSpeaker())
    cfg = load_config(None, [f"out_dir={tmp_path}", "eval.asr_model=/models/my-pocketsphinx", "device=cpu"])
    ctx = Context(cfg, None)

    class Batch:  # what a pair scorer sees: rendered audio and its rows
        rows = [{"id": "u1", "text": "hello"}]
        wavs = [np.zeros(1600, np.float32)]
        sample_rate = 16000

        def reference_audio(self):
            return [str(tmp_path / "ref.wav")]

    import soundfile as sf

    sf.write(tmp_path / "ref.wav", np.zeros(8000, np.float32), 16000)
    assert pairs.SCORERS["wer"](ctx)(Batch()) == [0.0]           # pair ranking
    assert pairs.SCORERS["sim"](ctx)(Batch()) == [0.5]
    monkeypatch.setattr(pairs, "SampleBatch", lambda ctx, k, rows: Batch())
    reward = methods._direct_reward(ctx, 1, policy=None, kind="wer_sim")  # GRPO's direct reward
    assert reward(["p"], [[1, 2]], [{"utt_id": "u1", "prompt_id": "u0", "text": "hello"}]) == [1.5]  # 1 - WER + SIM
    # reward: ear asks the second ear's NLL (a stub here: a NLL of ln 4 per phone) and nothing of ASR or SIM
    monkeypatch.setitem(pairs.SCORERS, "ear_nll", lambda ctx: lambda batch: [math.log(4.0)] * len(batch.rows))
    reward = methods._direct_reward(ctx, 1, policy=None, kind="ear")
    assert reward(["p"], [[1, 2]], [{"utt_id": "u1", "prompt_id": "u0", "text": "hello"}]) == [pytest.approx(0.25)]
    assert ctx.scorers is ctx.scorers                          # evaluation scores with ctx.scorers too
    # each backend built once, with the configured model, for all three users
    assert built == [("asr", {"model_dir": "/models/my-pocketsphinx"}), ("speaker", {"device": "cpu"})]


def test_unknown_dpo_loss_type_is_refused_before_any_stage_runs(tmp_path):
    """The schema does not import TRL; the loop checks dpo.loss_type against it before round 0."""
    from align.loop import run_loop

    cfg = load_config(None, [f"out_dir={tmp_path}", "dpo.loss_type=magic"])
    with pytest.raises(ValueError, match="dpo.loss_type='magic' is not one the installed TRL offers"):
        run_loop(cfg)
    assert not (tmp_path / cfg.name).exists()  # nothing was written


def test_a_run_with_a_mapping_override_resumes_with_the_same_config(tmp_path):
    """pair.weights is one setting, not a section: a run started with fewer keys than its default resumes (the
    resume check once filled the missing keys in from the default and refused the run as another config)."""
    from align.run import RunDir

    overrides = [f"out_dir={tmp_path}", "name=w", "pair.weights={wer: -1.0, sim: 1.0}"]
    RunDir(load_config(None, overrides))
    RunDir(load_config(None, overrides))  # the same command again: resumes
    with pytest.raises(ValueError, match="different config"):
        RunDir(load_config(None, overrides[:2] + ["pair.weights={wer: -1.0}"]))
