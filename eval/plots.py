"""PNG figures for ``compare`` and ``report``; each states how it was computed, in the image itself
(a footer) and as the caption string the function returns (the report prints it under the figure)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

LABELS = {"wer": "corpus WER (lower is better)", "sim": "speaker SIM (higher is better)",
          "dnsmos": "DNSMOS (higher is better)", "gap_auc": "golden-vs-synthetic AUC (0.5 = no gap)",
          "gap_logp_margin": "log-prob margin golden - synthetic (nats/token)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, caption: str) -> str:
    width = int(fig.get_figwidth() * 16)  # characters of a 7-pt footer line that fit the figure
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(caption, width)), fontsize=7, va="bottom", ha="left", color="#444")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(path)
    return caption


def metric_vs_round(est: pd.DataFrame, metric: str, path: Path, *, level: float = 0.95, n_boot: int = 2000) -> str:
    """Line per run of ``metric`` vs round with its CI band; est from ``stats.round_estimates``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fig.subplots_adjust(bottom=0.27)
    for run, g in est.groupby("run", sort=True):
        g = g.sort_values("round")
        ax.plot(g["round"], g[metric], marker="o", label=str(run))
        if f"{metric}_lo" in g:
            ax.fill_between(g["round"], g[f"{metric}_lo"], g[f"{metric}_hi"], alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_xticks(sorted(est["round"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    n = int(est["n"].max()) if "n" in est else 0
    what = ("total edit errors / total reference words (pocketsphinx transcript vs text)" if metric == "wer"
            else f"mean over utterances of {metric}")
    caption = (f"{metric} per round = {what}, on the fixed evaluation set (up to {n} utterances). Band: "
               f"{level:.0%} percentile bootstrap CI, {n_boot} resamples of utterances (seeded).")
    return _save(fig, path, caption)


def gap_vs_round(metrics: pd.DataFrame, path: Path) -> str:
    """The distribution-gap metrics from ``metrics.jsonl`` rows (columns run, round, gap_auc, gap_logp_margin)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    fig.subplots_adjust(bottom=0.3, wspace=0.3)
    for ax, m in zip(axes, ("gap_auc", "gap_logp_margin")):
        for run, g in metrics.groupby("run", sort=True):
            if m in g and g[m].notna().any():
                g = g.sort_values("round")
                ax.plot(g["round"], g[m], marker="o", label=str(run))
        if m == "gap_auc":
            ax.axhline(0.5, color="grey", ls="--", lw=1)
        else:
            ax.axhline(0.0, color="grey", ls="--", lw=1)
        ax.set_xlabel("round")
        ax.set_ylabel(LABELS[m], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    caption = ("Distribution gap per round (eval.gap): left, held-out ROC AUC of a logistic regression telling golden "
               "from synthetic RVQ-1 sequences (unigram+hashed-bigram code frequencies + log length, grouped "
               "stratified k-fold by utterance, seeded); 0.5 = indistinguishable. Right, mean over utterances of "
               "(mean per-token log-prob of the golden codes - of the policy's own sample) under round k's policy.")
    return _save(fig, path, caption)


def wer_scatter(table: pd.DataFrame, run: str, k: int, path: Path, ref_round: int = 0) -> str:
    """Per-utterance WER of round ``ref_round`` (x) vs round ``k`` (y), paired on utterance id."""
    from eval.stats import align_on_id

    plt = _plt()
    g = table[table["run"] == run]
    a, b = align_on_id(g[g["round"] == ref_round], g[g["round"] == k])
    fig, ax = plt.subplots(figsize=(4.8, 5.0))
    fig.subplots_adjust(bottom=0.27, left=0.16)
    x, y = a["wer"].to_numpy(float), b["wer"].to_numpy(float)
    # A little seeded jitter: many utterances sit exactly on WER 0 or 1.
    jit = np.random.default_rng(0).uniform(-0.01, 0.01, size=(2, len(x)))
    ax.scatter(x + jit[0], y + jit[1], s=18, alpha=0.7)
    top = max(1.0, float(np.nanmax(np.r_[x, y, 0])) + 0.05)
    ax.plot([0, top], [0, top], color="grey", ls="--", lw=1)
    ax.set_xlim(-0.05, top)
    ax.set_ylim(-0.05, top)
    ax.set_xlabel(f"WER, round {ref_round}")
    ax.set_ylabel(f"WER, round {k}")
    ax.set_title(f"{run}: {int((y < x).sum())} better, {int((y > x).sum())} worse, {int((y == x).sum())} same",
                 fontsize=9)
    caption = (f"Per-utterance WER of round {ref_round} vs round {k} on the same {len(x)} test utterances (paired on id); "
               "below the diagonal = round k better. Points jittered by +-0.01 for visibility.")
    return _save(fig, path, caption)


def gap_projection(gap: dict, path: Path, k: int) -> str:
    """2-D PCA of golden and synthetic RVQ-1 feature vectors from a round's ``eval/gap.json``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    fig.subplots_adjust(bottom=0.27, left=0.16)
    pts = np.asarray(gap["pca"], dtype=float)
    labels = np.asarray(gap["labels"])
    for lab, name, color in ((1, "golden", "tab:green"), (0, "synthetic", "tab:red")):
        sel = labels == lab
        if sel.any():
            ax.scatter(pts[sel, 0], pts[sel, 1], s=16, alpha=0.7, label=name, color=color)
    ax.legend(fontsize=8)
    auc = gap.get("gap_auc")
    ax.set_title(f"round {k}: AUC {auc:.2f}" if auc is not None else f"round {k}", fontsize=9)
    caption = (f"Round {k}: PCA (2 components, fitted on both sets) of unigram code-frequency vectors of golden and "
               f"round-{k}-policy RVQ-1 sequences for the same {gap.get('n', '?')} held-out texts and prompts.")
    return _save(fig, path, caption)
