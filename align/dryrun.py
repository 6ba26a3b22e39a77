"""``speechalign run CONFIG --dry-run``: check a config and print its plan without loading any weights.

What it checks and estimates:

* every path the run will read (datasets, codec files, a pretrained policy, ASR / speaker / UTMOS
  models) exists, or for a hub id, is in the Hugging Face cache; each missing one is listed with
  the fix;
* the parameter count of the AR policy (LlamaForCausalLM arithmetic from the named size) and of
  the NAR model, the sequence length, and the tokens each round samples and trains on;
* GPU memory per stage: weights, gradients, AdamW states and activations (rough: the 34 s b h
  bytes per layer of Korthikanti et al. 2022, no recomputation), the frozen reference model in DPO,
  LoRA (frozen base, no reference copy: TRL disables the adapters instead), and the evaluation
  models; compared with the GPU memory (``--gpu-gb``, else the visible GPU, else 80 GB) after
  sharding weights/grads/states over ``--gpus`` (ZeRO-3 / FSDP through ``accelerate launch``).

Exit status: 0 when the plan can run (warnings are printed but do not fail it), 2 when something
is missing or a stage does not fit: a dry run is a gate before a multi-GPU job, so it must fail
loudly on what would fail an hour into the real run.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from align.config import RunConfig
from models.codec import prompt_frames

GB = 1024 ** 3


@dataclass
class Plan:
    """What a dry run found: plan lines (printed), problems (blocking, each with its fix) and warnings."""

    lines: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def missing(self, what: str, fix: str) -> None:
        self.problems.append((what, fix))

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        out = list(self.lines)
        if self.warnings:
            out += ["", "Warnings:"] + [f"  - {w}" for w in self.warnings]
        if self.problems:
            out += ["", f"MISSING / BLOCKING ({len(self.problems)}):"]
            out += [f"  - {what}\n      fix: {fix}" for what, fix in self.problems]
        out += ["", "dry run: OK (no weights were loaded)" if self.ok else
                f"dry run: {len(self.problems)} problem(s); the run would fail (no weights were loaded)"]
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------
def llama_params(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                 num_key_value_heads: int, vocab_size: int, tie: bool = False) -> int:
    """Parameters of a LlamaForCausalLM: embeddings + per layer (q,k,v,o + gated MLP + 2 RMSNorms) +
    final norm + LM head (untied, as build_lm makes it)."""
    h, kv = hidden_size, hidden_size // num_attention_heads * num_key_value_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * intermediate_size + 2 * h
    return vocab_size * h * (1 if tie else 2) + num_hidden_layers * per_layer + h


def nar_params(dim: int, layers: int, ffn: int, n_q: int, codebook_size: int, max_frames: int = 2048, **_) -> int:
    """Parameters of models.nar.NARModel (pre-norm nn.TransformerEncoder layers with biases)."""
    per_layer = 4 * dim * dim + 4 * dim + 2 * dim * ffn + ffn + dim + 4 * dim
    embeds = n_q * codebook_size * dim + n_q * dim + 2 * dim + max_frames * dim
    return embeds + layers * per_layer + 2 * dim + (n_q - 1) * (dim * codebook_size + codebook_size)


def _nar_count(nar_size: str, n_q: int, codebook_size: int) -> int:
    """``nar_params`` of the named NAR size for this codec shape."""
    from models.nar import NARConfig

    c = NARConfig.named(nar_size, n_q, codebook_size)
    return nar_params(c.dim, c.layers, c.ffn, n_q, codebook_size, c.max_frames)


def lora_params(size: dict, r: int, targets: list[str]) -> int:
    """Trainable LoRA parameters: r * (in + out) per wrapped Linear per layer."""
    h, i = size["hidden_size"], size["intermediate_size"]
    kv = h // size["num_attention_heads"] * size["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return size["num_hidden_layers"] * sum(r * sum(shapes[t]) for t in targets if t in shapes)


def activation_bytes(size: dict, batch: int, seq: int, bytes_per: int = 2) -> int:
    """Training activations of a Llama stack without recomputation: about 34 s b h bytes per layer in
    16-bit (attention scores excluded: fused attention does not store them), scaled for 4-byte floats."""
    return int(size["num_hidden_layers"] * 34 * seq * batch * size["hidden_size"] * bytes_per / 2)


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def _count(n: float) -> str:
    """A parameter count as people say it: '6.485 B', '1.3 M'."""
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


# ---------------------------------------------------------------------------------------------
# Path checks
# ---------------------------------------------------------------------------------------------
def _hf_cached(repo_id: str, filename: str = "config.json") -> bool:
    """True if ``repo_id``'s ``filename`` is in the Hugging Face cache (a look-up, no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # an id that is not a valid repo name is simply not cached
        return False


def _check_model(plan: Plan, key: str, model: str, kind: str, needs: str, allow_download: bool, hub_id: str) -> None:
    """A model named by a local folder or a hub id; ``hub_id`` is the release to fetch when it is missing."""
    p = Path(model).expanduser()
    if p.exists():
        if not (p / needs).is_file():
            plan.missing(f"{key}={model}: folder lacks {needs}", f"copy the whole {kind} model folder there")
        return
    if kind == "ECAPA" or not _hf_cached(model, needs):
        if allow_download and kind != "ECAPA":
            plan.warnings.append(f"{key}={model} is not cached; it will be downloaded (eval.allow_download=true)")
            return
        plan.missing(f"{key}={model}: not a local folder{'' if kind == 'ECAPA' else ' and not in the HF cache'}",
                     f"on a machine with network: huggingface-cli download {hub_id} --local-dir DIR; copy DIR "
                     f"here as {model} (or set {key}=DIR)")


def _check_data(plan: Plan, cfg: RunConfig) -> dict:
    """Data sources exist; returns {split: number of utterances} for those it could read."""
    counts = {}
    if cfg.data.source == "embedded":
        n = cfg.corpus.n_sentences * len(cfg.corpus.voices)
        plan.lines.append(f"  data: embedded flite corpus, {cfg.corpus.n_sentences} sentences x "
                          f"{len(cfg.corpus.voices)} voices (~{n} utterances)")
        if shutil.which("flite") is None:
            plan.missing("the flite binary (the embedded corpus is spoken by it)", "apt-get install flite "
                         "(scripts/setup.sh does it)")
        return {"train": n}
    from models.data import load_any

    for split in ("train", "dev", "test"):
        src = getattr(cfg.data, split)
        if src is None:
            continue
        if not Path(src).expanduser().exists():
            plan.missing(f"data.{split}={src} does not exist",
                         "download LibriSpeech (openslr.org/12: train-clean-100/360, train-other-500, dev-clean, "
                         "test-clean) or VCTK and point data.* at the folder, or at a JSONL/CSV manifest")
            continue
        try:
            utts, skips = load_any(src)  # reads transcripts and file names, not audio
        except ValueError as e:
            plan.missing(f"data.{split}={src} cannot be read: {e}", "fix the folder layout or use a manifest")
            continue
        counts[split] = len(utts)
        plan.lines.append(f"  data.{split}: {src}: {len(utts)} utterances ({len(skips)} skipped), "
                          f"{len({u.speaker for u in utts})} speakers")
    return counts


def _random_weights_problem(plan: Plan, c) -> None:
    """codec.checkpoint unset: a problem (exit 2) unless the config allows random weights on purpose."""
    if c.allow_random_weights:
        plan.warnings.append(f"codec.checkpoint is unset: {c.backend} runs with RANDOM weights "
                             "(codec.allow_random_weights=true); its figures mean nothing")
    else:
        plan.missing(f"codec.checkpoint is unset: {c.backend} would run with RANDOM weights",
                     "set codec.checkpoint to the released weights (or codec.allow_random_weights=true for a test)")


def _check_codec(plan: Plan, cfg: RunConfig) -> tuple[float, int, int]:
    """Codec files exist; returns (frame_rate, n_q, codebook_size) from the config / config.json."""
    import json

    c = cfg.codec
    if c.backend == "mel_rvq":
        plan.lines.append(f"  codec: mel_rvq (embedded, fitted on the training audio) {c.n_q} x {c.codebook_size} "
                          f"at {c.sample_rate / c.hop_length:g} Hz")
        return c.sample_rate / c.hop_length, c.n_q, c.codebook_size
    if c.backend == "encodec":
        from models.codec import ENCODEC_24KHZ_FILE, encodec_checkpoint_path

        n_q = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}[c.bandwidth]
        plan.lines.append(f"  codec: encodec_24khz at {c.bandwidth:g} kbps: {n_q} x 1024 at 75 Hz")
        if c.checkpoint is None:
            _random_weights_problem(plan, c)
        else:
            try:
                path = encodec_checkpoint_path(c.checkpoint)
                if not Path(path).is_file():
                    plan.missing(f"codec.checkpoint={path} does not exist",
                                 f"copy {ENCODEC_24KHZ_FILE} (from a machine's torch hub cache) there")
            except ValueError as e:
                plan.missing("codec.checkpoint=hub: not in the torch hub cache", str(e))
        return 75.0, n_q, 1024
    # speechtokenizer
    frame_rate, n_q, size = 50.0, 8, 1024  # the released model, when its config.json is not here yet
    if c.config_path and Path(c.config_path).is_file():
        st = json.loads(Path(c.config_path).read_text())
        hop = 1
        for s in st.get("strides", [320]):
            hop *= s
        frame_rate, n_q, size = st.get("sample_rate", 16000) / hop, st.get("n_q", 8), st.get("codebook_size", 1024)
    else:
        plan.missing(f"codec.config_path={c.config_path} (SpeechTokenizer config.json) does not exist",
                     "download fnlp/SpeechTokenizer's speechtokenizer_hubert_avg/config.json and "
                     "SpeechTokenizer.pt on a machine with network; copy both there")
    if c.checkpoint is None:
        _random_weights_problem(plan, c)
    elif not Path(c.checkpoint).is_file():
        plan.missing(f"codec.checkpoint={c.checkpoint} (SpeechTokenizer weights) does not exist",
                     "copy speechtokenizer_hubert_avg/SpeechTokenizer.pt from fnlp/SpeechTokenizer there")
    plan.lines.append(f"  codec: speechtokenizer {n_q} x {size} at {frame_rate:g} Hz (RVQ-1 semantic -> AR, "
                      f"RVQ 2..{n_q} -> NAR)")
    return frame_rate, n_q, size


# ---------------------------------------------------------------------------------------------
def build_plan(cfg: RunConfig, gpus: int = 1, gpu_gb: float | None = None) -> Plan:
    """Check ``cfg`` and estimate its cost; nothing is loaded or written."""
    from models.codec_lm import AR_SIZES
    from models.layout import build_tokenizer

    plan = Plan()
    if gpu_gb is None:
        gpu_gb = _visible_gpu_gb() or 80.0
    plan.lines.append(f"Plan for run '{cfg.name}' -> {cfg.run_dir} ({cfg.rounds} rounds after round 0), "
                      f"{gpus} GPU(s) x {gpu_gb:g} GB")
    plan.lines.append("Inputs:")
    counts = _check_data(plan, cfg)
    frame_rate, n_q, codebook_size = _check_codec(plan, cfg)

    # -- policy -----------------------------------------------------------------------------------
    n_prompt_frames = prompt_frames(cfg.policy.prompt_seconds, frame_rate)
    speech_frames = int(round(cfg.policy.max_seconds * frame_rate))
    text_tokens = int(cfg.policy.max_seconds * 16)  # ~16 characters per second of read speech, '|' included
    if cfg.base.stage == "speechgpt":
        size, vocab, ar, nar, overhead = _speechgpt_shape(plan, cfg, n_q, codebook_size)
        n_prompt_frames = 0  # SpeechGPT's TTS instruction carries no voice prompt
    else:
        size = AR_SIZES[cfg.policy.size]
        vocab = len(build_tokenizer(codebook_size))  # the policy's own vocabulary: specials, text, phones, codes
        ar = llama_params(vocab_size=vocab, **size)
        overhead = 4
        if cfg.policy.renderer == "phones":
            import torch

            from models.renderer import PhoneRenderer, RendererConfig

            with torch.device("meta"):  # (latent width 128: the embedded codec's mels, EnCodec's latent)
                nar = sum(p.numel() for p in PhoneRenderer(RendererConfig.named(
                    cfg.policy.renderer_size, 128, codebook_size)).parameters())
            renderer = f"phone renderer '{cfg.policy.renderer_size}' = {nar / 1e6:.1f} M"
        else:
            nar = _nar_count(cfg.policy.nar_size, n_q, codebook_size)
            renderer = f"NAR '{cfg.policy.nar_size}' = {nar / 1e6:.1f} M"
        if cfg.policy.layout == "interleaved":
            overhead += int(cfg.policy.max_seconds * 14)  # one unit token per phone, ~14 phones per second
        plan.lines.append(f"  policy: AR '{cfg.policy.size}' Llama {size['num_hidden_layers']} x "
                          f"{size['hidden_size']} = {_count(ar)} params (vocab {vocab}); {renderer}")
    seq = min(n_prompt_frames + text_tokens + speech_frames + overhead, cfg.dpo.max_length)
    plan.lines.append(f"  sequence: <= {n_prompt_frames} prompt + ~{text_tokens} text + {speech_frames} speech tokens "
                      f"(+{overhead} format) -> {seq} (dpo.max_length {cfg.dpo.max_length})")
    if n_prompt_frames + text_tokens + speech_frames + overhead > cfg.dpo.max_length:
        plan.warnings.append(f"the longest sequence (~{n_prompt_frames + text_tokens + speech_frames + overhead} "
                             f"tokens) exceeds dpo.max_length={cfg.dpo.max_length}: long pairs are truncated in DPO")
    if cfg.policy.pretrained:
        from models.codec_lm import policy_dir_problems

        p = Path(cfg.policy.pretrained)
        problems = policy_dir_problems(p)  # the run's own check (Policy.load), without loading weights
        if problems:
            plan.missing(f"policy.pretrained={p}: not a policy directory the run can load ({'; '.join(problems)})",
                         "put the base policy there (a round's policy/ folder from a run with policy.pretrained="
                         "null, which trains round 0 from data), or set policy.pretrained=null")

    # -- memory per stage -----------------------------------------------------------------------------
    gpu = gpu_gb * GB
    half = 2  # bf16/fp16 weights on GPU
    plan.lines.append("GPU memory per stage (per GPU; weights/grads/AdamW states sharded over the GPUs):")

    needs: dict[str, tuple[float, float]] = {}  # stage -> (shardable bytes, per-GPU bytes)

    def stage(name: str, total_sharded: float, per_gpu: float, detail: str):
        needs[name] = (total_sharded, per_gpu)
        need = total_sharded / gpus + per_gpu
        fits = need <= 0.9 * gpu  # 10% for the CUDA context and fragmentation
        plan.lines.append(f"  {name:<9} {_gb(need):>9}  {'fits' if fits else 'DOES NOT FIT'}  ({detail})")
        if not fits:
            plan.missing(f"stage {name} needs ~{_gb(need)} per GPU, more than 90% of {gpu_gb:g} GB",
                         "use more GPUs (accelerate launch --num_processes N, ZeRO-3/FSDP), dpo.lora=true, "
                         "a smaller dpo.batch_size with more dpo.grad_accum, or a smaller policy.size")

    if not cfg.policy.pretrained and cfg.base.stage == "speechgpt":
        _speechgpt_stages(cfg, size, ar, nar, stage)
    elif not cfg.policy.pretrained:
        b = cfg.base.batch_size
        # mixed precision AdamW: 16-bit weights + grads, fp32 master + 2 moments = 16 bytes per parameter
        stage("base", 16 * (ar + nar), activation_bytes(size, b, seq),
              f"AR+NAR {16 * (ar + nar) / GB:.1f} GB weights+grads+AdamW, activations for batch {b} x {seq}")
    kv = size["hidden_size"] // size["num_attention_heads"] * size["num_key_value_heads"]
    kv_cache = 2 * size["num_hidden_layers"] * cfg.sample.batch_size * cfg.sample.n * seq * kv * half
    stage("sample", half * (ar + nar), kv_cache,
          f"16-bit weights, KV cache {_gb(kv_cache)} for {cfg.sample.batch_size} x {cfg.sample.n} sequences")
    d = cfg.dpo
    d_per_gpu = max(1, -(-d.batch_size // gpus))  # dpo.batch_size is over all GPUs
    if d.batch_size % gpus:
        plan.missing(f"dpo.batch_size={d.batch_size} does not split over {gpus} GPUs",
                     f"use a multiple of {gpus} (the batch is shared by the processes)")
    acts = activation_bytes(size, 2 * d_per_gpu, seq)  # chosen and rejected go through together
    if d.lora:
        trainable = lora_params(size, d.lora_r, list(d.lora_targets))
        stage("dpo", half * ar + 16 * trainable, acts,
              f"LoRA r={d.lora_r}: {trainable / 1e6:.1f} M trainable; frozen base doubles as the reference "
              f"(adapters off); activations for 2 x {d_per_gpu} x {seq}")
    else:
        stage("dpo", 16 * ar + half * ar, acts,
              f"policy weights+grads+AdamW {_gb(16 * ar)}, frozen reference {_gb(half * ar)}, "
              f"activations for 2 x {d_per_gpu} x {seq}")
    e = cfg.eval
    asr_params = {"whisper": 1.55e9, "pocketsphinx": 0}[e.asr] if e.asr in ("whisper", "pocketsphinx") else 0
    spk_params = {"ecapa": 20.8e6, "wavlm": 94.7e6, "resemblyzer": 1.4e6}.get(e.speaker, 0)
    stage("evaluate", half * (ar + nar) + half * (asr_params + spk_params), 2 * size["num_hidden_layers"] *
          e.batch_size * seq * kv * half,
          f"policy + {e.asr}{' (1.55 B, whisper-large-v3 size)' if e.asr == 'whisper' else ''} + {e.speaker} "
          "in 16-bit, KV cache")

    _launch_plan(plan, cfg, needs, gpus, gpu)

    # -- tokens per round -----------------------------------------------------------------------------
    n_train = counts.get("train")
    prompts = cfg.sample.prompts_per_round or n_train or 0
    if n_train is not None and cfg.sample.prompts_per_round and cfg.sample.prompts_per_round > n_train:
        plan.warnings.append(f"sample.prompts_per_round={cfg.sample.prompts_per_round} > {n_train} training "
                             "utterances: every round samples them all")
        prompts = n_train
    samples = prompts * cfg.sample.n
    pairs = min(samples, cfg.pair.max_pairs) if cfg.pair.max_pairs else samples
    seen = d.steps * d.batch_size * d.grad_accum
    plan.lines.append("Per round:")
    plan.lines.append(f"  sample: {prompts} prompts x {cfg.sample.n} = {samples} samples, <= "
                      f"{samples * speech_frames / 1e6:.2f} M generated tokens")
    plan.lines.append(f"  dpo: <= {pairs} pairs; {d.steps} steps x batch {d.batch_size} ({d_per_gpu} per GPU on "
                      f"{gpus}) x accum {d.grad_accum} = effective batch {d.batch_size * d.grad_accum}, {seen} pairs seen "
                      f"({seen / max(pairs, 1):.1f} epochs), <= {2 * seen * seq / 1e6:.1f} M tokens")
    plan.lines.append(f"  evaluate: {e.max_utterances or counts.get('test', '?')} test utterances; "
                      f"{e.asr} + {e.speaker} + {e.quality}" +
                      (f"; extra sets {', '.join(e.extra_sets)}" if getattr(e, "extra_sets", None) else ""))
    if pairs and seen / pairs > 20:
        plan.warnings.append(f"DPO sees each pair ~{seen / pairs:.0f} times per round: risk of overfitting")

    # -- evaluation models ------------------------------------------------------------------------------
    if e.asr == "whisper":
        _check_model(plan, "eval.asr_model", e.asr_model or "openai/whisper-large-v3", "Whisper", "config.json",
                     e.allow_download, "openai/whisper-large-v3")
    if e.speaker == "wavlm":
        _check_model(plan, "eval.speaker_model", e.speaker_model or "microsoft/wavlm-base-plus-sv", "WavLM",
                     "config.json", e.allow_download, "microsoft/wavlm-base-plus-sv")
    if e.speaker == "ecapa":
        _check_model(plan, "eval.speaker_model", e.speaker_model or "speechbrain/spkrec-ecapa-voxceleb", "ECAPA",
                     "hyperparams.yaml", e.allow_download, "speechbrain/spkrec-ecapa-voxceleb")
    if e.quality == "utmos" and not Path(e.utmos_checkpoint or "").is_file():
        plan.missing(f"eval.utmos_checkpoint={e.utmos_checkpoint} does not exist",
                     "export UTMOS to TorchScript (see eval/quality.py) and put the file there")
    for path in getattr(e, "extra_sets", None) or []:
        if not Path(path).expanduser().exists():
            plan.missing(f"eval.extra_sets: {path} does not exist",
                         "download VCTK 0.92 (datashare.ed.ac.uk) and point the entry at its folder")
    if e.quality.startswith("dnsmos"):
        try:
            import onnxruntime  # noqa: F401
            import speechmos  # noqa: F401
        except ImportError as err:
            plan.missing(f"eval.quality={e.quality} needs speechmos + onnxruntime ({err})", "pip install speechmos "
                         "onnxruntime (setup.cfg lists them)")
    return plan


# ---------------------------------------------------------------------------------------------
# SpeechGPT base (base.stage=speechgpt): the policy is the unit LM its three stages train
# ---------------------------------------------------------------------------------------------
def _speechgpt_shape(plan: Plan, cfg: RunConfig, n_q: int, codebook_size: int) -> tuple[dict, int, int, int, int]:
    """(Llama shape, vocab, LM params, NAR params, format tokens per sequence) of the SpeechGPT policy.

    The shape comes from ``base_model``'s config.json when that folder exists (a text file, not
    weights), else from the named ``size``. A missing ``base_model`` / ``hubert_path`` is blocking;
    a 7B trained from scratch (``base_model: null``) is a warning, since the published recipe
    starts from LLaMA-7B.
    """
    import json

    from models.speechgpt import FORMAT_TOKENS, SPEECHGPT_SIZES, TTS_INSTRUCTIONS, build_tokenizer

    sg = cfg.base.speechgpt
    n_units = codebook_size if sg.units == "codec_rvq1" else sg.n_units
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    size, vocab, source = dict(SPEECHGPT_SIZES[sg.size]), len(build_tokenizer(n_units)), f"fresh '{sg.size}'"
    if sg.base_model:
        conf = Path(sg.base_model).expanduser() / "config.json"
        if conf.is_file():
            c = json.loads(conf.read_text())
            size = {k: c.get(k, c.get("num_attention_heads") if k == "num_key_value_heads" else None) for k in keys}
            if any(v is None for v in size.values()):
                plan.missing(f"base.speechgpt.base_model={sg.base_model}: config.json is not a Llama-style config "
                             f"(needs {', '.join(keys)})", "point base_model at a LLaMA-family transformers folder")
                size = dict(SPEECHGPT_SIZES[sg.size])
            vocab = int(c.get("vocab_size", 32000)) + n_units + len(FORMAT_TOKENS)
            source = f"pretrained {sg.base_model}"
        else:
            plan.missing(f"base.speechgpt.base_model={sg.base_model}: no config.json there (a transformers "
                         "causal-LM folder is needed)", "copy a LOCAL LLaMA-7B in transformers format there "
                         "(e.g. huggingface-cli download huggyllama/llama-7b --local-dir DIR on a machine with "
                         "network), or set base.speechgpt.base_model=null to train a fresh model")
    elif sg.size == "7b":
        plan.warnings.append("base.speechgpt.base_model is null: a fresh 7B Llama is trained from random weights "
                             "(the published recipe starts from LLaMA-7B: set base.speechgpt.base_model to a local "
                             "LLaMA-7B folder)")
    if sg.units == "hubert":
        if not sg.hubert_path or not (Path(sg.hubert_path).expanduser() / "config.json").is_file():
            plan.missing(f"base.speechgpt.hubert_path={sg.hubert_path}: not a HubertModel folder",
                         "copy a local mHuBERT/HuBERT transformers folder there (e.g. facebook/hubert-base-ls960), "
                         "or use base.speechgpt.units=codec_rvq1")
        plan.warnings.append("base.speechgpt.units=hubert: speech answers need a unit vocoder registered in "
                             "models.speechgpt.UNIT_VOCODERS; the alignment rounds render codec units only")
    ar = llama_params(vocab_size=vocab, **size)
    nar = _nar_count(sg.nar_size, n_q, codebook_size) if sg.units == "codec_rvq1" and n_q > 1 else 0
    # '[Human]: <instruction> This is input: ' ... '<eoh> [SpeechGPT]: <sosp>' ... '<eosp><eoa>', one char a token
    overhead = max(len(t) for t in TTS_INSTRUCTIONS) + 40  # one token a character: a bound for subwords too
    plan.lines.append(f"  policy: SpeechGPT {source} Llama {size['num_hidden_layers']} x {size['hidden_size']} = "
                      f"{_count(ar)} params (vocab {vocab}: {n_units} {sg.units} units); unit renderer NAR "
                      f"'{sg.nar_size}' = {nar / 1e6:.1f} M; round 0 = {sg.round0}")
    return size, vocab, ar, nar, overhead


def _speechgpt_stages(cfg: RunConfig, size: dict, lm: int, nar: int, stage) -> None:
    """Memory of SpeechGPT's three training stages, through ``stage(name, sharded, per_gpu, detail)``."""
    sg = cfg.base.speechgpt
    act_bytes = 2 if sg.mixed_precision != "no" else 4

    def acts(st) -> int:
        full = activation_bytes(size, st.batch_size, st.max_length, act_bytes)
        # checkpointing keeps each layer's input (s b h) and recomputes the rest in the backward pass
        return full // 17 if sg.gradient_checkpointing else full

    for name, st in (("stage1", sg.stage1), ("stage2", sg.stage2)):
        stage(f"sg-{name}", 16 * lm, acts(st), f"full LM {_gb(16 * lm)} weights+grads+AdamW, activations for "
              f"{st.batch_size} x {st.max_length}{' (checkpointed)' if sg.gradient_checkpointing else ''}")
    trainable = lora_params(size, sg.lora_r, list(sg.lora_targets))
    stage("sg-stage3", 2 * lm + 16 * trainable, acts(sg.stage3),
          f"frozen 16-bit LM + LoRA r={sg.lora_r} ({trainable / 1e6:.1f} M trainable), activations for "
          f"{sg.stage3.batch_size} x {sg.stage3.max_length}")
    if nar:
        stage("sg-nar", 16 * nar, 0, f"unit renderer NAR {nar / 1e6:.1f} M")


# accelerate launch files in configs/accelerate/, from the least to the most sharding
LAUNCH_FILES = {"ddp": "configs/accelerate/ddp.yaml", "fsdp": "configs/accelerate/fsdp.yaml",
                "zero3": "configs/accelerate/zero3.yaml"}


def _launch_plan(plan: Plan, cfg: RunConfig, needs: dict[str, tuple[float, float]], gpus: int, gpu: float) -> None:
    """Name the launch for ``gpus``: one process; DDP when every stage fits whole on each GPU; else FSDP full
    shard (or DeepSpeed ZeRO-3, the same sharding), with the per-GPU memory of the largest stage."""
    if not needs:
        return
    whole = max(sharded + per for sharded, per in needs.values())
    split = max(sharded / gpus + per for sharded, per in needs.values())
    if gpus == 1:
        plan.lines.append(f"Launch: one process (speechalign run CONFIG), ~{_gb(whole)} on the GPU at most")
        return
    command = f"accelerate launch --config_file {{}} --num_processes {gpus} -m align.cli run CONFIG"
    if whole <= 0.9 * gpu:
        plan.lines.append(f"Launch: DDP, every GPU holds the whole model: {command.format(LAUNCH_FILES['ddp'])} "
                          f"(~{_gb(whole)} per GPU at most)")
    else:
        plan.lines.append(f"Launch: FSDP full shard, {command.format(LAUNCH_FILES['fsdp'])} (~{_gb(split)} per GPU at "
                          f"most; DDP would need ~{_gb(whole)}); DeepSpeed ZeRO-3 shards the same way: "
                          f"{LAUNCH_FILES['zero3']} (pip install deepspeed)")


def _visible_gpu_gb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GB
    except Exception:
        return None
    return None


def dry_run(cfg: RunConfig, gpus: int | None = None, gpu_gb: float | None = None) -> tuple[int, str]:
    """Build and render the plan; returns (exit status, text): 0 = runnable (warnings allowed), 2 = not."""
    if gpus is None:
        gpus = int(os.environ.get("WORLD_SIZE", "1"))
    plan = build_plan(cfg, gpus=gpus, gpu_gb=gpu_gb)
    return (0 if plan.ok else 2), plan.render()
