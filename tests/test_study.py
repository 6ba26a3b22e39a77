"""``speechalign study``: a two-variant study on configs/ci.yaml end to end, a crash in one run resumed, the table
with n and the test beside each p, and the test split read once, after the choice."""
import json

import pytest
import yaml

from align import methods
from align.cli import main
from align.study import load_study, plan

from .conftest import REPO


def _study(tmp_path, ci_run, ci_overrides) -> str:
    keep = [o for o in ci_overrides if not o.startswith("out_dir=")]
    data = {"name": "two", "base": str(REPO / "configs" / "ci.yaml"), "seeds": [0], "rounds": 1,
            # what the study machinery needs, not the CI loop's full rounds: fewer samples, steps and detector samples
            "reference": "dpo", "set": keep + ["eval.gap_utterances=0", "eval.probes=0", "eval.defect_samples=1",
                                               "sample.prompts_per_round=16", "sample.n=2", "dpo.steps=2"],
            "round0": {0: str(ci_run / "round_000" / "policy")},
            "variants": {"dpo": [], "control": ["train.method=sft_control"]},
            "out_dir": str(tmp_path / "runs"), "results": str(tmp_path / "results")}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # the variants in this order: dpo runs first
    return str(path)


@pytest.mark.slow  # two CI-config runs (~120 s): CI runs it with -m slow; tests/test_study_stats.py holds the fast
# checks of the table, the seed-level tests and --final's record
def test_a_two_variant_study_runs_resumes_and_reports(ci_run, ci_overrides, tmp_path, monkeypatch, capsys):
    path = _study(tmp_path, ci_run, ci_overrides)
    assert main(["study", path, "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(x.startswith("speechalign run ") and "eval.split=dev" in x for x in lines)

    def killed(ctx, k):
        raise KeyboardInterrupt("killed in the control's training stage")

    monkeypatch.setitem(methods.METHODS, "sft_control", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["study", path])
    runs = {s.variant: s.run_dir(str(tmp_path / "runs")) for s in plan(load_study(path))}
    finished = json.loads((runs["dpo"] / "state.json").read_text())
    monkeypatch.undo()
    # the test split only for finished runs, and --final trains nothing
    assert main(["study", path, "--final", "test", "--variants", "control"]) == 2
    assert "train" not in json.loads((runs["control"] / "state.json").read_text())["done"].get("1", {})
    assert main(["study", path]) == 0
    assert json.loads((runs["dpo"] / "state.json").read_text()) == finished  # read, not run again
    assert "train" in json.loads((runs["control"] / "state.json").read_text())["done"]["1"]
    md = (tmp_path / "results" / "two.md").read_text()
    assert f"speechalign study {path}" in md and "sign-flip" in md
    result = json.loads((tmp_path / "results" / "two.json").read_text())
    assert {(e["run"], e["round"]) for e in result["estimates"]} == {(v, k) for v in ("dpo", "control") for k in (0, 1)}
    vs_ref = [t for t in result["tests"] if t["kind"] == "run"]
    assert vs_ref and all(t["n"] == 8 and t["test"] and t["p_holm"] >= t["p"] for t in result["tests"])  # 4 dev x 2
    assert result["finals"] == []
    assert "One training seed: p says these two runs differ" in (tmp_path / "results" / "two.md").read_text()

    assert main(["study", path, "--final", "test", "--variants", "control"]) == 0
    result = json.loads((tmp_path / "results" / "two.json").read_text())
    [final] = result["finals"]
    assert final["variants"] == ["control"] and final["after"] == result["dev_digest"] and final["forced"] is False
    assert {e["n"] for e in final["estimates"]} == {12}  # the CI test split: 6 sentences x 2 voices
    assert "Reported on test" in (tmp_path / "results" / "two.md").read_text()
    # read once: a second read is refused; with --force it is appended (control's scores come from the cache), marked
    assert main(["study", path, "--final", "test", "--variants", "dpo", "control"]) == 2
    assert main(["study", path, "--final", "test", "--variants", "dpo", "control", "--force"]) == 0
    result = json.loads((tmp_path / "results" / "two.json").read_text())
    reads = [(r["variants"], r["forced"]) for r in result["finals"]]
    assert reads == [(["control"], False), (["dpo", "control"], True)]
    assert "**Forced read**" in (tmp_path / "results" / "two.md").read_text()
    with pytest.raises(ValueError, match="not variants"):
        from align.study import final_evaluation

        final_evaluation(load_study(path), plan(load_study(path)), ["nope"])
