"""SpeechGPT: token formats and templates byte for byte, loss masking, the shared training loop
(resume, LoRA adapters), unit extractors, the ``speechgpt`` policy format, chat, and end to end the
three stages of the shipped tiny config, chat and one alignment round; HuBERT units through the base stage."""
import json
import math
import re

import numpy as np
import pytest
import torch

from align.base.speechgpt import (SFTExample, collate, com_examples, cross_modal_examples, pack_blocks, qa_pairs,
                                  sft_features, train_stage)
from align.config import SpeechGPTConfig, SpeechGPTStageConfig
from models import speechgpt as S

from .conftest import REPO


# ---------------------------------------------------------------------------------------------
# Formats and templates
# ---------------------------------------------------------------------------------------------
def test_token_formats_byte_for_byte():
    assert S.units_str([661, 588, 588]) == "<sosp><661><588><588><eosp>"
    assert S.human_turn("Try to speak out this sentence, please.", "the cat") == \
        "[Human]: Try to speak out this sentence, please. This is input: the cat<eoh>"
    tts = S.example_text(S.TTS_INSTRUCTIONS[0], "the cat", S.units_str([661, 588]))
    assert tts == (S.SYSTEM_PROMPT + "[Human]: Try to speak out this sentence, please. This is input: the cat<eoh> "
                   "[SpeechGPT]: <sosp><661><588><eosp><eoa>")
    assert S.prompt_text(S.TTS_INSTRUCTIONS[0], "the cat").endswith("<eoh> [SpeechGPT]: ")
    assert S.com_response("where is tom", "tom is home", [3, 4]) == \
        "where is tom; [ta] tom is home; [ua] <sosp><3><4><eosp>"
    assert S.com_response("where is tom", "tom is home") == "where is tom; [ta] tom is home"
    assert S.SYSTEM_PROMPT.startswith("You are an AI assistant whose name is SpeechGPT.\n")
    assert S.SYSTEM_PROMPT.endswith("generate cross-modal outputs.\n")
    assert (S.CHAT_TEMPERATURE, S.CHAT_TOP_P, S.CHAT_TOP_K) == (0.7, 0.8, 50)
    assert S.dedup_units(torch.tensor([5, 5, 1, 1, 1, 5])).tolist() == [5, 1, 5]


def test_instruction_phrasings():
    for phrasings in (S.ASR_INSTRUCTIONS, S.TTS_INSTRUCTIONS):
        assert len(phrasings) >= 20 and len(set(phrasings)) == len(phrasings)
        assert all(p.strip() == p and p[-1] in ".?!" for p in phrasings)
    assert set(S.COM_INSTRUCTIONS) == {("speech", "speech"), ("speech", "text"), ("text", "speech"), ("text", "text")}


def test_speechinstruct_examples():
    ex = cross_modal_examples([("The  cat sat", torch.tensor([1, 2]))], seed=0)
    assert [e.kind for e in ex] == ["asr", "tts"] and all(e.prefix == S.SYSTEM_PROMPT for e in ex)
    asr, tts = ex[0].rest, ex[1].rest
    assert asr.startswith("[Human]: ") and asr.endswith("This is input: <sosp><1><2><eosp><eoh> [SpeechGPT]: The cat sat<eoa>")
    assert asr[len("[Human]: "):].split(" This is input:")[0] in S.ASR_INSTRUCTIONS
    assert tts.endswith("This is input: The cat sat<eoh> [SpeechGPT]: <sosp><1><2><eosp><eoa>")
    assert tts[len("[Human]: "):].split(" This is input:")[0] in S.TTS_INSTRUCTIONS
    row = {"question": "where is tom", "answer": "tom is home", "question_units": [7], "answer_units": [8, 9]}
    com = {e.kind: e.rest for e in com_examples([row], seed=0)}
    assert set(com) == {"com:speech->speech", "com:speech->text", "com:text->speech", "com:text->text"}
    assert com["com:speech->speech"].endswith(
        "This is input: <sosp><7><eosp><eoh> [SpeechGPT]: where is tom; [ta] tom is home; [ua] <sosp><8><9><eosp><eoa>")
    assert com["com:text->text"].endswith("This is input: where is tom<eoh> [SpeechGPT]: where is tom; [ta] tom is home<eoa>")
    pairs = qa_pairs(30, seed=0)
    assert len({q for q, _ in pairs}) == 30 and pairs == qa_pairs(30, seed=0)


def test_parse_response():
    r = S.parse_response("where is tom; [ta] tom is home; [ua] <sosp><3><4><eosp><eoa>junk")
    assert (r["transcript"], r["text_answer"], r["units"].tolist()) == ("where is tom", "tom is home", [3, 4])
    assert S.parse_response("<sosp><5><6><eosp><eoa>")["units"].tolist() == [5, 6]
    assert S.parse_response("just text<eoa>")["units"].numel() == 0


def test_tokenizer_one_token_per_format_token_and_unit(tmp_path):
    tok = S.build_tokenizer(16)
    for t in S.FORMAT_TOKENS + ["<0>", "<15>"]:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    text = S.example_text(S.TTS_INSTRUCTIONS[0], "Hi, there!", S.units_str([3, 15, 0]))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    # DPO tokenizes prompt and prompt+completion separately: the first must be a prefix of the second
    prompt, completion = S.tts_prompt(None, "hi there"), S.tts_completion([1, 2])
    assert tok(prompt + completion, add_special_tokens=False)["input_ids"] == \
        tok(prompt, add_special_tokens=False)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]
    assert tok.eos_token == "<eoa>"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)["input_ids"] == ids


def test_loss_is_masked_up_to_the_end_of_the_system_prefix():
    tok = S.build_tokenizer(8)
    ex = SFTExample(S.SYSTEM_PROMPT, S.human_turn("Say it.", "ab") + " [SpeechGPT]: <sosp><1><eosp><eoa>", "tts")
    ids, labels = sft_features(tok, ex, max_length=4096)
    n = len(tok(S.SYSTEM_PROMPT, add_special_tokens=False)["input_ids"])
    assert n == len(S.SYSTEM_PROMPT)  # one token per character
    assert labels[:n] == [-100] * n and labels[n:] == ids[n:] and ids[n] == tok.convert_tokens_to_ids("[Human]")
    # the model's loss equals a hand-computed cross-entropy over the unmasked positions only
    lm = S.build_lm("tiny", len(tok), 1024, seed=0)
    batch = collate([(ids, labels)], tok.pad_token_id)
    with torch.no_grad():
        out = lm(**batch)
        logits = out.logits[0, :-1]
        target = torch.tensor(ids[1:])
        keep = torch.arange(1, len(ids)) >= n
        manual = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # truncation keeps the mask
    ids_t, labels_t = sft_features(tok, ex, max_length=n + 3)
    assert len(ids_t) == n + 3 and labels_t[:n] == [-100] * n


def test_pack_blocks():
    assert pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    # with the <eos> document separator after every sequence
    assert pack_blocks([[1, 2, 3], [4, 5], [6, 7]], 4, sep=0) == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert pack_blocks([[1, 2]], 4) == [[1, 2]]


def test_config_validation():
    from align.config import load_config

    with pytest.raises(ValueError, match="dedup"):
        SpeechGPTConfig(dedup=True)
    with pytest.raises(ValueError, match="hubert_path"):
        SpeechGPTConfig(units="hubert")
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["base.speechgpt.stage2.learning_rate=1"])
    with pytest.raises(ValueError, match="size"):
        load_config(None, ["base.speechgpt.size=huge"])
    for name in ("speechgpt-tiny.yaml", "speechgpt-7b.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.base.stage == "speechgpt"
    big = load_config(REPO / "configs" / "speechgpt-7b.yaml").base.speechgpt
    assert (big.size, big.stage2.lr, big.stage2.warmup_ratio, big.stage2.epochs) == ("7b", 2e-5, 0.03, 3)
    assert (big.lora_r, big.lora_alpha, big.lora_dropout, big.lora_targets) == (8, 16, 0.05, ["q_proj", "v_proj"])


# ---------------------------------------------------------------------------------------------
# The training loop: resume and LoRA
# ---------------------------------------------------------------------------------------------
def _micro_lm(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=tok.pad_token_id))


def _micro_items(tok, n=6):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        units = torch.randint(0, 8, (6 + i % 3,), generator=g)
        ids = tok(S.units_str(units), add_special_tokens=False)["input_ids"]
        out.append((ids, ids))
    return out


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_train_stage_resumes_to_identical_weights(tmp_path, monkeypatch):
    import align.base.speechgpt as SG
    from safetensors.torch import load_file

    tok = S.build_tokenizer(8)
    items = _micro_items(tok)
    scfg = SpeechGPTStageConfig(steps=6, batch_size=2, lr=1e-2, warmup_ratio=0.2, save_steps=2, log_every=1)
    full = train_stage("stage1", _micro_lm(tok), tok, items, scfg, tmp_path / "full", accelerator=_accelerator(), seed=3)
    calls = {"n": 0}
    real = SG.collate

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # inside step 5, after the step-4 checkpoint
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(SG, "collate", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_stage("stage1", _micro_lm(tok), tok, items, scfg, tmp_path / "resumed", accelerator=_accelerator(), seed=3)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    monkeypatch.setattr(SG, "collate", real)
    resumed = train_stage("stage1", _micro_lm(tok), tok, items, scfg, tmp_path / "resumed", accelerator=_accelerator(),
                          seed=3)
    assert resumed["loss"] == pytest.approx(full["loss"], abs=1e-6)
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    # a finished stage is not trained again
    again = train_stage("stage1", _micro_lm(tok), tok, items, scfg, tmp_path / "full", accelerator=_accelerator(), seed=3)
    assert again == json.loads((tmp_path / "full" / "stats.json").read_text())


def test_lora_adapter_saves_loads_and_merges(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = S.build_tokenizer(8)
    base = _micro_lm(tok)
    base.save_pretrained(tmp_path / "base")
    sg = SpeechGPTConfig()

    def lora(m):
        return get_peft_model(m, LoraConfig(r=sg.lora_r, lora_alpha=sg.lora_alpha, lora_dropout=sg.lora_dropout,
                                            target_modules=list(sg.lora_targets), task_type="CAUSAL_LM"))

    scfg = SpeechGPTStageConfig(steps=3, batch_size=2, lr=2e-2, warmup_ratio=0.0, log_every=1)
    train_stage("stage3", base, tok, _micro_items(tok), scfg, tmp_path / "stage3", accelerator=_accelerator(), seed=0,
                lora=lora)
    adapter = json.loads((tmp_path / "stage3" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (8, 16, 0.05)
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    assert (tmp_path / "stage3" / "adapter" / "adapter_model.safetensors").exists()
    x = torch.tensor([_micro_items(tok)[0][0]])
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        base_logits = fresh(x).logits
        peft = PeftModel.from_pretrained(fresh, tmp_path / "stage3" / "adapter").eval()
        peft_logits = peft(x).logits
        merged_saved = AutoModelForCausalLM.from_pretrained(tmp_path / "stage3" / "model").eval()
        merged_logits = merged_saved(x).logits
        merged_now = peft.merge_and_unload()(x).logits
    assert not torch.allclose(base_logits, peft_logits, atol=1e-4)  # the adapter learned something
    assert torch.allclose(peft_logits, merged_logits, atol=1e-4)
    assert torch.allclose(merged_now, merged_logits, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Unit extractors and base models from local folders
# ---------------------------------------------------------------------------------------------
def test_hubert_kmeans_extractor_fits_saves_and_loads(tmp_path):
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    cfg = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    HubertModel(cfg).save_pretrained(tmp_path / "hubert")
    rng = np.random.default_rng(0)
    wavs = [rng.standard_normal(16000).astype(np.float32) * 0.1 for _ in range(2)]
    ext = S.HubertKMeansUnits.fit(str(tmp_path / "hubert"), layer=2, n_units=4, wavs=wavs, seed=0)
    units = ext.units(wavs[0])
    assert ext.frame_rate == 50.0 and units.shape == (49,) and units.max() < 4
    ext.save(tmp_path / "units")
    again = S.load_extractor(tmp_path / "units")
    assert torch.equal(again.units(wavs[0]), units) and again.identity == ext.identity
    with pytest.raises(ValueError, match="local HuBERT"):
        S.HubertKMeansUnits.load_hubert(str(tmp_path / "nowhere"))


def test_base_model_from_a_local_folder_gets_units_and_format_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path / "llm")
    LlamaForCausalLM(LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llm")
    model, tok = S.load_base_lm(str(tmp_path / "llm"), n_units=10)
    assert len(tok) == 3 + 10 + len(S.FORMAT_TOKENS) and model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.eos_token == "<eoa>"
    assert len(tok("<sosp><9><eosp>", add_special_tokens=False)["input_ids"]) == 3
    with pytest.raises(ValueError, match="local transformers model directory"):
        S.load_base_lm(str(tmp_path / "missing"), 10)


# ---------------------------------------------------------------------------------------------
# A tiny SpeechGPT policy (overfitted on two dialogues): the loop's format hook and chat
# ---------------------------------------------------------------------------------------------
TTS_TEXT, TTS_UNITS = "hello there", [1, 2, 3, 4, 5, 6, 7]  # distinct: a tiny model need not count repeats
QA_INSTRUCTION, QA_QUESTION, QA_ANSWER = "Answer in text.", "who are you", "i am tiny"
ASR_ANSWER = "a high tone"  # what the fixture teaches it to hear in heard.wav (its 800 Hz tone)


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    from models.codec import CodecConfig, MelRVQCodec
    from models.codec_lm import Policy
    from models.nar import NARConfig, NARModel

    root = tmp_path_factory.mktemp("sg_policy")
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    wavs = [(0.3 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
            for f in (200, 400, 800)]
    codec = MelRVQCodec.fit(CodecConfig(n_q=2, codebook_size=8, fit_max_frames=400, griffin_lim_iters=4, nnls_iters=0),
                            wavs)
    tok = S.build_tokenizer(codec.codebook_size)
    # A spoken question as a file (what `chat --wav` reads): its RVQ-1 units as read back from disk
    from models.audio import load_audio, save_audio

    save_audio(root / "heard.wav", wavs[2][:8000], 16000)
    heard_units = codec.encode(load_audio(root / "heard.wav", codec.sample_rate))[0]
    # Loss on the answers only (the whole prompt is the masked prefix): the fastest way to make a tiny
    # model answer these three prompts exactly.
    dialogues = [SFTExample(S.prompt_text(S.TTS_INSTRUCTIONS[0], TTS_TEXT), S.tts_completion(TTS_UNITS), "tts"),
                 SFTExample(S.prompt_text(QA_INSTRUCTION, QA_QUESTION), QA_ANSWER + S.EOA, "com"),
                 SFTExample(S.prompt_text(S.ASR_INSTRUCTIONS[0], S.units_str(heard_units)), ASR_ANSWER + S.EOA, "asr")]
    items = [sft_features(tok, e, 1024) for e in dialogues]
    # 160 steps: at 80 the answers were memorised only to the last word in some processes (float sums
    # differ with thread setup and what ran before), so chat tests read "i am" for "i am tiny"
    scfg = SpeechGPTStageConfig(steps=160, batch_size=2, lr=1e-2, warmup_ratio=0.05, log_every=80)
    lm = S.build_lm("tiny", len(tok), 1024, seed=0, pad_token_id=tok.pad_token_id)
    train_stage("stage2", lm, tok, items, scfg, root / "stage2", accelerator=_accelerator(), seed=0)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(root / "stage2" / "model")
    torch.manual_seed(0)
    nar = NARModel(NARConfig(n_q=2, codebook_size=8, dim=32, layers=1, heads=2, ffn=64, max_frames=256))
    voice = codec.encode(wavs[0])[:, :16]
    meta = {"prompt_seconds": 0.25, "max_seconds": 2.0, "frames_per_char": 1.0, "format": "speechgpt",
            "unit_vocoder": "codec", "speechgpt": {"units": "codec_rvq1", "dedup": False, "stage": "stage2",
                                                   "voice_prompt": voice.tolist()}}
    Policy(lm=lm, tokenizer=tok, nar=nar, codec=codec, meta=meta).save(root / "policy")
    return root / "policy"


@pytest.mark.slow  # its fixture trains a tiny SpeechGPT (~45 s, shared with the chat test): CI runs both with -m slow
def test_policy_declares_format_and_generates_units(tiny_policy_dir):
    from models.codec_lm import Policy
    from models.layout import format_of

    fmt = format_of(tiny_policy_dir)
    assert fmt.name == "speechgpt"
    assert fmt.prompt_str(None, "hi  there") == S.prompt_text(S.TTS_INSTRUCTIONS[0], "hi there")
    assert fmt.completion_str([4, 5]) == "<sosp><4><5><eosp><eoa>"
    assert fmt.parse_codes("<sosp><4><5><eosp><7>") .tolist() == [4, 5]
    policy = Policy.load(tiny_policy_dir)
    assert policy.format.name == "speechgpt"
    prompt = policy.codec.encode(np.zeros(8000, dtype=np.float32))
    (greedy,), = policy.generate([TTS_TEXT], [prompt], temperature=0.0)
    assert greedy.tolist() == TTS_UNITS  # the overfitted answer, read back through the format
    out = policy.generate([TTS_TEXT, "some other words"], [prompt, prompt], n=2, temperature=1.0, top_k=50, seed=1)
    assert len(out) == 2 and all(len(s) == 2 for s in out)
    assert all(c.numel() == 0 or (c.min() >= 0 and c.max() < policy.codec.codebook_size) for s in out for c in s)
    assert len(policy.render(greedy, prompt)) > 0


@pytest.mark.slow  # shares the slow fixture above
def test_chat_answers_in_text_and_in_speech(tiny_policy_dir, tmp_path, capsys):
    from models.audio import load_audio
    from align.cli import main
    from models.codec_lm import Policy

    policy = Policy.load(tiny_policy_dir)
    reply = S.chat(policy, text=QA_QUESTION, instruction=QA_INSTRUCTION)
    assert reply.text == QA_ANSWER and reply.wav is None and reply.prompt.startswith(S.SYSTEM_PROMPT)
    out = tmp_path / "reply.wav"
    assert main(["chat", "--policy", str(tiny_policy_dir), "--text", TTS_TEXT, "--instruction", S.TTS_INSTRUCTIONS[0],
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Speech: {len(TTS_UNITS)} units" in printed and out.exists()
    wav = load_audio(out, policy.codec.sample_rate)
    assert len(wav) > 0 and np.isfinite(wav).all()
    assert main(["chat", "--policy", str(tiny_policy_dir), "--text", QA_QUESTION, "--instruction", QA_INSTRUCTION]) == 0
    assert f"Response: {QA_ANSWER}" in capsys.readouterr().out
    # a spoken question goes through the codec's units into the prompt
    spoken = S.chat(policy, wav=np.zeros(8000, dtype=np.float32), speak=False, max_new_tokens=8)
    assert "This is input: <sosp><" in spoken.prompt
    # ... and through the CLI: --wav reads a file, and the answer is the one trained for its units
    heard = tiny_policy_dir.parent / "heard.wav"
    assert main(["chat", "--policy", str(tiny_policy_dir), "--wav", str(heard), "--instruction", S.ASR_INSTRUCTIONS[0],
                 "--max-new-tokens", "32"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"Response: {ASR_ANSWER}"]
    assert main(["chat", "--policy", str(tiny_policy_dir)]) == 2  # neither --text nor --wav: one-line error


# ---------------------------------------------------------------------------------------------
# End to end: configs/speechgpt-tiny.yaml as written, `speechalign base --stage speechgpt`, chat, one round
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~100 s: in `python -m pytest -m slow` (CI runs it); its parts have fast tests above
def test_speechgpt_tiny_config_three_stages_chat_then_one_alignment_round(ci_overrides, tmp_path, capsys):
    """The issue's whole path on the shipped tiny config (about 2 minutes on 2 cores)."""
    from models.audio import load_audio
    from align.cli import main
    from align.config import load_config
    from align.loop import run_loop
    from models.io import read_jsonl
    from models.codec_lm import Policy

    config = REPO / "configs" / "speechgpt-tiny.yaml"
    overrides = ci_overrides  # paths only: the stages' budgets are the config's own
    args = ["base", "--stage", "speechgpt", str(config)] + [x for o in overrides for x in ("--set", o)]
    assert main(args) == 0
    cfg = load_config(config, overrides)
    work = cfg.run_dir / "round_000" / "speechgpt"
    for stage in ("stage1", "stage2", "stage3"):
        assert (work / stage / "model" / "config.json").exists() and not (work / stage / "checkpoint").exists()
    assert (work / "stage3" / "adapter" / "adapter_config.json").exists()
    policy_dir = cfg.run_dir / "round_000" / "policy"
    policy = Policy.load(policy_dir)
    assert policy.meta["format"] == "speechgpt" and policy.meta["speechgpt"]["stage"] == "stage2"

    # chat: text in, speech out (the trained model speaks units, rendered to a WAV) ...
    out = tmp_path / "reply.wav"
    capsys.readouterr()
    assert main(["chat", "--policy", str(policy_dir), "--text", "the red ball is on the table",
                 "--instruction", S.TTS_INSTRUCTIONS[0], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    spoken = re.search(r"^Speech: (\d+) units$", printed, re.M)
    assert spoken and out.exists(), printed
    wav = load_audio(out, policy.codec.sample_rate)
    # the WAV is those units rendered: one codec hop of audio per unit (T units invert to T - 1 hops), not silence
    hop = policy.codec.cfg.hop_length
    assert abs(len(wav) - int(spoken.group(1)) * hop) <= hop and len(wav) > policy.codec.sample_rate // 10
    assert np.isfinite(wav).all() and np.abs(wav).max() > 1e-3
    # ... and speech in, text out: the CLI prints what the policy answers to that file's units (seeded)
    heard = S.chat(policy, wav=wav, instruction=S.ASR_INSTRUCTIONS[0], max_new_tokens=64, speak=False)
    assert S.units_str(policy.codec.encode(wav)[0]) in heard.prompt
    assert main(["chat", "--policy", str(policy_dir), "--wav", str(out), "--instruction", S.ASR_INSTRUCTIONS[0],
                 "--max-new-tokens", "64"]) == 0
    assert f"Response: {heard.text}\n" in capsys.readouterr().out
    assert heard.text and heard.units.numel() == 0  # asked to transcribe, it answers in text, not in units

    run_dir = run_loop(cfg)
    rows = {r["round"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}
    assert sorted(rows) == [0, 1]
    for row in rows.values():
        assert math.isfinite(row["wer"]) and math.isfinite(row["sim"])
    assert rows[1]["pairs"] > 0 and math.isfinite(rows[1]["dpo_loss"])
    pairs = read_jsonl(run_dir / "round_001" / "pairs" / "pairs.jsonl")
    assert pairs[0]["prompt"].startswith(S.SYSTEM_PROMPT) and pairs[0]["prompt"].endswith("[SpeechGPT]: ")
    assert pairs[0]["chosen"].startswith("<sosp>") and pairs[0]["chosen"].endswith("<eosp><eoa>")
    assert Policy.load(run_dir / "round_001" / "policy").meta["format"] == "speechgpt"


def test_hubert_units_through_the_base_stage_and_chat(ci_overrides, tmp_path, capsys):
    """units=hubert: k-means fitted on the run's training audio through a local HubertModel, the three
    stages train on those units, and chat answers a spoken question (HuBERT units in) in text."""
    from transformers import HubertConfig, HubertModel

    from align.cli import main
    from align.config import load_config

    torch.manual_seed(0)
    HubertModel(HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
                ).save_pretrained(tmp_path / "hubert")
    overrides = ci_overrides + [
        "name=sg_hubert", "rounds=0", "base.speechgpt.units=hubert", f"base.speechgpt.hubert_path={tmp_path / 'hubert'}",
        "base.speechgpt.hubert_layer=2", "base.speechgpt.n_units=16", "base.speechgpt.kmeans_max_frames=4000",
        "base.speechgpt.stage1.steps=4", "base.speechgpt.stage2.steps=6", "base.speechgpt.stage3.steps=2",
        "base.speechgpt.qa_pairs=4"]
    config = REPO / "configs" / "speechgpt-tiny.yaml"
    assert main(["base", str(config)] + [x for o in overrides for x in ("--set", o)]) == 0
    cfg = load_config(config, overrides)
    policy_dir = cfg.run_dir / "round_000" / "policy"
    units = json.loads((cfg.run_dir / "round_000" / "speechgpt" / "units" / "units.json").read_text())
    assert units["n_units"] == 16
    tok = __import__("transformers").AutoTokenizer.from_pretrained(policy_dir)
    assert "<15>" in tok.get_vocab() and "<16>" not in tok.get_vocab()
    wav = tmp_path / "question.wav"
    __import__("soundfile").write(wav, np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 16000)
    capsys.readouterr()
    assert main(["chat", "--policy", str(policy_dir), "--wav", str(wav), "--max-new-tokens", "16"]) == 0
    printed = capsys.readouterr().out
    # the question reached the model as the fitted k-means's HuBERT units (not the codec's), and the CLI
    # printed the policy's answer to exactly that prompt
    from models.audio import load_audio
    from models.codec_lm import Policy

    policy = Policy.load(policy_dir)
    extractor = S.load_extractor(policy_dir / "speechgpt_units", codec=policy.codec)
    question = load_audio(wav, extractor.sample_rate)
    units = extractor.units(question)
    assert extractor.kind == S.HubertKMeansUnits.kind and units.numel() > 0 and int(units.max()) < 16
    reply = S.chat(policy, wav=question, extractor=extractor, max_new_tokens=16, speak=False)
    assert f"This is input: {S.units_str(units)}<eoh>" in reply.prompt
    assert f"Response: {reply.text}\n" in printed
