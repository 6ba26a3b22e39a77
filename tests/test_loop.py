"""The CI loop end to end, and resuming a killed run to the same metrics."""
import json
import math

import pytest
import torch

from align.config import load_config
from align.loop import run_loop
from models.io import read_jsonl
from eval.compare import compare_runs

from .conftest import CI_CONFIG


def _rows(run_dir):
    return {r["round"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}


def test_ci_loop_runs_end_to_end(ci_run):
    cfg = load_config(CI_CONFIG)
    rows = _rows(ci_run)
    assert sorted(rows) == list(range(cfg.rounds + 1))
    for k, row in rows.items():
        assert math.isfinite(row["wer"]) and row["wer"] >= 0
        assert math.isfinite(row["sim"]) and -1 <= row["sim"] <= 1
        assert (ci_run / f"round_{k:03d}" / "policy" / "model.safetensors").exists()
        if k > 0:
            assert row["pairs"] > 0 and math.isfinite(row["dpo_loss"])
            assert set(row["seconds"]) == {"sample", "pair", "train", "evaluate"}
    # every round's policy is a plain transformers checkpoint
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ci_run / "round_002" / "policy")
    # per-utterance rows and pairs with their scores are on disk
    eval_rows = read_jsonl(ci_run / "round_001" / "eval" / "rows.jsonl")
    assert {"id", "text", "hypothesis", "wer", "sim", "round"} <= set(eval_rows[0])
    pairs = read_jsonl(ci_run / "round_001" / "pairs" / "pairs.jsonl")
    assert pairs and {"token_distance", "length_ratio"} <= set(pairs[0]["scores"])
    assert pairs[0]["chosen"].endswith("<eos>") and pairs[0]["prompt"].endswith("<speech>")
    df = compare_runs([ci_run])
    assert list(df["round"]) == [0, 1, 2] and {"wer", "sim", "reward_accuracy", "sec_train"} <= set(df.columns)


def test_policy_changes_across_rounds(ci_run):
    from safetensors.torch import load_file

    w0 = load_file(str(ci_run / "round_000" / "policy" / "model.safetensors"))
    w1 = load_file(str(ci_run / "round_001" / "policy" / "model.safetensors"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.slow  # a CI round recomputed in its own cache (~100 s): CI runs it with -m slow; test_kill_resume.py
# and test_batch_resume.py hold the fast resume checks
def test_resume_after_kill_between_stages(ci_run, ci_overrides, tmp_path):
    """Stop after round 1's pair stage, then rerun: round 0-1 metrics equal the uninterrupted run's. The run keeps
    its own stage caches, so what it is compared on was computed again, not read from ci_run's."""
    cfg = load_config(CI_CONFIG, ci_overrides + ["name=ci_resume_stage", "rounds=1",
                                                 f"cache_dir={tmp_path / 'own_cache'}"])
    run_dir = run_loop(cfg, stop_after="1:pair")
    state = json.loads((run_dir / "state.json").read_text())
    assert "pair" in state["done"]["1"] and "train" not in state["done"]["1"]
    run_loop(cfg)
    assert json.loads((run_dir / "round_001" / "samples" / "stats.json").read_text())["cached_tokens"] == 0
    for k in (0, 1):
        assert json.loads((run_dir / f"round_{k:03d}" / "eval" / "summary.json").read_text())["cached_batches"] == 0
    got, want = _rows(run_dir), _rows(ci_run)
    for k in (0, 1):
        for key in ("wer", "sim", "dpo_loss", "reward_margin"):
            if key in want[k]:
                assert got[k][key] == pytest.approx(want[k][key], abs=1e-6), (k, key)


def test_resume_after_kill_inside_dpo(ci_run, ci_overrides, monkeypatch):
    """A crash in DPO's third optimiser step (checkpoint at step 2) resumes from the checkpoint to the same result."""
    import trl

    cfg = load_config(CI_CONFIG, ci_overrides + ["name=ci_resume_dpo", "rounds=1"])
    original = trl.DPOTrainer.training_step
    calls = {"n": 0}
    crash_at = 2 * cfg.dpo.grad_accum + 1  # training_step runs once per micro-batch: the first of step 3's

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt("simulated kill inside DPO")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trl.DPOTrainer, "training_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run_loop(cfg)
    run_dir = cfg.run_dir
    assert list((run_dir / "round_001" / "train" / "trainer").glob("checkpoint-2"))
    assert not (run_dir / "round_001" / "policy").exists()
    monkeypatch.setattr(trl.DPOTrainer, "training_step", original)
    run_loop(cfg)
    got, want = _rows(run_dir), _rows(ci_run)
    for key in ("wer", "sim", "dpo_loss", "reward_margin", "reward_accuracy"):
        assert got[1][key] == pytest.approx(want[1][key], abs=1e-6), key


def test_rerun_with_other_config_is_refused(ci_run, ci_overrides):
    cfg = load_config(CI_CONFIG, ci_overrides + ["dpo.beta=0.5"])
    with pytest.raises(ValueError, match="different config"):
        run_loop(cfg)


def test_eval_command_on_real_recordings(ci_run, real_speech_dir, tmp_path):
    from align.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--policy", str(ci_run / "round_001" / "policy"),
                 "--manifest", str(real_speech_dir / "manifest.jsonl"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 13 and len(result["rows"]) == 13
    assert math.isfinite(result["wer"]) and math.isfinite(result["sim"])


def test_compare_command_writes_tables(ci_run, tmp_path):
    from align.cli import main

    assert main(["compare", str(ci_run), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp.csv").exists()
    header = (tmp_path / "cmp.md").read_text().splitlines()[0].split(" | ")
    assert header[:2] == ["| run", "round"] and {"wer", "sim"} <= set(header)


def test_prepare_command_builds_corpus_without_a_run_dir(ci_run, ci_overrides, caplog):
    from align.cli import main

    args = ["prepare", str(CI_CONFIG)] + [x for o in ci_overrides + ["name=prepare_only"] for x in ("--set", o)]
    assert main(args) == 0
    assert "corpus ready" in caplog.text
    assert not (load_config(CI_CONFIG, ci_overrides + ["name=prepare_only"]).run_dir).exists()


def test_extra_eval_set_in_vctk_layout_is_evaluated_every_round(ci_run, ci_overrides, real_speech_dir, tmp_path):
    """eval.extra_sets: a VCTK-0.92 folder (built from the real recordings) is evaluated beside the test split,
    its rows under round_k/eval/<folder name>/ and its means under metrics.jsonl's 'extra'."""
    import json

    import soundfile as sf

    from align.config import load_config
    from align.loop import run_loop

    root = tmp_path / "VCTK-Corpus-0.92"
    rows = [json.loads(line) for line in (real_speech_dir / "manifest.jsonl").read_text().splitlines()]
    rows = [r for spk in ("spk1", "spk2") for r in [r for r in rows if r["speaker"] == spk][:3]]
    for r in rows:
        spk, n = f"p{r['speaker'][-1]}00", r["id"].split("snt")[-1]
        (root / "txt" / spk).mkdir(parents=True, exist_ok=True)
        (root / "wav48_silence_trimmed" / spk).mkdir(parents=True, exist_ok=True)
        (root / "txt" / spk / f"{spk}_00{n}.txt").write_text(r["text"].capitalize() + ".\n")
        wav, sr = sf.read(real_speech_dir / r["audio"])
        sf.write(root / "wav48_silence_trimmed" / spk / f"{spk}_00{n}_mic1.flac", wav, sr)
    cfg = load_config(CI_CONFIG, ci_overrides + [
        "name=ci_extra_vctk", "rounds=0", f"policy.pretrained={ci_run / 'round_000' / 'policy'}",
        f"eval.extra_sets=[{root}]", "eval.gap_utterances=0", "eval.save_audio=0"])
    run_dir = run_loop(cfg)
    extra = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["extra"]["VCTK-Corpus-0.92"]
    assert extra["n"] == len(rows) and 0 <= extra["sim"] <= 1 and extra["wer"] >= 0
    got = [json.loads(line) for line in (run_dir / "round_000" / "eval" / "VCTK-Corpus-0.92" / "rows.jsonl")
           .read_text().splitlines()]
    assert sorted(g["id"] for g in got) == sorted(f"p{r['speaker'][-1]}00_00{r['id'].split('snt')[-1]}" for r in rows)
    from align.cli import main

    assert main(["compare", str(run_dir), "--out", str(tmp_path / "cmp")]) == 0
    df = __import__("pandas").read_csv(tmp_path / "cmp.csv")
    assert df["n[VCTK-Corpus-0.92]"].tolist() == [len(rows)] and df["wer[VCTK-Corpus-0.92]"].notna().all()


def test_a_run_directory_of_the_old_layout_is_renamed_on_resume(tmp_path):
    """Runs from before the training stage was called 'train' ('dpo' in state.json and round_k/dpo/) resume."""
    from align.run import RunDir
    from models.io import write_json

    cfg = load_config(CI_CONFIG, [f"out_dir={tmp_path}"])
    run = RunDir(cfg)
    write_json(run.state_path, {"done": {"0": {"base": {"seconds": 1}, "evaluate": {"seconds": 1}},
                                         "1": {"sample": {"seconds": 1}, "pair": {"seconds": 1},
                                               "dpo": {"seconds": 2.5}}}})
    (run.round_dir(1) / "dpo").mkdir(parents=True)
    write_json(run.round_dir(1) / "dpo" / "metrics.json", {"summary": {"loss": 0.1}})
    again = RunDir(cfg)
    assert again.done(1, "train") and not again.done(1, "dpo") and again.stage_seconds(1)["train"] == 2.5
    assert (again.train_dir(1) / "metrics.json").is_file() and not (again.round_dir(1) / "dpo").exists()
    # both names at once: written by two code versions; refused with the reason
    write_json(run.state_path, {"done": {"1": {"dpo": {"seconds": 1}, "train": {"seconds": 1}}}})
    with pytest.raises(ValueError, match="both 'dpo' and 'train'"):
        RunDir(cfg)


def test_stage_seeds_do_not_move_when_stages_are_added():
    from align.loop import STAGE_SEED_OFFSETS, stage_seed

    # the values the earlier rule (index in the sorted stage names dpo, evaluate, pair, sample) gave
    assert [stage_seed(0, 1, s) for s in ("train", "evaluate", "pair", "sample")] == [101, 102, 103, 104]
    assert stage_seed(3, 2, "pair") == 3 * 7919 + 2 * 101 + 2 and stage_seed(3, 0, "base") == 3
    assert len(set(STAGE_SEED_OFFSETS.values())) == len(STAGE_SEED_OFFSETS)


def test_a_started_run_encodes_with_its_own_codec_and_refuses_a_policy_of_another(tmp_path):
    """A run resumed where the codec fit differs goes on with the codebooks its policies were trained with; a policy
    trained with another codec is refused with both identities named."""
    from align.run import Context, RunDir
    from models.codec import CodecConfig, MelRVQCodec

    cfg = load_config(CI_CONFIG, [f"out_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "name=resumed"])
    run = RunDir(cfg)
    ours = MelRVQCodec(CodecConfig(n_q=4, codebook_size=64), torch.randn(4, 64, 80, generator=torch.Generator().manual_seed(1)))
    ours.save(run.policy_dir(0) / "codec")
    ctx = Context(cfg, run)
    assert ctx.codec.identity == ours.identity  # read from round 0, not fitted (no corpus was built)
    other = MelRVQCodec(CodecConfig(n_q=4, codebook_size=64), torch.randn(4, 64, 80))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "speechalign.json").write_text(json.dumps({"codec_identity": other.identity}))
    with pytest.raises(ValueError) as e:
        ctx.check_codec(tmp_path / "other")
    assert other.identity in str(e.value) and ours.identity in str(e.value)
    (tmp_path / "other" / "speechalign.json").write_text(json.dumps({"codec_identity": ours.identity}))
    ctx.check_codec(tmp_path / "other")
