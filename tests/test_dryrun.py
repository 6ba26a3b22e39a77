"""``speechalign run --dry-run``: the plan, the missing-file list with fixes, exit status, no weights loaded."""
import pytest
import torch

from align.cli import main
from align.config import load_config
from align.dryrun import build_plan, llama_params, lora_params, nar_params

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read weights fails the test."""
    import safetensors.torch
    import transformers

    import models.codec
    import models.flow
    import models.nar
    import models.renderer

    def boom(*a, **k):
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    # the model modules bind load_file at import: patched there too (and, imported here first, none of them
    # keeps the patched function after the test)
    for module in (models.codec, models.flow, models.nar, models.renderer):
        monkeypatch.setattr(module, "load_file", boom)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(boom))


def test_paper_config_plan_names_every_missing_input(no_weights, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative paths point nowhere here
    code = main(["run", str(REPO_CONFIGS / "speechalign-librispeech.yaml"), "--dry-run", "--gpus", "8",
                 "--gpu-gb", "80"])
    out = capsys.readouterr().out
    assert code == 2
    assert "6.485 B params" in out and "effective batch 128" in out and "50000 samples" in out
    for stage in ("sample", "dpo", "evaluate"):
        assert f"  {stage}" in out
    for missing in ("data.train=data/LibriSpeech/train-960", "SpeechTokenizer.pt", "policy.pretrained=",
                    "eval.asr_model=checkpoints/whisper-large-v3", "eval.speaker_model=", "VCTK-Corpus-0.92"):
        assert missing in out
    assert "huggingface-cli download openai/whisper-large-v3" in out and "no weights were loaded" in out


def test_paper_config_memory_lora_and_gpus():
    cfg = load_config(REPO_CONFIGS / "speechalign-librispeech.yaml")
    one = build_plan(cfg, gpus=1, gpu_gb=80)
    assert any("stage dpo" in what for what, _ in one.problems)  # full 7B DPO does not fit one GPU
    # dpo.batch_size is over all GPUs: on one GPU the paper's 128 pairs per step are 2 x 64 accumulated
    one_gpu = ["dpo.lora=true", "dpo.batch_size=2", "dpo.grad_accum=64"]
    lora = build_plan(load_config(REPO_CONFIGS / "speechalign-librispeech.yaml", one_gpu), gpus=1, gpu_gb=80)
    assert not any("stage dpo" in what for what, _ in lora.problems)
    assert any("effective batch 128" in line for line in lora.lines)
    assert any("LoRA r=64" in line for line in lora.lines)


def test_tiny_config_dry_run_passes(no_weights, capsys, tmp_path):
    import shutil

    if shutil.which("flite") is None:
        pytest.skip("flite not installed")
    code = main(["run", str(REPO_CONFIGS / "tiny.yaml"), "--dry-run", "--set", f"out_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "dry run: OK" in out and "MISSING" not in out
    assert not (tmp_path / "tiny").exists()  # nothing written


def test_parameter_arithmetic_matches_the_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.codec_lm import AR_SIZES
    from models.nar import NARConfig, NARModel

    size = AR_SIZES["tiny"]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=291, tie_word_embeddings=False, **size))
    assert llama_params(vocab_size=291, **size) == sum(p.numel() for p in model.parameters())
    nar = NARConfig.named("tiny", 4, 64)
    assert nar_params(nar.dim, nar.layers, nar.ffn, 4, 64, nar.max_frames) == sum(
        p.numel() for p in NARModel(nar).parameters())
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert lora_params(size, 4, ["q_proj", "v_proj"]) == trainable


def test_speechgpt_7b_plan_is_the_unit_lm_and_its_three_stages(no_weights):
    cfg = load_config(REPO_CONFIGS / "speechgpt-7b.yaml")
    plan = build_plan(cfg, gpus=8, gpu_gb=80)
    text = plan.render()
    # LLaMA-7B shape over 1000 units + format tokens + characters, not the loop's default 'tiny' AR
    assert "SpeechGPT fresh '7b' Llama 32 x 4096" in text and "1000 codec_rvq1 units" in text
    for stage in ("sg-stage1", "sg-stage2", "sg-stage3", "sample", "dpo", "evaluate"):
        assert f"  {stage}" in text, stage
    assert "LoRA r=8" in text
    assert plan.ok and any("base_model is null" in w for w in plan.warnings)
    # one GPU cannot hold full 7B training (~97 GB of weights, grads and AdamW states)
    one = build_plan(cfg, gpus=1, gpu_gb=80)
    assert any("stage sg-stage2" in what for what, _ in one.problems)


def test_speechgpt_base_model_and_hubert_paths_are_checked(no_weights, tmp_path):
    import json

    from transformers import LlamaConfig

    missing = build_plan(load_config(REPO_CONFIGS / "speechgpt-7b.yaml", [
        f"base.speechgpt.base_model={tmp_path / 'nowhere'}", "base.speechgpt.units=hubert",
        f"base.speechgpt.hubert_path={tmp_path / 'nohubert'}"]), gpus=8, gpu_gb=80)
    whats = " ".join(what for what, _ in missing.problems)
    assert "base.speechgpt.base_model=" in whats and "base.speechgpt.hubert_path=" in whats
    assert any("LLaMA-7B" in fix for _, fix in missing.problems)

    # a local folder's config.json (text, not weights) sets the shape and the vocabulary
    folder = tmp_path / "llama"
    LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=500).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 500
    plan = build_plan(load_config(REPO_CONFIGS / "speechgpt-7b.yaml", [f"base.speechgpt.base_model={folder}"]),
                      gpus=1, gpu_gb=80)
    assert plan.ok, plan.render()
    expected = llama_params(96, 192, 3, 4, 2, vocab_size=500 + 1000 + 9)
    assert any(f"Llama 3 x 96" in line and f"{expected / 1e6:.1f} M params" in line for line in plan.lines), \
        plan.render()


def test_a_random_weight_codec_is_a_problem_unless_allowed(no_weights, tmp_path):
    cfg = load_config(REPO_CONFIGS / "tiny.yaml", [f"out_dir={tmp_path}", "codec.backend=encodec"])
    plan = build_plan(cfg)
    assert not plan.ok and any("RANDOM weights" in what for what, _ in plan.problems)
    allowed = build_plan(load_config(REPO_CONFIGS / "tiny.yaml", [f"out_dir={tmp_path}", "codec.backend=encodec",
                                                                   "codec.allow_random_weights=true"]))
    assert not any("RANDOM" in what for what, _ in allowed.problems)
    assert any("RANDOM weights" in w for w in allowed.warnings)


def test_dry_run_names_the_launch_file_for_the_gpus():
    import yaml

    from align.dryrun import LAUNCH_FILES

    paper = REPO_CONFIGS / "speechalign-librispeech.yaml"
    full = build_plan(load_config(paper), gpus=8, gpu_gb=80)
    launch = [line for line in full.lines if line.startswith("Launch:")]
    assert len(launch) == 1 and "configs/accelerate/fsdp.yaml" in launch[0] and "--num_processes 8" in launch[0]
    lora = build_plan(load_config(paper, ["dpo.lora=true"]), gpus=8, gpu_gb=80)
    assert any(line.startswith("Launch: DDP") and "ddp.yaml" in line for line in lora.lines)
    one = build_plan(load_config(paper, ["dpo.lora=true"]), gpus=1, gpu_gb=80)
    assert any(line.startswith("Launch: one process") for line in one.lines)
    # the DPO batch is over all GPUs: 16 pairs do not split over 3
    odd = build_plan(load_config(paper, ["dpo.lora=true"]), gpus=3, gpu_gb=80)
    assert any("does not split over 3 GPUs" in what for what, _ in odd.problems)
    kinds = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}
    for name, path in LAUNCH_FILES.items():
        conf = yaml.safe_load((REPO_CONFIGS.parent / path).read_text())
        assert conf["distributed_type"] == kinds[name]


def _phone_renderer_policy(folder):
    """A tiny policy of the main job's kind: interleaved layout, a phone renderer instead of a NAR, 4-level codec."""
    from models.codec import CodecConfig, MelRVQCodec
    from models.codec_lm import Policy
    from models.layout import build_tokenizer
    from models.renderer import PhoneRenderer, RendererConfig
    from tests.fakes import tiny_lm

    tok = build_tokenizer(16)
    codec = MelRVQCodec(CodecConfig(n_q=4, codebook_size=16, full_levels=4), torch.randn(4, 16, 80))
    renderer = PhoneRenderer(RendererConfig(latent_dim=80, codebook_size=16, dim=16, layers=1, heads=2, ffn=32))
    Policy(tiny_lm(len(tok)), tok, None, codec, {"prompt_seconds": 0.1, "max_seconds": 1.0, "frames_per_char": 1.0,
                                                 "format": "interleaved", "max_frames_per_unit": 5},
           renderer=renderer).save(folder)
    return folder


def test_dry_run_accepts_every_policy_the_run_accepts(no_weights, capsys, tmp_path):
    """A phone-renderer policy has renderer/ and no nar/: the run loads it, so the dry run must accept it; a folder
    the run would refuse (its renderer removed) is named with the run's own reason."""
    import shutil

    if shutil.which("flite") is None:
        pytest.skip("flite not installed")
    from models.codec_lm import policy_dir_problems

    policy = _phone_renderer_policy(tmp_path / "policy")
    assert policy_dir_problems(policy) == []
    args = ["run", str(REPO_CONFIGS / "tiny.yaml"), "--dry-run", "--set", f"out_dir={tmp_path}",
            "--set", f"policy.pretrained={policy}"]
    assert main(args) == 0, capsys.readouterr().out
    shutil.rmtree(policy / "renderer")
    assert main(args) == 2
    assert "renderer/ missing" in capsys.readouterr().out
