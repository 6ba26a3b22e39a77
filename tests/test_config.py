"""Configs: every shipped YAML loads; unknown keys and bad values fail with the key and the fix."""
import pytest

from align.config import RunConfig, load_config

from .conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.name


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
    ("dpo.loss_type=magic", "loss_type"),
    ("rounds=two", "rounds"),
    ("codec.backend=mp3", "codec.backend"),
    ("policy.size=huge", "policy.size"),
    ("sample.top_p=0", "top_p"),
    ("data.source=manifests", "data.train"),
    ("corpus.voices=[nobody]", "nobody"),
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


def test_resume_accepts_a_config_saved_before_new_options_existed(tmp_path):
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
    with pytest.raises(ValueError, match="different config"):
        RunDir(load_config(None, [f"out_dir={tmp_path}", "name=old", "dpo.beta=0.3"]))
