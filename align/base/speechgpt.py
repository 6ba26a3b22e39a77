"""SpeechGPT as a base stage: SpeechInstruct from any ASR corpus, then three training stages.

    units        every training utterance -> speech units (codec RVQ-1, or HuBERT + our k-means)
    stage 1      modality-adaptation pre-training: next-token prediction on <sosp>units<eosp>
                 sequences alone, packed into fixed-length blocks (full LM training)
    stage 2      cross-modal instruction fine-tuning on SpeechInstruct: ASR (speech -> text) and TTS
                 (text -> speech) examples, instruction phrasings drawn per example; loss on
                 everything after the system prompt (full SFT)
    stage 3      chain-of-modality instruction fine-tuning with LoRA (peft): spoken / written
                 questions answered "{transcript}; [ta] {text}; [ua] <sosp>...<eosp>", all four
                 modality directions; Q/A pairs made from templates and spoken with flite
    NAR          RVQ 2..n_q from RVQ-1 + a voice prompt, so codec units can be spoken (embedded default)
    policy       round 0 of the loop: the stage-2 (or stage-3, merged) LM + tokenizer + NAR + codec,
                 sequence format "speechgpt"

Work goes to ``round_000/speechgpt/``: ``stage{1,2,3}/model`` (transformers directories),
``stage3/adapter`` (the peft LoRA adapter), ``nar/``. A stage whose ``model/`` exists is skipped;
an interrupted stage resumes from ``stage*/checkpoint`` (``Accelerator.save_state``: weights,
optimizer and RNG states, step). The training loop runs on ``accelerate.Accelerator``, so the same
code runs on one CPU or under ``accelerate launch`` on several GPUs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from models.codec import prompt_frames
from models.optim import cosine_lr

if TYPE_CHECKING:
    from align.config import SpeechGPTConfig, SpeechGPTStageConfig
    from align.run import Context

log = logging.getLogger("speechalign.speechgpt")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# SpeechInstruct
# ---------------------------------------------------------------------------------------------
@dataclass
class SFTExample:
    """One stage-2/3 example: the prefix whose loss is masked (system prompt) and the rest."""

    prefix: str
    rest: str
    kind: str  # asr | tts | com:<q>-><a>

    @property
    def text(self) -> str:
        return self.prefix + self.rest


def cross_modal_examples(items: list[tuple[str, torch.Tensor]], seed: int) -> list[SFTExample]:
    """One ASR and one TTS example per (transcript, units [T]); phrasings drawn with ``seed``."""
    from models.speechgpt import (ASR_INSTRUCTIONS, EOA, SPEECHGPT, SYSTEM_PROMPT, TTS_INSTRUCTIONS, human_turn,
                                  units_str)

    rng = random.Random(seed)
    out = []
    for text, units in items:
        text = " ".join(text.split())
        u = units_str(units)
        out.append(SFTExample(SYSTEM_PROMPT, f"{human_turn(rng.choice(ASR_INSTRUCTIONS), u)} {SPEECHGPT}: {text}{EOA}",
                              "asr"))
        out.append(SFTExample(SYSTEM_PROMPT, f"{human_turn(rng.choice(TTS_INSTRUCTIONS), text)} {SPEECHGPT}: {u}{EOA}",
                              "tts"))
    return out


def com_examples(qa: list[dict], seed: int) -> list[SFTExample]:
    """Chain-of-modality examples, four modality directions per Q/A pair.

    qa rows: {"question", "answer", "question_units" [T], "answer_units" [T]}.
    """
    from models.speechgpt import (COM_INSTRUCTIONS, EOA, SPEECHGPT, SYSTEM_PROMPT, com_response, human_turn,
                                  units_str)

    rng = random.Random(seed)
    out = []
    for row in qa:
        for q_mod, a_mod in COM_INSTRUCTIONS:
            q_in = units_str(row["question_units"]) if q_mod == "speech" else row["question"]
            resp = com_response(row["question"], row["answer"], row["answer_units"] if a_mod == "speech" else None)
            turn = human_turn(rng.choice(COM_INSTRUCTIONS[(q_mod, a_mod)]), q_in)
            out.append(SFTExample(SYSTEM_PROMPT, f"{turn} {SPEECHGPT}: {resp}{EOA}", f"com:{q_mod}->{a_mod}"))
    return out


def qa_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct (question, answer) pairs from templates over the embedded corpus's vocabulary."""
    from align import corpus as C

    rng = random.Random(f"speechgpt-qa-{seed}")

    def one() -> tuple[str, str]:
        c = rng.choice
        t = rng.randrange(6)
        if t == 0:
            name, place = c(C._NAMES), c(C._PLACES)
            return f"where did {name} go {c(C._PAST_TIMES)}", f"{name} went to the {place}"
        if t == 1:
            thing, colour = c(C._THINGS)[0], c(C._COLOURS)
            return f"what color is the {thing}", f"the {thing} is {colour}"
        if t == 2:
            animals, place, num = c(C._ANIMALS)[1], c(C._PLACES), c(C._NUMBERS)
            return f"how many {animals} are in the {place}", f"there are {num} {animals} in the {place}"
        if t == 3:
            name, thing = c(C._NAMES), c(C._THINGS)[0]
            return f"what did {name} buy", f"{name} bought {C._a(thing)} {thing}"
        if t == 4:
            food, meal, rel = c(C._FOODS), c(C._MEALS), c(C._RELATIVES)
            return f"what did your {rel} make for {meal}", f"my {rel} made {food} for {meal}"
        thing, furniture, prep = c(C._THINGS)[0], c(C._FURNITURE), c(C._PREPOSITIONS)
        return f"where is the {thing}", f"the {thing} is {prep} the {furniture}"

    out, seen = [], set()
    for _ in range(50 * n + 100):
        q, a = one()
        if q not in seen:
            seen.add(q)
            out.append((q, a))
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct question/answer pairs; lower base.speechgpt.qa_pairs")


def speak_qa(pairs: list[tuple[str, str]], voices: list[str], out_dir: Path, sample_rate: int) -> list[dict]:
    """Speak each question (voices in turn) and answer (``voices[0]``: SpeechGPT answers in one voice)
    with flite into ``out_dir``; cached: a finished ``qa.json`` is reused.

    Returns rows {"question", "answer", "question_audio", "answer_audio", "question_voice"}.
    """
    from align.corpus import check_flite, synthesise
    from models.io import atomic_write_text

    manifest = out_dir / "qa.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    exe = check_flite()
    rows = []
    for i, (q, a) in enumerate(pairs):
        qv = voices[i % len(voices)]
        qp, ap = out_dir / f"q{i:04d}_{qv}.wav", out_dir / f"a{i:04d}_{voices[0]}.wav"
        if not qp.is_file():
            synthesise(exe, qv, q, qp, sample_rate, True)
        if not ap.is_file():
            synthesise(exe, voices[0], a, ap, sample_rate, True)
        rows.append({"question": q, "answer": a, "question_audio": str(qp), "answer_audio": str(ap),
                     "question_voice": qv})
    atomic_write_text(manifest, json.dumps(rows, indent=1))
    return rows


# ---------------------------------------------------------------------------------------------
# Tokenised batches
# ---------------------------------------------------------------------------------------------
def sft_features(tokenizer, ex: SFTExample, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are -100 over the system prefix, the ids elsewhere; truncated."""
    prefix = tokenizer(ex.prefix, add_special_tokens=False)["input_ids"]
    ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(prefix), len(ids)) and prefix[n] == ids[n]:  # where the prefix's tokens end in the whole
        n += 1
    ids = ids[:max_length]
    labels = [-100] * min(n, len(ids)) + ids[n:]
    return ids, labels


def pack_blocks(sequences: list[list[int]], block: int, sep: int | None = None) -> list[list[int]]:
    """Concatenate token sequences (each followed by ``sep`` when given: ``<eos>``, the document
    separator) and cut the stream into ``block``-token blocks (stage 1).

    The last partial block is dropped unless the stream is shorter than one block.
    """
    stream = [t for s in sequences for t in (s + [sep] if sep is not None else s)]
    if len(stream) < block:
        return [stream]
    return [stream[i: i + block] for i in range(0, len(stream) - block + 1, block)]


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, labels) pairs -> input_ids, labels, attention_mask: LongTensor [B, L]."""
    L = max(len(i) for i, _ in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    labels = torch.full((len(items), L), -100, dtype=torch.long)
    attn = torch.zeros((len(items), L), dtype=torch.long)
    for b, (i, lab) in enumerate(items):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
        attn[b, : len(i)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


# ---------------------------------------------------------------------------------------------
# One training loop for the three stages
# ---------------------------------------------------------------------------------------------
def _positions(n_items: int, seed: int, start: int, count: int) -> list[int]:
    """Items ``start .. start+count`` of an endless stream of seeded per-epoch shuffles of range(n_items).

    A pure function of its arguments, so a resumed stage draws exactly the batches it would have.
    """
    out = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), n_items)
        perm = list(range(n_items))
        random.Random(f"{seed}-{epoch}").shuffle(perm)
        out += perm[offset: offset + count - len(out)]
    return out


def train_stage(name: str, model, tokenizer, items: list[tuple[list[int], list[int]]], scfg: SpeechGPTStageConfig,
                work: Path, *, accelerator, seed: int, lora: Callable | None = None) -> dict:
    """Train ``model`` on tokenised ``items`` and write ``work/model`` (+ ``work/adapter`` for LoRA).

    items: (input_ids, labels) pairs. ``lora(model) -> peft model`` wraps the model for stage 3.
    Resumes from ``work/checkpoint`` when it exists. Returns stats {steps, loss, history}.
    """
    from tqdm import tqdm

    from models.io import atomic_write_text

    acc = accelerator
    stats_path = work / "stats.json"
    if (work / "model" / "config.json").is_file() and stats_path.is_file():
        log.info("%s: done already (%s)", name, work / "model")
        return json.loads(stats_path.read_text())
    work.mkdir(parents=True, exist_ok=True)
    if lora is not None:
        model = lora(model)
    per_step = scfg.batch_size * scfg.grad_accum * acc.num_processes
    total = scfg.steps or max(1, math.ceil(scfg.epochs * len(items) / per_step))
    warmup = int(round(scfg.warmup_ratio * total))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=scfg.lr, weight_decay=scfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    ckpt, start, history, running = work / "checkpoint", 0, [], 0.0
    if (ckpt / "trainer_state.json").is_file():
        acc.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start, history, running = state["step"], state["history"], state["running"]
        log.info("%s: resuming at step %d from %s", name, start, ckpt)
    pad_id = tokenizer.pad_token_id
    model.train()
    bar = tqdm(range(start, total), desc=name, leave=False, disable=not acc.is_local_main_process)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = scfg.lr * cosine_lr(step, total, warmup, floor=0.0)  # as the published scripts
        step_loss = 0.0
        for micro in range(scfg.grad_accum):
            # this process's slice of micro-batch `micro` of optimiser step `step`
            first = ((step * scfg.grad_accum + micro) * acc.num_processes + acc.process_index) * scfg.batch_size
            batch = collate([items[i] for i in _positions(len(items), seed, first, scfg.batch_size)], pad_id)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = micro == scfg.grad_accum - 1
            with nullcontext() if sync else acc.no_sync(model):
                loss = model(**batch).loss / scfg.grad_accum
                acc.backward(loss)
            step_loss += loss.item()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"{name} loss became {step_loss} at step {step}; lower base.speechgpt.{name}.lr "
                                     "or check the data. Earlier stages and checkpoints are kept.")
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running = step_loss if step == 0 else 0.95 * running + 0.05 * step_loss
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % scfg.log_every == 0 or step + 1 == total:
            log.info("%s step %d/%d loss %.4f", name, step + 1, total, running)
            history.append({"step": step + 1, "loss": running, "last": step_loss})
        if scfg.save_steps and (step + 1) % scfg.save_steps == 0 and step + 1 < total:
            _save_checkpoint(acc, ckpt, {"step": step + 1, "history": history, "running": running})
    model.eval()
    acc.wait_for_everyone()
    stats = {"steps": total, "loss": running, "history": history, "examples": len(items)}
    if acc.is_main_process:
        from models.io import atomic_dir

        net = acc.unwrap_model(model)
        if lora is not None:
            with atomic_dir(work / "adapter") as tmp:
                net.save_pretrained(tmp)  # peft: adapter_config.json + adapter_model.safetensors
            net = net.merge_and_unload()
        with atomic_dir(work / "model") as tmp:
            net.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        atomic_write_text(stats_path, json.dumps(stats, indent=2))
        shutil.rmtree(ckpt, ignore_errors=True)
    acc.wait_for_everyone()
    acc.free_memory()
    return stats


def _save_checkpoint(acc, ckpt: Path, state: dict) -> None:
    """``Accelerator.save_state`` into a temp folder, then swap it in (a kill never leaves half of one)."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if ckpt.exists():
            shutil.rmtree(ckpt)
        tmp.rename(ckpt)
    acc.wait_for_everyone()


def _load_lm(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# The base stage
# ---------------------------------------------------------------------------------------------
def _utterance_units(ctx: "Context", sg: SpeechGPTConfig, work: Path):
    """(unit function: Utterance -> units [T], extractor). Codec units come from the run's golden-code
    cache; HuBERT units from a k-means fitted once on the training audio (saved in ``work/units``)."""
    from models.audio import load_audio
    from models.speechgpt import CodecUnits, HubertKMeansUnits, dedup_units, load_extractor

    if sg.units == "codec_rvq1":
        return (lambda u: ctx.codes(u)[0]), CodecUnits(ctx.codec)
    path = work / "units"
    if (path / "units.json").is_file():
        ext = load_extractor(path)
    else:
        wavs = [load_audio(u.audio, 16000, ctx.cfg.data.max_seconds) for u in ctx.splits.train]
        ext = HubertKMeansUnits.fit(sg.hubert_path, sg.hubert_layer, sg.n_units, wavs,
                                    max_frames=sg.kmeans_max_frames, seed=ctx.cfg.seed)
        from models.io import atomic_dir

        with atomic_dir(path) as tmp:
            ext.save(tmp)

    def units(u):
        x = ext.units(load_audio(u.audio, 16000, ctx.cfg.data.max_seconds))
        return dedup_units(x) if sg.dedup else x

    return units, ext


def speechgpt_base(ctx: "Context", out_dir: Path) -> dict:
    """Train SpeechGPT's three stages on the run's training split; write the round-0 policy to ``out_dir``."""
    from accelerate import Accelerator

    from models.data import Utterance
    from models.speechgpt import EOS, build_lm, build_tokenizer, load_base_lm, units_str

    cfg, sg = ctx.cfg, ctx.cfg.base.speechgpt
    if sg.units == "hubert" and cfg.rounds > 0:
        raise ValueError("the alignment loop renders units through the codec (NAR + decoder); HuBERT units need a "
                         "unit vocoder it does not have. Use base.speechgpt.units=codec_rvq1, or rounds=0 to only "
                         "train SpeechGPT")
    work = out_dir.parent / "speechgpt"
    work.mkdir(parents=True, exist_ok=True)
    _release_accelerate(sg.mixed_precision)
    acc = Accelerator(cpu=ctx.device == "cpu", mixed_precision=sg.mixed_precision)
    unit_fn, extractor = _utterance_units(ctx, sg, work)
    n_units = extractor.n_units
    train = ctx.splits.train
    utt_units = [(u.text, unit_fn(u)) for u in train]

    # -- stage 1: unit language modelling on packed blocks --------------------------------------
    if sg.base_model:
        model, tok = load_base_lm(sg.base_model, n_units)
    else:
        tok = build_tokenizer(n_units)
        model = build_lm(sg.size, len(tok), 4096, cfg.seed, pad_token_id=tok.pad_token_id)
    if sg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    seqs = [tok(units_str(x), add_special_tokens=False)["input_ids"] for _, x in utt_units]
    blocks = [(b, b) for b in pack_blocks(seqs, sg.stage1.max_length, sep=tok.convert_tokens_to_ids(EOS))]
    stats = {"units": extractor.identity, "n_units": n_units, "examples": {"stage1_blocks": len(blocks)}}
    stats["stage1"] = train_stage("stage1", model, tok, blocks, sg.stage1, work / "stage1", accelerator=acc,
                                  seed=cfg.seed + 1)

    # -- stage 2: cross-modal instruction fine-tuning --------------------------------------------
    model, tok = _load_lm(work / "stage1" / "model")
    if sg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ex2 = cross_modal_examples(utt_units, cfg.seed + 2)
    items2 = [sft_features(tok, e, sg.stage2.max_length) for e in ex2]
    stats["examples"]["stage2"] = len(items2)
    stats["stage2"] = train_stage("stage2", model, tok, items2, sg.stage2, work / "stage2", accelerator=acc,
                                  seed=cfg.seed + 2)

    # -- stage 3: chain-of-modality fine-tuning with LoRA ----------------------------------------
    key = hashlib.sha1(json.dumps([sg.qa_pairs, cfg.seed, cfg.corpus.voices, ctx.sample_rate]).encode()).hexdigest()[:12]
    qa_rows = speak_qa(qa_pairs(sg.qa_pairs, cfg.seed), list(cfg.corpus.voices),
                       Path(cfg.cache_dir) / "speechgpt_qa" / key, cfg.corpus.sample_rate)
    qa = []
    for i, r in enumerate(qa_rows):
        q = Utterance(f"qa_q{i}", r["question_audio"], r["question"], r["question_voice"])
        a = Utterance(f"qa_a{i}", r["answer_audio"], r["answer"], cfg.corpus.voices[0])
        qa.append(dict(r, question_units=unit_fn(q).tolist(), answer_units=unit_fn(a).tolist()))
    model, tok = _load_lm(work / "stage2" / "model")
    ex3 = com_examples(qa, cfg.seed + 3)
    items3 = [sft_features(tok, e, sg.stage3.max_length) for e in ex3]
    stats["examples"]["stage3"] = len(items3)

    def lora(m):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(m, LoraConfig(r=sg.lora_r, lora_alpha=sg.lora_alpha, lora_dropout=sg.lora_dropout,
                                            target_modules=list(sg.lora_targets), task_type="CAUSAL_LM"))

    stats["stage3"] = train_stage("stage3", model, tok, items3, sg.stage3, work / "stage3", accelerator=acc,
                                  seed=cfg.seed + 3, lora=lora)

    # -- NAR (codec units) and the round-0 policy ------------------------------------------------
    stats.update(_write_policy(ctx, sg, work, out_dir))
    _reset_accelerate()
    return stats


def _release_accelerate(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state: a trainer that ran earlier in this process (a DPO round,
    another base stage) fixed its precision, and a new ``Accelerator`` with another one would refuse to
    start. Outside a multi-process launch that state is nobody's any more, so let it go."""
    from accelerate.state import AcceleratorState, PartialState

    if not AcceleratorState._shared_state or PartialState().num_processes > 1:
        return
    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision:
        log.info("accelerate state from earlier work in this process (mixed_precision=%s) released for "
                 "mixed_precision=%s", current, mixed_precision)
        _reset_accelerate()


def _reset_accelerate() -> None:
    """Forget this stage's accelerate singletons, so the DPO trainer that follows builds its own."""
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    except (ImportError, AttributeError):  # older accelerate: nothing to reset
        pass


def _write_policy(ctx: "Context", sg: SpeechGPTConfig, work: Path, out_dir: Path) -> dict:
    """Round-0 policy: the chosen stage's LM + tokenizer, a NAR (codec units), the codec, meta."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.training import golden_examples, train_nar
    from models.codec_lm import Policy, policy_meta
    from models.io import atomic_dir
    from models.layout import text_to_tokens
    from models.nar import NARModel

    cfg, codec = ctx.cfg, ctx.codec
    examples = golden_examples(ctx, 0)  # (text, golden codes [n_q, T], prompt codes [n_q, Tp])
    n_prompt = prompt_frames(cfg.policy.prompt_seconds, codec.frame_rate)
    chars = sum(len(text_to_tokens(t).replace(" ", "")) for t, _, _ in examples)
    frames_per_char = sum(c.shape[1] for _, c, _ in examples) / max(1, chars)
    nar, nar_loss = None, None
    if sg.units == "codec_rvq1" and codec.n_q > 1:
        if sg.nar_steps == 0:
            raise ValueError(f"codec.n_q={codec.n_q}: speaking codec units needs a NAR; set base.speechgpt.nar_steps > 0")
        if (work / "nar" / "nar.json").is_file():
            nar = NARModel.load(work / "nar")
        else:
            nar, nar_loss = train_nar(ctx, examples, random.Random(cfg.seed), size=sg.nar_size, steps=sg.nar_steps,
                                      batch_size=sg.nar_batch_size, lr=sg.nar_lr, seed=cfg.seed + 1, kind="vall_e",
                                      name="speechgpt NAR")
            nar = nar.cpu()
            with atomic_dir(work / "nar") as tmp:
                nar.save(tmp)
    stage_dir = work / sg.round0 / "model"
    lm = AutoModelForCausalLM.from_pretrained(stage_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(stage_dir)
    tok.padding_side = "left"
    # A voice for chat: the first training utterance of the answer voice (SpeechGPT speaks in one voice).
    voice = next((u for u in ctx.splits.train if u.speaker == cfg.corpus.voices[0]), ctx.splits.train[0])
    meta = policy_meta(cfg.policy, frames_per_char)
    meta.update(format="speechgpt", unit_vocoder="codec" if sg.units == "codec_rvq1" else "hubert_unit_vocoder",
                speechgpt={"units": sg.units, "dedup": sg.dedup, "stage": sg.round0,
                           "voice_prompt": ctx.codes(voice)[:, :n_prompt].tolist()})
    policy = Policy(lm=lm, tokenizer=tok, nar=nar, codec=codec, meta=meta)
    policy.save(out_dir)
    if sg.units == "hubert":  # chat needs the extractor to hear speech
        shutil.copytree(work / "units", out_dir / "speechgpt_units", dirs_exist_ok=True)
    return {"nar_loss": nar_loss, "frames_per_char": frames_per_char, "round0": sg.round0}
