"""Two ears side by side: pocketsphinx WER (on Griffin-Lim audio) and the project's CTC phone ear (eval/ear.py: PER and
the NLL of the reference phones, on the rendered log-mel or on audio), measured as issue 32 asks.

    OMP_NUM_THREADS=1 python scripts/train_ear.py                       # the ear (runs/ears/<run name>/)
    OMP_NUM_THREADS=1 python benchmarks/judges.py [--run runs/studies/positive_control-r0-s0] [--n 40] \
        [--texts 30 --samples 4]

1. Floors: ``--n`` held-out (test) utterances as raw flite audio, codec-resynthesised (golden tokens, all levels,
   Griffin-Lim) and golden streams rendered by the round-0 policy's renderer; and the 13 real recordings of
   tests/data/real_speech.
2. Validity by controlled damage: the same golden streams with k% of their text units damaged (k = 0, 5, 10, 20, 40),
   two ways: ``codes`` (the unit's RVQ-1 codes replaced by random ones) and ``units`` (the unit itself replaced by a
   random phone, and its codes too); the dose-response slope per 10 points of k with a bootstrap CI over utterances.
3. Test-retest: the round-0 policy speaks ``--texts`` held-out texts ``--samples`` times (evaluation decoding); each
   sample rendered, vocoded, then delayed one sample, given white noise at 50 dB SNR, scaled by 0.8 and judged again.
4. Agreement within a text with pocketsphinx WER averaged over six versions of each sample (original, delays of one
   and two samples, two draws of 50 dB noise, gain 0.8); the n a paired test needs to see a 10% relative change.
5. Judged samples/s per stage, one process, torch on one thread, pocketsphinx in-process, CPU model beside them.

The audio side (renders, Griffin-Lim, pocketsphinx transcripts) is cached in runs/ears/_judges-<key>.pkl, so a
retrained ear is re-measured in a minute. Writes benchmarks/results/judges.{md,json}.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import time
from pathlib import Path

from common import ROOT, arg_parser, machine, write_results

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("speechalign.bench")
KS = (0, 5, 10, 20, 40)
VERSIONS = ("orig", "delay1", "noise50", "gain08", "delay2", "noise50b")
CHANGES = {"delay1": "one-sample delay (62 us)", "noise50": "white noise at 50 dB SNR", "gain08": "gain 0.8"}


# ---------------------------------------------------------------------------------------------
# Changes no listener hears, and damage every listener hears
# ---------------------------------------------------------------------------------------------
def perturb(wav: np.ndarray, version: str) -> np.ndarray:
    """One version of a waveform (float32 [n] -> [n]): the retest's changes, seeded per version."""
    if version == "orig":
        return wav
    if version.startswith("delay"):
        d = int(version[5:])
        return np.concatenate([np.zeros(d, np.float32), wav[:-d]]).astype(np.float32)
    if version.startswith("noise50"):
        rng = np.random.default_rng(0 if version == "noise50" else 1)
        rms = float(np.sqrt(np.mean(wav.astype(np.float64) ** 2))) if len(wav) else 0.0
        return (wav + rng.standard_normal(len(wav)) * rms * 10 ** (-50 / 20)).astype(np.float32)
    if version == "gain08":
        return (0.8 * wav).astype(np.float32)
    raise ValueError(version)


def damage(stream: torch.Tensor, k: float, kind: str, rng: np.random.Generator, codebook_size: int) -> torch.Tensor:
    """An interleaved stream [T'] with k% of its text units damaged: ``codes`` = that unit's codes replaced by random
    ones; ``units`` = the unit replaced by a random other phone and its codes by random ones."""
    from models.layout import PHONES, TEXT_UNITS, unit_marker

    n_units = int((stream < 0).sum())
    hit = set(rng.choice(n_units, int(round(k / 100 * n_units)), replace=False).tolist()) if k else set()
    out, pos = [], -1
    for v in stream.tolist():
        if v < 0:
            pos += 1
            if kind == "units" and pos in hit:
                old = TEXT_UNITS[-1 - v]
                v = unit_marker(rng.choice([p for p in PHONES if p != old]))
        elif pos in hit:
            v = int(rng.integers(codebook_size))
        out.append(v)
    return torch.tensor(out, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# The audio side: renders, Griffin-Lim, pocketsphinx (cached)
# ---------------------------------------------------------------------------------------------
def collect(args) -> dict:
    from align.config import load_config
    from align.run import Context
    from align.stages import round_subset
    from eval.asr import PocketSphinxASR
    from models.audio import load_audio
    from models.codec_lm import Policy
    from models.digest import dir_digest
    from models.io import read_jsonl

    run = Path(args.run)
    policy_dir = run / "round_000" / "policy"
    key = hashlib.sha1(json.dumps([str(run.resolve()), dir_digest(policy_dir), args.n, args.texts, args.samples,
                                   KS, VERSIONS, 3]).encode()).hexdigest()[:12]
    cache = ROOT / "runs" / "ears" / f"_judges-{key}.pkl"
    if cache.is_file():
        log.info("audio side from %s", cache)
        return pickle.loads(cache.read_bytes())
    cfg = load_config(run / "config.yaml")
    ctx = Context(cfg, None)
    policy = Policy.load(policy_dir)
    codec, sr, e = policy.codec, policy.codec.sample_rate, cfg.eval
    asr = PocketSphinxASR(workers=1)  # in-process: the other core is the background job's
    t_asr = [0.0, 0]

    def transcribe(wavs):
        t0 = time.perf_counter()
        out = asr.transcribe(wavs)
        t_asr[0] += time.perf_counter() - t0
        t_asr[1] += len(wavs)
        return out

    data = {"run": str(run), "policy": str(policy_dir), "sample_rate": sr, "floors": {}, "damage": {}}
    test = ctx.splits.test
    utts = round_subset(test, args.n, cfg.seed + 3)
    texts = [u.text for u in utts]
    prompts = [ctx.codes(ctx.prompt_for(u, test)) for u in utts]
    golden = [ctx.golden_stream(u, policy.format) for u in utts]
    codes = [ctx.codes(u) for u in utts]
    raw = [load_audio(u.audio, sr, cfg.data.max_seconds) for u in utts]
    rendered = [policy.render_logmel(g, p) for g, p in zip(golden, prompts)]
    ways = {"raw": (raw, None),
            "codec": ([codec.decode(c) for c in codes], [codec.dequantize(c) for c in codes]),
            "golden rendered": ([codec.decode_latent(m) for m in rendered], rendered)}
    for name, (wavs, mels) in ways.items():
        data["floors"][name] = {"texts": texts, "wavs": wavs, "mels": mels, "hyps": transcribe(wavs)}
        log.info("floor %s done", name)
    real_dir = ROOT / "tests" / "data" / "real_speech"
    real = read_jsonl(real_dir / "manifest.jsonl")
    wavs = [load_audio(real_dir / r["audio"], sr) for r in real]
    data["floors"]["real speech (13 clips)"] = {"texts": [r["text"] for r in real], "wavs": wavs, "mels": None,
                                                "hyps": transcribe(wavs)}

    for kind in ("codes", "units"):
        for k in KS:
            rng = np.random.default_rng(1000 + k)
            streams = [damage(g, k, kind, rng, codec.codebook_size) for g in golden]
            mels = [policy.render_logmel(s, p) for s, p in zip(streams, prompts)]
            wavs = [codec.decode_latent(m) for m in mels]
            data["damage"][f"{kind}/{k}"] = {"texts": texts, "wavs": wavs, "mels": mels, "hyps": transcribe(wavs)}
            log.info("damage %s %d%% done", kind, k)

    # the round-0 policy's samples of held-out texts, several per text
    seen, pool = set(), []
    for u in round_subset(test, 0, 0):
        if u.text not in seen:
            seen.add(u.text)
            pool.append(u)
    sutts = round_subset(pool, args.texts, cfg.seed + 5)
    sprompts = [ctx.codes(ctx.prompt_for(u, test)) for u in sutts]
    t0 = time.perf_counter()
    out = policy.generate([u.text for u in sutts], sprompts, n=args.samples, temperature=e.temperature, top_k=e.top_k,
                          top_p=e.top_p, batch_size=32, seed=cfg.seed + 11)
    t_generate = time.perf_counter() - t0
    streams = [s for o in out for s in o]
    stexts = [u.text for u in sutts for _ in range(args.samples)]
    text_idx = [i for i in range(len(sutts)) for _ in range(args.samples)]
    sp = [p for p in sprompts for _ in range(args.samples)]
    t0 = time.perf_counter()
    mels = [policy.render_logmel(s, p) for s, p in zip(streams, sp)]
    t_render = time.perf_counter() - t0
    t0 = time.perf_counter()
    wavs = [codec.decode_latent(m) if m.shape[0] else np.zeros(0, np.float32) for m in mels]
    t_vocode = time.perf_counter() - t0
    t_asr[:] = [0.0, 0]
    versions = {v: transcribe([perturb(w, v) if len(w) else w for w in wavs]) for v in VERSIONS}
    t_asr_one = t_asr[0] / len(VERSIONS)
    data["samples"] = {"texts": stexts, "text_idx": text_idx, "wavs": wavs, "mels": mels, "hyps": versions,
                       "n_texts": len(sutts), "per_text": args.samples, "streams": streams, "prompts": sp}
    data["timing"] = {"items": len(streams), "generate": t_generate, "render (renderer + quantise)": t_render,
                      "vocode (Griffin-Lim)": t_vocode, "pocketsphinx": t_asr_one,
                      "audio_seconds": sum(len(w) for w in wavs) / sr}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.write_bytes(pickle.dumps(data))
    os.replace(tmp, cache)
    return data


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a, b) -> float:
    from scipy.stats import rankdata

    return pearson(rankdata(a), rankdata(b))


def dose_slope(scores: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """scores [n_utts, len(KS)] -> OLS slope per 10 points of k, its 95% bootstrap CI (utterances resampled), the
    mean per k, whether the means rise monotonically, and the slope in units of the utterances' sd at k = 0."""
    x = np.asarray(KS, float) / 10
    xc = x - x.mean()

    def slope(s):
        return float(((s.mean(0) - s.mean()) * xc).sum() / (xc ** 2).sum())

    rng = np.random.default_rng(seed)
    boot = [slope(scores[rng.integers(0, len(scores), len(scores))]) for _ in range(n_boot)]
    means = scores.mean(0)
    sd0 = float(scores[:, 0].std(ddof=1))
    within = [spearman(x, s) for s in scores if np.ptp(s) > 0]
    return {"slope_per_10": slope(scores), "ci": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "means": means.tolist(), "monotone": bool(np.all(np.diff(means) > 0)),
            "slope_in_sd0": slope(scores) / sd0 if sd0 > 0 else float("nan"),
            "within_utt_spearman": float(np.mean(within)) if within else float("nan")}


def n_for_paired(values: np.ndarray, text_idx: np.ndarray, rel: float = 0.10) -> dict:
    """The n texts a paired test (alpha 0.05 two-sided, power 0.8) needs to see a ``rel`` relative change of the mean,
    when a paired difference's sd is sqrt(2) x the within-text sd of one sample (sampling and ear noise together)."""
    groups = [values[text_idx == t] for t in np.unique(text_idx)]
    var = np.mean([g.var(ddof=1) for g in groups if len(g) > 1])
    sd_d = math.sqrt(2 * var)
    delta = rel * float(values.mean())
    return {"mean": float(values.mean()), "sd_within": math.sqrt(var), "sd_diff": sd_d,
            "n": int(math.ceil(((1.959964 + 0.841621) * sd_d / delta) ** 2)) if delta > 0 else None}


# ---------------------------------------------------------------------------------------------
# The ears' verdicts
# ---------------------------------------------------------------------------------------------
def judge(args, data: dict) -> dict:
    from eval.asr import corpus_wer, utterance_wer
    from eval.ear import Ear, score_audio, score_logmel

    ear = Ear.load(args.ear)
    sr = data["sample_rate"]
    res = {"ear": {"path": args.ear, "digest": ear.digest, "parameters": ear.n_parameters(),
                   "train": json.loads((Path(args.ear) / "ear.json").read_text())["meta"]}}

    def ear_scores(wavs=None, mels=None, texts=None):
        s = score_logmel(ear, mels, texts) if mels is not None else score_audio(ear, wavs, sr, texts)
        return {"per": np.array([x.per for x in s]), "nll": np.array([x.nll for x in s]),
                "hyp": [" ".join(x.hyp) for x in s]}

    # 1. floors
    floors = {}
    for name, d in data["floors"].items():
        wers = np.array([utterance_wer(t, h) for t, h in zip(d["texts"], d["hyps"])])
        row = {"n": len(wers), "wer_mean": float(wers.mean()), "wer_corpus": corpus_wer(d["texts"], d["hyps"])}
        a = ear_scores(wavs=d["wavs"], texts=d["texts"])
        row.update(per_audio=float(a["per"].mean()), nll_audio=float(a["nll"].mean()))
        if d["mels"] is not None:
            m = ear_scores(mels=d["mels"], texts=d["texts"])
            row.update(per_mel=float(m["per"].mean()), nll_mel=float(m["nll"].mean()))
        floors[name] = row
    res["floors"] = floors

    # 2. damage
    dmg = {}
    for kind in ("codes", "units"):
        cols = {"wer": [], "per_mel": [], "nll_mel": [], "per_audio": [], "nll_audio": []}
        for k in KS:
            d = data["damage"][f"{kind}/{k}"]
            cols["wer"].append([utterance_wer(t, h) for t, h in zip(d["texts"], d["hyps"])])
            m = ear_scores(mels=d["mels"], texts=d["texts"])
            a = ear_scores(wavs=d["wavs"], texts=d["texts"])
            cols["per_mel"].append(m["per"])
            cols["nll_mel"].append(m["nll"])
            cols["per_audio"].append(a["per"])
            cols["nll_audio"].append(a["nll"])
        dmg[kind] = {c: dose_slope(np.asarray(v, float).T) for c, v in cols.items()}
    res["damage"] = dmg

    # 3-4. retest and agreement on the policy's samples
    s = data["samples"]
    texts, idx = s["texts"], np.asarray(s["text_idx"])
    spoken = [i for i, w in enumerate(s["wavs"]) if len(w)]  # an empty sample has nothing to perturb
    wer_v = {v: np.array([utterance_wer(t, h) for t, h in zip(texts, s["hyps"][v])]) for v in VERSIONS}
    ear_mel = ear_scores(mels=s["mels"], texts=texts)
    ear_v = {}
    for v in VERSIONS:
        wavs = [perturb(s["wavs"][i], v) for i in spoken]
        ear_v[v] = ear_scores(wavs=wavs, texts=[texts[i] for i in spoken])
    sp = np.asarray(spoken)
    retest = {}
    for v in CHANGES:
        rows = {}
        rows["pocketsphinx WER"] = {
            "changed": float(np.mean([s["hyps"]["orig"][i] != s["hyps"][v][i] for i in sp])),
            "mean_abs": float(np.abs(wer_v[v][sp] - wer_v["orig"][sp]).mean()),
            "r": pearson(wer_v["orig"][sp], wer_v[v][sp])}
        for metric in ("per", "nll"):
            rows[f"ear {metric.upper()} (audio)"] = {
                "changed": float(np.mean([a != b for a, b in zip(ear_v["orig"]["hyp"], ear_v[v]["hyp"])])),
                "mean_abs": float(np.abs(ear_v[v][metric] - ear_v["orig"][metric]).mean()),
                "r": pearson(ear_v["orig"][metric], ear_v[v][metric])}
        retest[v] = rows
    # the vocoder as a change: the ear on the rendered log-mel vs on the Griffin-Lim audio of it
    retest["vocoder"] = {f"ear {m.upper()}": {
        "changed": float(np.mean([ear_mel["hyp"][i] != ear_v["orig"]["hyp"][j] for j, i in enumerate(sp)])),
        "mean_abs": float(np.abs(ear_mel[m][sp] - ear_v["orig"][m]).mean()),
        "r": pearson(ear_mel[m][sp], ear_v["orig"][m])} for m in ("per", "nll")}
    res["retest"] = retest

    wer_avg = np.mean([wer_v[v] for v in VERSIONS], axis=0)
    wer_rest = np.mean([wer_v[v] for v in VERSIONS if v != "orig"], axis=0)  # not containing the orig reading

    def within(score, target):
        vals = [spearman(score[idx == t], target[idx == t]) for t in np.unique(idx)]
        vals = [v for v in vals if not math.isnan(v)]
        return {"within_text": float(np.mean(vals)) if vals else float("nan"), "texts": len(vals),
                "pooled": spearman(score, target)}

    full = lambda a: np.array([a[list(sp).index(i)] if i in set(sp) else np.nan for i in range(len(texts))])  # noqa: E731
    agree = {"pocketsphinx WER (original; target without it)": within(wer_v["orig"], wer_rest),
             "ear PER (log-mel)": within(ear_mel["per"], wer_avg), "ear NLL (log-mel)": within(ear_mel["nll"], wer_avg)}
    if len(sp) == len(texts):
        agree["ear PER (audio)"] = within(full(ear_v["orig"]["per"]), wer_avg)
        agree["ear NLL (audio)"] = within(full(ear_v["orig"]["nll"]), wer_avg)
    res["agreement"] = agree
    # what pocketsphinx hears and the phone ear does not: the positive control's planted pauses (eval/defects.py)
    from eval.defects import has_pause, pause_of_logmel

    frame_rate = data["sample_rate"] / ear.cfg.hop_length
    paused = np.array([has_pause(pause_of_logmel(m, frame_rate)) if m.shape[0] else False for m in s["mels"]])
    res["pauses"] = {"share": float(paused.mean()), "n": int(paused.sum()),
                     "wer": [float(wer_avg[paused].mean()), float(wer_avg[~paused].mean())],
                     "per": [float(ear_mel["per"][paused].mean()), float(ear_mel["per"][~paused].mean())],
                     "nll": [float(ear_mel["nll"][paused].mean()), float(ear_mel["nll"][~paused].mean())]}
    res["paired_n"] = {"pocketsphinx WER": n_for_paired(wer_v["orig"], idx),
                       "pocketsphinx WER (mean of 6 versions)": n_for_paired(wer_avg, idx),
                       "ear PER (log-mel)": n_for_paired(ear_mel["per"], idx),
                       "ear NLL (log-mel)": n_for_paired(ear_mel["nll"], idx)}
    res["samples"] = {"n": len(texts), "texts": s["n_texts"], "per_text": s["per_text"], "spoken": len(sp),
                      "wer": float(wer_v["orig"].mean()), "per": float(ear_mel["per"].mean()),
                      "nll": float(ear_mel["nll"].mean())}

    res["timing"] = timing(args, data, ear)
    return res


def timing(args, data: dict, ear) -> dict:
    """Seconds per stage for the first ``--time`` of the policy's samples, all stages timed here one after another
    in this process (torch on one thread, pocketsphinx in-process), so that they share the machine's load."""
    from eval.asr import PocketSphinxASR
    from eval.ear import score_audio, score_logmel
    from models.codec_lm import Policy

    s = data["samples"]
    idx = [i for i, w in enumerate(s["wavs"]) if len(w)][: args.time]
    texts = [s["texts"][i] for i in idx]
    policy = Policy.load(data["policy"])
    codec = policy.codec
    asr = PocketSphinxASR(workers=1)
    asr.transcribe([s["wavs"][idx[0]]])  # the decoder's first call pays its set-up
    policy.render_logmel(s["streams"][idx[0]], s["prompts"][idx[0]])
    t = {"items": len(idx), "passes": args.passes}
    for _ in range(args.passes):  # every stage's fastest pass: the other job's load comes and goes
        lap = {}
        t0 = time.perf_counter()
        mels = [policy.render_logmel(s["streams"][i], s["prompts"][i]) for i in idx]
        lap["render (renderer + quantise)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        wavs = [codec.decode_latent(m) for m in mels]
        lap["vocode (Griffin-Lim)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        asr.transcribe(wavs)
        lap["pocketsphinx"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        score_logmel(ear, mels, texts)
        lap["ear on log-mel"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        score_audio(ear, wavs, data["sample_rate"], texts)
        lap["ear on audio (log-mel + ear)"] = time.perf_counter() - t0
        for k, v in lap.items():
            t[k] = min(t.get(k, math.inf), v)
    t["audio_seconds"] = sum(len(w) for w in wavs) / data["sample_rate"]
    t["load"] = os.getloadavg()[0]
    t["generate (whole set, at collection)"] = data["timing"]["generate"] * len(idx) / data["timing"]["items"]
    return t


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
def f(x, d=3) -> str:
    if x is None:
        return "-"  # not measured that way (raw audio has no rendered log-mel)
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.{d}f}"


def markdown(args, res: dict, cmd: str) -> str:
    t, n = res["timing"], res["timing"]["items"]
    ear = res["ear"]
    tr = ear["train"]
    md = ["# Two ears: pocketsphinx and the project's CTC phone ear", "",
          f"`{cmd}` on {machine()}, torch on {torch.get_num_threads()} thread(s), pocketsphinx in-process. The ear: "
          f"`{ear['path']}` (digest {ear['digest']}, {ear['parameters']:,} parameters, "
          f"{ear['parameters'] * 4 / 1e6:.1f} MB float32), trained by `scripts/train_ear.py` for {tr.get('train', {}).get('steps')} "
          f"steps in {tr.get('train_seconds', 0) / 60:.1f} min on {tr.get('threads')} thread(s) ({tr.get('machine')}) on "
          f"the training split of `{args.run}` ({', '.join(f'{k} {v}' for k, v in (tr.get('views') or {}).items())} "
          "log-mels: scripts/train_ear.py says what each view is). The policy judged is that run's round 0: the main job's "
          "size and layout (configs/tiny.yaml), trained on the positive control's corpus, 30% of whose recordings pause "
          "(configs/positive_control.yaml); its dev and test recordings are clean. PER = phone error rate of its greedy "
          "transcript against the text's phones (models/layout.py `text_units(text, 'phones')`), NLL = the CTC negative "
          "log-likelihood of those phones per phone (nats). \"log-mel\": the ear reads what the renderer gives the "
          "vocoder (no Griffin-Lim); \"audio\": it reads the log-mel of the Griffin-Lim audio (`Ear.features`). "
          "WER is pocketsphinx on the Griffin-Lim audio, as every evaluation reads it. Lower is better everywhere.", ""]

    md += ["## 1. Floors", "",
           f"Held-out (test split) utterances, mean of per-utterance scores (corpus WER beside it).", "",
           "| audio | n | WER (mean / corpus) | PER log-mel | PER audio | NLL log-mel | NLL audio |",
           "|---|---|---|---|---|---|---|"]
    for name, r in res["floors"].items():
        md.append(f"| {name} | {r['n']} | {f(r['wer_mean'])} / {f(r['wer_corpus'])} | {f(r.get('per_mel'))} | "
                  f"{f(r['per_audio'])} | {f(r.get('nll_mel'), 2)} | {f(r['nll_audio'], 2)} |")
    md += ["", "The real recordings are out of the ear's domain (it heard only flite voices through this codec): its "
           "floor there says how far it generalises, not how it judges the policy."]

    md += ["", "## 2. Validity by controlled damage", "",
           f"The {res['floors']['golden rendered']['n']} golden streams above, k% of their text units damaged, rendered "
           "by the round-0 renderer. `codes`: the damaged units' RVQ-1 codes replaced by random codes (the renderer "
           "also reads the unit, and was trained with half its codes random: it may not care); `units`: the unit "
           "replaced by a random other phone, its codes too. Slope per 10 points of k, 95% bootstrap CI over "
           "utterances; \"in sd\" = slope / the utterances' sd at k = 0; \"within\" = mean Spearman of k and the score "
           "within an utterance.", "",
           "| damage | score | k = " + " / ".join(str(k) for k in KS) + " | monotone | slope per 10 pts [95% CI] | "
           "in sd | within |", "|---|---|---|---|---|---|---|"]
    names = {"wer": "pocketsphinx WER", "per_mel": "ear PER log-mel", "nll_mel": "ear NLL log-mel",
             "per_audio": "ear PER audio", "nll_audio": "ear NLL audio"}
    for kind, cols in res["damage"].items():
        for c, d in cols.items():
            dd = 2 if "nll" in c else 3
            md.append(f"| {kind} | {names[c]} | {' / '.join(f(m, dd) for m in d['means'])} | "
                      f"{'yes' if d['monotone'] else 'no'} | {f(d['slope_per_10'], dd)} [{f(d['ci'][0], dd)}, "
                      f"{f(d['ci'][1], dd)}] | {f(d['slope_in_sd0'], 2)} | {f(d['within_utt_spearman'], 2)} |")

    s = res["samples"]
    md += ["", "## 3. Test-retest", "",
           f"The round-0 policy speaks {s['texts']} held-out texts x {s['per_text']} samples at the evaluation decoding "
           f"(n = {s['n']}, {s['spoken']} with frames; mean WER {f(s['wer'])}, PER {f(s['per'])}, NLL {f(s['nll'], 2)}); "
           "each sample's Griffin-Lim audio judged again after a change no listener hears. \"changed\": share of "
           "transcripts (pocketsphinx words, the ear's phones) that differ.", "",
           "| change | ear | transcripts changed | mean abs. change | test-retest r |", "|---|---|---|---|---|"]
    for v, rows in res["retest"].items():
        label = CHANGES.get(v, "the vocoder: log-mel vs its Griffin-Lim audio")
        for name, r in rows.items():
            md.append(f"| {label} | {name} | {r['changed']:.0%} | {f(r['mean_abs'])} | {f(r['r'])} |")

    md += ["", "## 4. Agreement with pocketsphinx over many perturbations, and the n a paired test needs", "",
           "Spearman of each score with pocketsphinx WER averaged over six versions of the sample (original, delays of "
           "1 and 2 samples, two draws of 50 dB noise, gain 0.8): within a text (mean over texts whose samples "
           "differ) and pooled over all samples. pocketsphinx's own row compares its original reading with the mean "
           "of the five other versions, so it is not compared with itself.", "",
           "| score | within a text | texts | pooled |", "|---|---|---|---|"]
    for name, r in res["agreement"].items():
        md.append(f"| {name} | {f(r['within_text'], 2)} | {r['texts']} | {f(r['pooled'], 2)} |")
    pz = res["pauses"]
    md += ["", f"The round-0 policy of the positive control pauses (it learnt the planted pauses): {pz['n']} of "
           f"{s['n']} samples ({pz['share']:.0%}) hold a silence >= 0.25 s (eval/defects.py). "
           f"pocketsphinx (mean of the six versions) reads them at WER {f(pz['wer'][0])} against {f(pz['wer'][1])} "
           f"without; the ear at PER {f(pz['per'][0])} vs {f(pz['per'][1])}, NLL {f(pz['nll'][0], 2)} vs "
           f"{f(pz['nll'][1], 2)}: CTC's blank absorbs a silence, pocketsphinx's language model breaks on it."]
    md += ["", "Texts a paired test (alpha 0.05 two-sided, power 0.8) needs to see a 10% relative change of the round-0 "
           "mean, with a paired difference's sd taken as sqrt(2) x the within-text sd of one sample (the sampling "
           "and the ear's noise together):", "", "| score | round-0 mean | within-text sd | n |", "|---|---|---|---|"]
    for name, r in res["paired_n"].items():
        md.append(f"| {name} | {f(r['mean'])} | {f(r['sd_within'])} | {r['n']} |")

    md += ["", "## 5. Judged samples/s", "",
           f"{n} samples ({t['audio_seconds']:.0f} s of audio) on {machine()}, one process, torch on "
           f"{torch.get_num_threads()} thread(s), stage after stage in one process, each stage's fastest of {t['passes']} passes (load average {t['load']:.1f} on the 2 cores: "
           "another job shared the machine).", "",
           "| stage | seconds | samples/s |", "|---|---|---|"]
    stages = ["generate (whole set, at collection)", "render (renderer + quantise)", "vocode (Griffin-Lim)", "pocketsphinx", "ear on log-mel",
              "ear on audio (log-mel + ear)"]
    for k in stages:
        md.append(f"| {k} | {t[k]:.1f} | {n / t[k]:.1f} |")
    ps = t["render (renderer + quantise)"] + t["vocode (Griffin-Lim)"] + t["pocketsphinx"]
    ea = t["render (renderer + quantise)"] + t["ear on log-mel"]
    res["judged_per_s"] = {"pocketsphinx": n / ps, "ear": n / ea}
    md += [f"| **judge = render + vocode + pocketsphinx** | {ps:.1f} | **{n / ps:.1f}** |",
           f"| **judge = render + ear on log-mel** | {ea:.1f} | **{n / ea:.1f}** |"]
    md += ["", reading(res)]
    return "\n".join(md)


def reading(res: dict) -> str:
    """The closing notes: what the numbers above say against issue 32's bar (r >= 0.97 per change, >= 20 judged
    samples/s)."""
    fl, rt, dm, ag, pz = res["floors"], res["retest"], res["damage"], res["agreement"], res["pauses"]
    r_min = {m: min(rt[v][f"ear {m} (audio)"]["r"] for v in CHANGES) for m in ("PER", "NLL")}
    r_ps = min(rt[v]["pocketsphinx WER"]["r"] for v in CHANGES)
    u = dm["units"]
    speed = res["judged_per_s"]
    bar = lambda ok: "meets" if ok else "misses"  # noqa: E731
    return "\n".join([
        "## Reading", "",
        f"- **Floors.** The ear reads raw / codec / golden-rendered held-out speech at PER {f(fl['raw']['per_audio'])} / "
        f"{f(fl['codec']['per_mel'])} / {f(fl['golden rendered']['per_mel'])} where pocketsphinx reads WER "
        f"{f(fl['raw']['wer_mean'])} / {f(fl['codec']['wer_mean'])} / {f(fl['golden rendered']['wer_mean'])}. It is an "
        "in-domain ear (flite voices and this sentence generator; the test sentences it never heard): on real speech it "
        f"reads PER {f(fl['real speech (13 clips)']['per_audio'])}, so it judges the policy, not speech at large.",
        f"- **Test-retest (bar r >= 0.97 under each change).** The NLL {bar(r_min['NLL'] >= 0.97)} it (lowest r "
        f"{f(r_min['NLL'])}); the PER {bar(r_min['PER'] >= 0.97)} it (lowest r {f(r_min['PER'])}, under 50 dB noise): a "
        "PER moves in steps of one phone flip (~0.04 on a 25-phone sentence) against a spread of ~0.06 between the "
        f"samples of a text, so a few flips cost r; the NLL is continuous. pocketsphinx's lowest r here: {f(r_ps)}.",
        f"- **Speed (bar >= 20 judged samples/s).** Rendering + the ear on the log-mel: {speed['ear']:.1f} samples/s on "
        f"one thread: it {bar(speed['ear'] >= 20)} the bar (pocketsphinx's path: {speed['pocketsphinx']:.1f}/s); the ear "
        "itself is a few ms a sample, the renderer and the codec's quantisation are now the judge's cost, and all "
        "figures move with the other job's load (section 5).",
        f"- **Validity by damage.** Replacing k% of the units, both ears worsen monotonically; the ear's slope is "
        f"{f(u['per_mel']['slope_in_sd0'], 1)} (PER) and {f(u['nll_mel']['slope_in_sd0'], 1)} (NLL) of its own "
        f"between-utterance sd per 10 points against pocketsphinx's {f(u['wer']['slope_in_sd0'], 2)}, and it ranks the "
        f"five doses of one utterance right (Spearman {f(u['per_mel']['within_utt_spearman'], 2)} vs "
        f"{f(u['wer']['within_utt_spearman'], 2)}). Replacing only the codes of k% of the units barely changes the "
        "speech: the renderer takes content from the units (it was trained with half its codes random), so neither ear "
        "moves much there (pocketsphinx not even monotonically).",
        f"- **Agreement.** Weak: within a text the ear ranks samples like pocketsphinx's averaged WER at Spearman "
        f"{f(ag['ear PER (log-mel)']['within_text'], 2)} (PER) / {f(ag['ear NLL (log-mel)']['within_text'], 2)} (NLL), "
        f"while pocketsphinx agrees with itself across versions at {f(ag['pocketsphinx WER (original; target without it)']['within_text'], 2)}. "
        "So pocketsphinx ranks a text's samples reproducibly by something the phone ear hardly hears. In the "
        "interleaved layout the policy writes each phone and the renderer reads it, so the samples of one text carry "
        "nearly the same phones; they differ in timing and spectra, which pocketsphinx's word models and language model "
        f"react to: a sample with a pause reads WER {f(pz['wer'][0])} against {f(pz['wer'][1])}, PER "
        f"{f(pz['per'][0])} against {f(pz['per'][1])}. The ear is a sharp, steady and fast judge of phone content, not "
        "a stand-in for pocketsphinx's verdict: item 3 (both ears in every evaluation) stands; a pair judge built on the "
        "ear alone would optimise what the layout already fixes, and what to add to it (the pause detector, the NLL per "
        "frame, which counts silence) is the next measurement.",
        "- **Paired n.** 10% of a PER of 0.1 is 0.01, so the ear needs more texts for a *relative* 10% than WER does; "
        "its differences are in other units and the two n are not a ranking of the ears.",
        "- **Candidate (a)** (pocketsphinx forced alignment / GOP) was not measured again: issue 32's probe found its "
        "score ranks utterances unlike their WER (Spearman 0.00), and it would keep Griffin-Lim and pocketsphinx, the two "
        "slow stages, in the judge."])


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--run", default="runs/studies/positive_control-r0-s0")
    ap.add_argument("--ear", default=None, help="default runs/ears/<run name>")
    ap.add_argument("--n", type=int, default=40, help="held-out utterances for the floors and the damage")
    ap.add_argument("--texts", type=int, default=30, help="held-out texts the policy speaks for the retest")
    ap.add_argument("--samples", type=int, default=4, help="samples per text")
    ap.add_argument("--time", type=int, default=40, help="samples whose judging is timed stage by stage")
    ap.add_argument("--passes", type=int, default=2, help="timing passes (each stage's fastest is reported)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.ear = args.ear or str(Path("runs") / "ears" / Path(args.run).name)
    cmd = (f"OMP_NUM_THREADS=1 python benchmarks/judges.py --run {args.run} --n {args.n} --texts {args.texts} "
           f"--samples {args.samples}")
    data = collect(args)
    res = judge(args, data)
    md = markdown(args, res, cmd)
    out = write_results("judges", md, {"machine": machine(), "args": vars(args), "results": res})
    print(out.read_text())


if __name__ == "__main__":
    main()
