"""Benchmark of the embedded codec's design: where a round trip loses intelligibility, and how much
the codec bar moves between fits.

    python benchmarks/codec_sweep.py [--config configs/tiny.yaml] [--set key=value ...]
        [--part all|sweep|seeds] [--seeds 0,1,2]

On the config's test split (the main job's: 160 utterances of 40 unseen sentences), pocketsphinx WER:

``sweep``: the raw audio; the unquantised log-mel through each decoder (the decoder's own loss);
  decoded golden tokens for two quantisers (24 whole-frame codebooks, the earlier default, and 4
  whole-frame + 28 band codebooks, ``full_levels: 4``) x two decoders (plain Griffin-Lim towards the
  inverted magnitudes, and the mel-consistent one, ``griffin_lim_warmup: 16``), with the test split's
  log-mel RMS error of each quantiser.
``seeds``: the codec bar (``eval.codec_check.codec_roundtrip``: WER of decoded golden tokens vs raw,
  reconstruction SIM vs same-speaker SIM) of the config's own codec fitted with each of ``--seeds``
  (``codec.seed``: the k-means initialisation and the subsample of fit frames), and the spread.

Every codec is fitted by ``speechalign prepare`` (so exactly as a run fits and caches it) and loaded
from the cache. Writes ``benchmarks/results/codec_sweep.md`` and ``.json``; a part that is not run
keeps its rows from the previous JSON, labelled with the invocation they came from.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, arg_parser  # noqa: E402  (the repository on sys.path, logging)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from align.config import load_config  # noqa: E402
from eval.asr import build_asr, corpus_wer  # noqa: E402
from models.audio import load_audio, resample  # noqa: E402
from models.codec import MelRVQCodec, load_codec  # noqa: E402
from models.data import load_any  # noqa: E402

log = logging.getLogger("speechalign.bench")

QUANTISERS = {"24 whole-frame": dict(n_q=24, full_levels=24), "4 whole-frame + 28 band": dict(n_q=32, full_levels=4)}
DECODERS = {"plain Griffin-Lim": dict(griffin_lim_warmup=64, griffin_lim_iters=64),
            "mel-consistent Griffin-Lim": dict(griffin_lim_warmup=16, griffin_lim_iters=64)}
BAR_WER = 0.05  # the codec bar: decoded golden tokens within this much WER of the raw audio


def prepared_codec(config: str, overrides: list[str]) -> tuple[MelRVQCodec, float]:
    """Fit (or find cached) the codec of ``config`` + ``overrides`` with ``speechalign prepare``, which
    also builds the corpus; returns (codec, seconds prepare took)."""
    cfg = load_config(config, overrides)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "align.cli", "prepare", config,
                           *[a for o in overrides for a in ("--set", o)]],
                          cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"speechalign prepare {config} {overrides} failed:\n{proc.stderr[-3000:]}")
    cache = Path(cfg.cache_dir)
    cache = cache if cache.is_absolute() else ROOT / cache
    metas = {p.parent: json.loads(p.read_text()) for p in sorted(cache.glob("codecs/*/codec.json"))}
    # prepare logs "... codec <identity>" (a digest of the codebooks); the config is the fallback
    ident = re.findall(r"codec (\S+)\s*$", proc.stderr + proc.stdout, flags=re.M)
    found = [p for p, m in metas.items() if ident and m.get("identity") == ident[-1]]
    if not found:
        want = json.loads(json.dumps(dataclasses.asdict(cfg.codec)))
        found = [p for p, m in metas.items() if m.get("config") == want]
    if len(found) != 1:
        raise RuntimeError(f"cannot tell which cached codec in {cache / 'codecs'} speechalign prepare fitted for "
                           f"{overrides} ({len(found)} match its config); clear that folder and rerun")
    return load_codec(found[0]), seconds


def test_split(cfg):
    """The config's test utterances, as a run sees them (after ``speechalign prepare`` built the corpus)."""
    if cfg.data.source == "embedded":
        corpus_dir = Path(cfg.data.corpus_dir)
        corpus_dir = corpus_dir if corpus_dir.is_absolute() else ROOT / corpus_dir
        want = json.loads(json.dumps(cfg.corpus.identity()))
        dirs = [p.parent for p in sorted(corpus_dir.glob("flite-*/corpus.json"))
                if all(json.loads(p.read_text())["config"].get(k) == v for k, v in want.items())]
        if len(dirs) != 1:
            raise RuntimeError(f"{len(dirs)} corpora in {corpus_dir} match {cfg.corpus.identity()}; expected one")
        source = dirs[0] / "test.jsonl"
    else:
        source = cfg.data.test
    utts, _ = load_any(source)
    return [u for u in utts if u.duration is None or u.duration <= cfg.data.max_seconds]


def run_sweep(args, cfg, test, raws, wer) -> dict:
    """Quantisers x decoders (see the module docstring); returns {"meta", "rows"}."""
    rows = [{"audio": "raw", "quantiser": "", "decoder": "", "log_mel_rms": 0.0, "wer": wer(raws), "seconds": 0.0}]
    log.info("raw WER %.4f", rows[0]["wer"])
    unquantised_done = False
    for qname, qopts in QUANTISERS.items():
        fitted, fit_seconds = prepared_codec(args.config, args.overrides + [f"codec.{k}={v}" for k, v in qopts.items()])
        feats = [fitted.features(w) for w in raws]
        codes = [fitted.quantize(f) for f in feats]
        rms = float(np.sqrt(torch.cat([fitted.dequantize(c) - f for c, f in zip(codes, feats)]).pow(2).mean()))
        log.info("%s: prepared in %.0f s, test log-mel rms %.4f", qname, fit_seconds, rms)
        for dname, dopts in DECODERS.items():
            codec = MelRVQCodec(dataclasses.replace(fitted.cfg, **dopts), fitted.codebooks)
            if not unquantised_done:  # the decoder alone: features, not codes (same for either quantiser)
                t0 = time.time()
                w = wer([codec.decode_latent(f) for f in feats])
                rows.append({"audio": "unquantised log-mel", "quantiser": "", "decoder": dname,
                             "log_mel_rms": 0.0, "wer": w, "seconds": time.time() - t0})
                log.info("unquantised, %s: WER %.4f", dname, w)
            t0 = time.time()
            w = wer([codec.decode(c) for c in codes])
            rows.append({"audio": "decoded golden tokens", "quantiser": qname, "decoder": dname,
                         "log_mel_rms": rms, "wer": w, "seconds": time.time() - t0, "fit_seconds": fit_seconds})
            log.info("%s, %s: WER %.4f", qname, dname, w)
        unquantised_done = True
    return {"meta": meta(args, test), "rows": rows}


def run_seeds(args, cfg, test) -> dict:
    """The codec bar of the config's codec for each fit seed; returns {"meta", "rows", "summary"}."""
    from eval.codec_check import codec_roundtrip
    from eval.speaker import build_speaker_encoder

    asr, speaker = build_asr(cfg.eval.asr), build_speaker_encoder(cfg.eval.speaker)
    rows = []
    for seed in args.seeds:
        codec, prep_seconds = prepared_codec(args.config, args.overrides + [f"codec.seed={seed}"])
        t0 = time.time()
        bar = codec_roundtrip(codec, test, asr=asr, speaker=speaker,
                              load=lambda u: load_audio(u.audio, codec.sample_rate, cfg.data.max_seconds))
        bar.update(seed=seed, prepare_seconds=prep_seconds, roundtrip_seconds=time.time() - t0,
                   wer_codec_minus_raw=bar["wer_codec"] - bar["wer_raw"],
                   bar_wer_holds=bar["wer_codec"] <= bar["wer_raw"] + BAR_WER,
                   bar_sim_holds=bar["sim_recon"] >= bar["sim_same_speaker_other_utt"])
        log.info("codec seed %d: WER codec %.4f vs raw %.4f, SIM recon %.4f", seed, bar["wer_codec"], bar["wer_raw"],
                 bar["sim_recon"])
        rows.append(bar)
    summary = {}
    for key in ("wer_codec", "wer_codec_minus_raw", "sim_recon"):
        v = np.array([r[key] for r in rows])
        summary[key] = {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
                        "range": float(v.max() - v.min())}
    summary["wer_raw"] = sorted({round(r["wer_raw"], 12) for r in rows})  # one value: the ASR is deterministic
    return {"meta": meta(args, test), "rows": rows, "summary": summary}


def meta(args, test) -> dict:
    return {"command": "python benchmarks/codec_sweep.py " + " ".join(sys.argv[1:]), "config": args.config,
            "overrides": args.overrides, "n_test": len(test), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def previous(out: Path) -> dict:
    """The previous JSON's parts ({"sweep", "seeds"}); the first version held only the sweep's meta + rows."""
    path = out.with_suffix(".json")
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if "rows" in old:
        old = {"sweep": {"meta": dict(old["meta"], command="python benchmarks/codec_sweep.py"), "rows": old["rows"]}}
    return old


def markdown(result: dict, ran: set[str], n_test: int, config: str) -> list[str]:
    lines = [f"# Embedded codec sweep ({Path(config).name}, {n_test} test utterances)", "",
             f"pocketsphinx corpus WER; the codec bar is WER(decoded golden tokens) <= WER(raw) + {BAR_WER} and "
             "reconstruction SIM >= the SIM of two utterances of the same speaker.", ""]
    if "seeds" in result:
        s, m = result["seeds"], result["seeds"]["meta"]
        wer, d, sim = (s["summary"][k] for k in ("wer_codec", "wer_codec_minus_raw", "sim_recon"))
        lines += ["## The codec bar over codec fit seeds", "",
                  f"{'This invocation' if 'seeds' in ran else 'From an earlier invocation'} ({m['date']}, "
                  f"`{m['command']}`, {m['cpus']} CPUs, torch {m['torch']}, torch threads: {m['threads']}): the "
                  f"config's codec fitted by `speechalign prepare` with `codec.seed` = "
                  f"{', '.join(str(r['seed']) for r in s['rows'])}.", "",
                  "| codec.seed | codec | WER raw | WER codec | WER codec - raw | WER bar | SIM recon | "
                  "SIM same speaker | SIM bar | prepare s | round trip s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            lines.append(f"| {r['seed']} | `{r['codec']}` | {r['wer_raw']:.4f} | {r['wer_codec']:.4f} | "
                         f"{r['wer_codec_minus_raw']:+.4f} | {'holds' if r['bar_wer_holds'] else 'fails'} | "
                         f"{r['sim_recon']:.4f} | {r['sim_same_speaker_other_utt']:.4f} | "
                         f"{'holds' if r['bar_sim_holds'] else 'fails'} | {r['prepare_seconds']:.0f} | "
                         f"{r['roundtrip_seconds']:.0f} |")
        lines += ["", f"Spread over {len(s['rows'])} fits: WER codec {wer['min']:.4f}-{wer['max']:.4f} "
                  f"(mean {wer['mean']:.4f}, range {wer['range']:.4f}); WER codec - raw {d['min']:+.4f} to "
                  f"{d['max']:+.4f} (mean {d['mean']:+.4f}); SIM recon {sim['min']:.4f}-{sim['max']:.4f} "
                  f"(mean {sim['mean']:.4f}). {len(s['rows'])} fits measure the spread, they do not bound it: read "
                  f"a difference between two codecs smaller than this range ({wer['range']:.4f} WER) as within "
                  "fit-to-fit noise. prepare s: the wall time of `speechalign prepare` (seconds when that codec was "
                  "already in the cache); round trip s: encode + decode + both transcriptions + speaker embeddings.", ""]
    if "sweep" in result:
        s, m = result["sweep"], result["sweep"]["meta"]
        raw = s["rows"][0]["wer"]
        lines += ["## Quantisers x decoders", "",
                  f"{'This invocation' if 'sweep' in ran else 'From an earlier invocation, not rerun here'} "
                  f"({m['date']}, `{m.get('command', 'python benchmarks/codec_sweep.py')}`, {m['cpus']} CPUs, "
                  f"torch {m['torch']}, torch threads: {m['threads']}); one fit (codec.seed 0) per quantiser, so "
                  "compare differences with the seed spread above.", "",
                  "| audio | quantiser | decoder | test log-mel RMS error | WER | WER - raw | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            lines.append(f"| {r['audio']} | {r['quantiser']} | {r['decoder']} | {r['log_mel_rms']:.4f} | "
                         f"{r['wer']:.4f} | {r['wer'] - raw:+.4f} | {r['seconds']:.0f} |")
        lines.append("")
    return lines


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--part", choices=["all", "sweep", "seeds"], default="all",
                    help="seeds: only the codec bar over fit seeds (3 fits + round trips, ~15 min on 2 cores)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "codec_sweep"))
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.codec.backend != "mel_rvq":
        raise SystemExit(f"codec_sweep measures the embedded mel_rvq codec; {args.config} has codec.backend="
                         f"{cfg.codec.backend}")
    out = Path(args.out)
    result = previous(out)
    ran = {"sweep", "seeds"} if args.part == "all" else {args.part}
    if "seeds" in ran:
        first, _ = prepared_codec(args.config, args.overrides)  # builds the corpus before test_split reads it
        test = test_split(cfg)
        result["seeds"] = run_seeds(args, cfg, test)
    if "sweep" in ran:
        first, _ = prepared_codec(args.config, args.overrides)
        test = test_split(cfg)
        asr = build_asr(cfg.eval.asr)
        refs = [u.text for u in test]
        sr = first.sample_rate
        raws = [load_audio(u.audio, sr, cfg.data.max_seconds) for u in test]
        result["sweep"] = run_sweep(args, cfg, test, raws,
                                    lambda wavs: corpus_wer(refs, asr.transcribe([resample(w, sr, asr.sample_rate)
                                                                                  for w in wavs])))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = markdown(result, ran, len(test), args.config)
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
