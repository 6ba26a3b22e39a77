"""``speechalign report RUN_DIR``: one static HTML page per run, opened from disk (no server).

    runs/<name>/report/index.html       the page
    runs/<name>/report/figures/*.png    its figures (each with a caption saying how it was computed)
    runs/<name>/report/audio/golden/    copies of the golden and prompt recordings of the listened
    runs/<name>/report/audio/prompt/    utterances (they live outside the run, in the corpus)

Round outputs are not copied: the page plays ``../round_k/eval/audio/<id>.wav`` by relative path,
so the run folder can move as a whole. What is on the page: the per-round metrics with bootstrap
CIs and paired-test p-values, the paired tests, metric-vs-round and WER-scatter figures, the
distribution gap per round (numbers, trend, PCA per round), a listening table (golden recording,
prompt and each round's output as ``<audio>`` players with text, hypothesis and scores) and every
round's per-utterance table.
"""
from __future__ import annotations

import html
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pandas as pd

from models.rundir import RunLayout

log = logging.getLogger("speechalign.eval")

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:.5em;max-width:560px;vertical-align:top}
figure img{max-width:100%} figcaption{font-size:12px;color:#444}
audio{width:210px;height:32px} .small{font-size:12px;color:#555} .better{color:#070} .worse{color:#a00}
"""

# Marks each player once the browser has read its file's header (data-loaded=1) or failed
# (data-error=1), and says how many loaded: a broken relative path shows on the page, and a test
# can read the attributes from the DOM after headless Chromium ran the page.
SCRIPT = """
<script>
(function(){
  var players = Array.prototype.slice.call(document.querySelectorAll('audio'));
  function update(){
    var ok = players.filter(function(a){return a.dataset.loaded === '1';}).length;
    var bad = players.filter(function(a){return a.dataset.error === '1';}).length;
    var el = document.getElementById('player-status');
    if (el) el.textContent = ok + ' of ' + players.length + ' audio players loaded' + (bad ? ', ' + bad + ' failed' : '');
  }
  players.forEach(function(a){
    a.addEventListener('loadedmetadata', function(){a.dataset.loaded = '1'; a.dataset.duration = a.duration.toFixed(2); update();});
    a.addEventListener('error', function(){a.dataset.error = '1'; update();}, true);
    var s = a.querySelector('source'); if (s) s.addEventListener('error', function(){a.dataset.error = '1'; update();});
    if (a.readyState >= 1) {a.dataset.loaded = '1'; update();}
  });
  update();
})();
</script>
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.4g}"
    return _e(v)


def table_html(df: pd.DataFrame, table_id: str = "", cols: list[str] | None = None) -> str:
    cols = cols or list(df.columns)
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for row in df[cols].itertuples(index=False):
        cells = "".join(f'<td class="num">{_fmt(v)}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
                        else f"<td>{_fmt(v)}</td>" for v in row)
        body.append(f"<tr>{cells}</tr>")
    tid = f' id="{table_id}"' if table_id else ""
    return (f'<div style="overflow-x:auto"><table{tid}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _audio(src: str | None, label: str = "") -> str:
    if not src:
        return '<span class="small">(no audio)</span>'
    kind = "audio/flac" if src.endswith(".flac") else "audio/wav"
    return (f'<audio controls preload="metadata" data-label="{_e(label)}"><source src="{_e(src)}" type="{kind}">'
            f"</audio>")


def _figure(path: Path, caption: str, root: Path) -> str:
    return (f'<figure><img src="{_e(path.relative_to(root).as_posix())}" alt="{_e(path.stem)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _recordings(rows: pd.DataFrame) -> dict[str, tuple[str | None, str | None]]:
    """{id: (golden audio path, prompt audio path)} as the evaluation rows recorded them.

    Rows of runs evaluated before rows carried the paths have none: the page then shows the outputs
    only, and says so in the log (the report reads files; it never rebuilds a run's data).
    """
    out = {}
    for r in rows.itertuples(index=False):
        if getattr(r, "audio", None):
            out[r.id] = (r.audio, r.prompt_audio)
    missing = [i for i in rows["id"].unique() if i not in out]
    if missing:
        log.warning("report: %d utterances have no recorded golden/prompt paths (rows from older code); the page "
                    "shows their outputs only", len(missing))
    return out


def _copy(src: str | None, dest_dir: Path, name: str, root: Path) -> str | None:
    if not src or not Path(src).is_file():
        return None
    dest = dest_dir / f"{name}{Path(src).suffix}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest.relative_to(root).as_posix()


def _gap_section(cmp, run_dir: Path, out: Path, fig_dir: Path) -> list[str]:
    from eval import plots

    t = cmp.table
    if "gap_auc" not in t or not t["gap_auc"].notna().any():
        return ["<h2>Distribution gap</h2><p>No gap metrics in this run (eval.gap_utterances = 0, or evaluated "
                "before the gap analysis existed: re-run <code>--only-stage evaluate</code>).</p>"]
    g = t.dropna(subset=["gap_auc"]).sort_values("round")
    first, last = g.iloc[0], g.iloc[-1]
    shrinks = last["gap_auc"] < first["gap_auc"]
    parts = ["<h2>Distribution gap (golden vs synthetic RVQ-1)</h2>",
             f"<p id=\"gap-trend\">Classifier AUC went from <b>{first['gap_auc']:.3f}</b> (round {int(first['round'])}) "
             f"to <b>{last['gap_auc']:.3f}</b> (round {int(last['round'])}): the gap "
             f"<b class=\"{'better' if shrinks else 'worse'}\">{'shrinks' if shrinks else 'does not shrink'}</b>. "
             f"Log-prob margin (golden - synthetic, nats/token): {first['gap_logp_margin']:+.3f} -> "
             f"{last['gap_logp_margin']:+.3f}. With few held-out utterances these numbers are noisy; read the "
             "trend over rounds, not one step.</p>",
             table_html(g, "gap-table", [c for c in ("round", "gap_auc", "gap_logp_margin") if c in g])]
    figs = []
    p = fig_dir / "gap.png"
    figs.append(_figure(p, plots.gap_vs_round(t, p), out))
    for k in g["round"]:
        gj = RunLayout(run_dir).eval_dir(int(k)) / "gap.json"
        if gj.is_file():
            p = fig_dir / f"gap_pca_r{int(k)}.png"
            figs.append(_figure(p, plots.gap_projection(json.loads(gj.read_text()), p, int(k)), out))
    return parts + ["<div>" + "".join(figs) + "</div>"]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, *, n_listen: int = 8,
                 n_boot: int = 2000, seed: int = 0) -> Path:
    """Write the run's HTML report; returns the path of ``index.html``."""
    from tqdm import tqdm

    from models.io import atomic_write_text
    from eval.compare import build_comparison, figures, table_note, tests_note
    from eval.listen import report_section

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    steps = tqdm(total=5, desc="report", leave=False)
    cmp = build_comparison([run_dir], n_boot=n_boot, seed=seed)
    utts = cmp.utterances
    rounds = sorted(int(k) for k in utts["round"].unique())
    steps.update()

    figs = "".join(_figure(p, cap, out) for p, cap in figures(cmp, fig_dir, gap=False))  # gap: own section
    steps.update()

    # Listening: the utterances whose output was saved, in eval order (the same ids every round).
    saved = {}
    for k in rounds:
        wav_dir = RunLayout(run_dir).eval_dir(k) / "audio"
        for w in wav_dir.glob("*.wav") if wav_dir.is_dir() else []:
            saved.setdefault(w.stem, {})[k] = Path(os.path.relpath(w.resolve(), out.resolve())).as_posix()
    r0 = utts[utts["round"] == rounds[0]].sort_values("item")
    listen_ids = [i for i in r0["id"] if i in saved][:n_listen]
    recordings = _recordings(utts[utts["id"].isin(listen_ids)])
    listen_rows = []
    for uid in listen_ids:
        gold, prompt = recordings.get(uid, (None, None))
        gold_src = _copy(gold, out / "audio" / "golden", uid, out)
        prompt_src = _copy(prompt, out / "audio" / "prompt", uid, out)
        text = utts.loc[utts["id"] == uid, "text"].iloc[0]
        cells = [f"<td><b>{_e(uid)}</b><br>{_e(text)}</td>", f"<td>{_audio(gold_src, 'golden')}</td>",
                 f"<td>{_audio(prompt_src, 'prompt')}</td>"]
        for k in rounds:
            r = utts[(utts["id"] == uid) & (utts["round"] == k)]
            if r.empty:
                cells.append("<td></td>")
                continue
            r = r.iloc[0]
            dn = f" DNSMOS {r['dnsmos']:.2f}" if pd.notna(r["dnsmos"]) else ""
            dn += f" PER {r['per']:.2f}" if "per" in r and pd.notna(r["per"]) else ""
            cells.append(f"<td>{_audio(saved[uid].get(k), f'round {k}')}<br><span class=\"small\">"
                         f"&ldquo;{_e(r['hypothesis'])}&rdquo;<br>WER {r['wer']:.2f} SIM {r['sim']:.2f}{dn}</span></td>")
        listen_rows.append("<tr>" + "".join(cells) + "</tr>")
    listen_head = "<tr><th>utterance</th><th>golden</th><th>prompt</th>" + "".join(
        f"<th>round {k}</th>" for k in rounds) + "</tr>"
    steps.update()

    gap = _gap_section(cmp, run_dir, out, fig_dir)
    steps.update()

    per_round = []
    cols = ["item", "id", "text", "hypothesis", "wer", "per", "ear_nll", "sim", "dnsmos", "pause", "duration",
            "n_frames", "sample"]
    for k in rounds:
        g = utts[utts["round"] == k]
        g = g.drop(columns=[c for c in ("dnsmos", "per", "ear_nll") if c in g and g[c].isna().all()])
        per_round.append(f"<details{' open' if k == rounds[-1] else ''}><summary>Round {k}: {len(g)} utterances"
                         f"</summary>{table_html(g, f'utterances-r{k}', [c for c in cols if c in g])}</details>")

    n = int(cmp.table["n_eval"].max()) if "n_eval" in cmp.table else len(r0)
    body = [
        f"<h1>speechalign run <code>{_e(run_dir.name)}</code></h1>",
        f"<p class=\"small\">Generated {time.strftime('%Y-%m-%d %H:%M')} from {_e(run_dir.resolve())}; rounds "
        f"{rounds[0]}..{rounds[-1]}; {n} test utterances per round (a fixed seeded subset, the same every round). "
        f"Per-utterance rows: <code>utterances.parquet</code> / <code>round_k/eval/rows.jsonl</code>.</p>",
        "<h2>Metrics per round</h2>", table_html(cmp.table, "metrics-table"),
        f"<p class=\"small\">wer = corpus WER (total edit errors / total reference words of the pocketsphinx "
        f"transcripts); sim = mean speaker-embedding cosine to the real recording. {_e(table_note(cmp))} "
        "reward_*: DPO's implicit-reward accuracy and margin over the last 20% of steps; sec_*: wall seconds.</p>",
        "<h2>Paired tests</h2>", table_html(cmp.tests, "tests-table"),
        f"<p class=\"small\">{_e(tests_note(cmp))}</p>",
        "<h2>Figures</h2>", f"<div>{figs}</div>",
        *gap,
        "<h2>Listen</h2>",
        f"<p class=\"small\">The first {len(listen_ids)} evaluation utterances whose output every round saved "
        "(eval.save_audio); golden = the real recording of the text, prompt = the voice prompt the policy was "
        "conditioned on (its first policy.prompt_seconds), then each round's synthesis with its ASR hypothesis and "
        "scores. <span id=\"player-status\">audio players not checked yet (JavaScript off?)</span></p>",
        f"<table id=\"listen-table\"><thead>{listen_head}</thead><tbody>{''.join(listen_rows)}</tbody></table>",
        report_section(run_dir),
        "<h2>Per-utterance results</h2>", *per_round,
    ]
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>speechalign {_e(run_dir.name)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}{SCRIPT}</body></html>")
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.html"
    atomic_write_text(index, page)
    steps.update()
    steps.close()
    log.info("report: %s (%d rounds, %d utterances to listen to)", index, len(rounds), len(listen_ids))
    return index
