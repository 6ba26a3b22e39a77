"""SpeechGPT-Gen base stage: both halves trained, resumable between them, one alignment round on
top, and the tts / vc commands."""
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from align.config import load_config
from align.loop import run_loop
from models.io import read_jsonl

from .conftest import REPO

CI_CONFIG = REPO / "configs" / "ci.yaml"
SGG = ["policy.pretrained=null", "base.stage=speechgpt_gen", "base.nar_steps=0", "speechgpt_gen.steps=20", "speechgpt_gen.batch_size=8",
       "speechgpt_gen.ode_steps=2", "speechgpt_gen.crop_frames=96", "rounds=1", "eval.max_utterances=4",
       "eval.gap_utterances=0", "eval.probes=0",
       # a 20-step base babbles: the paper's pairs always exist, pairs judged by the pause detector may not
       "pair.strategy=golden_vs_synthetic", "sample.n=1", "sample.prompts_per_round=16"]


@pytest.fixture(scope="module")
def sgg_run(ci_overrides):
    return run_loop(load_config(CI_CONFIG, ci_overrides + SGG + ["name=ci_sgg"]))


@pytest.mark.slow  # the SpeechGPT-Gen base and a round (~75 s with the next test): CI runs them with -m slow
def test_round_from_the_speechgpt_gen_base(sgg_run):
    rows = {r["round"]: r for r in read_jsonl(sgg_run / "metrics.jsonl")}
    assert sorted(rows) == [0, 1]
    for row in rows.values():
        assert math.isfinite(row["wer"]) and -1 <= row["sim"] <= 1
    assert rows[1]["pairs"] > 0 and math.isfinite(rows[1]["dpo_loss"])
    base = json.loads((sgg_run / "round_000" / "base.json").read_text())
    assert math.isfinite(base["ar_loss"]) and math.isfinite(base["flow_loss"]) and base["chain"] == "implicit"
    assert not (sgg_run / "round_000" / "base_work").exists()
    p0, p1 = sgg_run / "round_000" / "policy", sgg_run / "round_001" / "policy"
    for p in (p0, p1):
        meta = json.loads((p / "speechalign.json").read_text())
        assert meta["renderer"] == "flow" and (p / "flow" / "flow.safetensors").exists() and not (p / "nar").exists()
    # DPO aligns the AR half only: the flow is carried over unchanged, the LM moves
    f0, f1 = load_file(str(p0 / "flow" / "flow.safetensors")), load_file(str(p1 / "flow" / "flow.safetensors"))
    assert all(torch.equal(f0[k], f1[k]) for k in f0)
    w0, w1 = load_file(str(p0 / "model.safetensors")), load_file(str(p1 / "model.safetensors"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert list((sgg_run / "round_001" / "eval" / "audio").glob("*.wav"))


def test_crash_between_halves_resumes_without_retraining_the_ar(ci_overrides, monkeypatch):
    import align.base.speechgpt_gen
    import align.training

    cfg = load_config(CI_CONFIG, ci_overrides + SGG + ["name=ci_sgg_resume", "base.steps=3",
                                                       "speechgpt_gen.steps=3", "speechgpt_gen.crop_frames=64"])
    original = align.base.speechgpt_gen.train_flow

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill while training the flow")

    monkeypatch.setattr(align.base.speechgpt_gen, "train_flow", killed)
    with pytest.raises(KeyboardInterrupt):
        run_loop(cfg, stop_after="0:base")
    work = cfg.run_dir / "round_000" / "base_work"
    assert (work / "ar" / "stats.json").exists() and not (work / "flow").exists()
    assert not (cfg.run_dir / "round_000" / "policy").exists()
    saved_ar = load_file(str(work / "ar" / "model.safetensors"))

    def no_retraining(*args, **kwargs):
        raise AssertionError("the AR half was trained again")

    monkeypatch.setattr(align.base.speechgpt_gen, "train_flow", original)
    monkeypatch.setattr(align.training, "train_ar", no_retraining)  # where the base stage imports it from
    run_loop(cfg, stop_after="0:base")
    policy = cfg.run_dir / "round_000" / "policy"
    got = load_file(str(policy / "model.safetensors"))
    assert all(torch.equal(got[k], saved_ar[k]) for k in saved_ar)  # the AR half is the checkpointed one
    assert json.loads((policy / "speechalign.json").read_text())["renderer"] == "flow"
    assert not work.exists()


def _corpus_wavs(ci_overrides):
    corpus = next(o.split("=", 1)[1] for o in ci_overrides if o.startswith("data.corpus_dir="))
    from pathlib import Path

    wavs = sorted(Path(corpus).rglob("*.wav"))
    assert len(wavs) >= 2
    return wavs


@pytest.mark.slow  # shares the slow SpeechGPT-Gen run above
def test_tts_and_vc_commands_write_wavs(sgg_run, ci_overrides, tmp_path):
    from align.cli import main

    wavs = _corpus_wavs(ci_overrides)
    policy = str(sgg_run / "round_001" / "policy")
    out = tmp_path / "tts.wav"
    assert main(["tts", "--policy", policy, "--text", "the cat sat on the mat", "--prompt", str(wavs[0]),
                 "--out", str(out)]) == 0
    wav, sr = sf.read(out)
    assert sr == 16000 and len(wav) > 0 and np.isfinite(wav).all()
    out = tmp_path / "vc.wav"
    assert main(["vc", "--policy", policy, "--source", str(wavs[1]), "--prompt", str(wavs[0]), "--out", str(out)]) == 0
    wav, sr = sf.read(out)
    src, _ = sf.read(wavs[1])
    assert sr == 16000 and abs(len(wav) - len(src)) <= 2 * 256  # one frame per hop: same length as the source
    assert main(["vc", "--policy", policy, "--source", str(tmp_path / "missing.wav"), "--prompt", str(wavs[0]),
                 "--out", str(tmp_path / "x.wav")]) == 2
