"""Distribution gap between golden and synthetic RVQ-1 codec tokens (SpeechAlign, section 3).

The SpeechAlign paper's premise: the codec LM is trained on golden tokens but decodes from its own
synthetic ones, and the two distributions differ; preference optimisation should shrink the gap.
Per round k we measure it on a fixed set of held-out (dev + test) texts and prompts:

* ``gap_auc``: a small classifier's held-out ROC AUC at telling a golden sequence from a sequence
  round k's policy sampled for the same text and prompt. Features: unigram code frequencies, hashed
  bigram frequencies and log length; logistic regression; stratified k-fold grouped by utterance
  (so a text's golden and synthetic sequences never sit on both sides of a split); seeded.
  0.5 = indistinguishable, 1.0 = perfectly separable.
* ``gap_logp_margin``: mean over utterances of (mean per-token log-prob of the golden codes minus
  that of the policy's own sample) under round k's policy, scored under its emit rule (models/walk.py:
  the distribution it samples from). A policy that samples from the golden
  distribution scores both alike; a positive margin means golden tokens are now the likelier ones.
* a 2-D PCA of both sets (unigram frequencies), saved as coordinates for the report's plot.

Cost: one ``generate`` call over the set plus two scoring forwards, a few seconds for the tiny model.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("speechalign.eval")

N_HASH = 2048  # bigram buckets: K^2 bigrams do not fit for K=1024 (EnCodec), hashing keeps it small


def code_features(seqs: list, codebook_size: int, n_hash: int = N_HASH):
    """Sparse features [N, K + n_hash + 1]: unigram and hashed-bigram frequencies, log(1 + length).

    seqs: N code sequences (LongTensor/array/list [T_i]); empty sequences get all-zero frequencies.
    """
    from scipy.sparse import csr_matrix

    rows, cols, vals = [], [], []
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64).reshape(-1)
        t = len(s)
        if t:
            rows += [i] * t
            cols += s.tolist()
            vals += [1.0 / t] * t
        if t > 1:
            b = codebook_size + (s[:-1] * codebook_size + s[1:]) % n_hash
            rows += [i] * (t - 1)
            cols += b.tolist()
            vals += [1.0 / (t - 1)] * (t - 1)
        rows.append(i)
        cols.append(codebook_size + n_hash)
        vals.append(float(np.log1p(t)))
    return csr_matrix((vals, (rows, cols)), shape=(len(seqs), codebook_size + n_hash + 1))


def classifier_auc(golden: list, synthetic: list, groups: list, codebook_size: int, seed: int = 0) -> float | None:
    """Held-out ROC AUC of logistic regression golden (1) vs synthetic (0); None if too few for 2 folds.

    golden, synthetic: N code sequences each, item i of both from utterance groups[i].
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MaxAbsScaler

    if not len(golden) == len(synthetic) == len(groups):
        raise ValueError("classifier_auc needs one golden and one synthetic sequence per group (utterance id)")
    x = code_features(list(golden) + list(synthetic), codebook_size)
    y = np.r_[np.ones(len(golden)), np.zeros(len(synthetic))].astype(int)
    g = np.asarray(list(groups) * 2)
    n_groups = len(set(groups))
    if n_groups < 2 or min(len(golden), len(synthetic)) < 2:
        log.warning("gap: %d utterances are too few for a cross-validated AUC; raise eval.gap_utterances", n_groups)
        return None
    cv = StratifiedGroupKFold(n_splits=min(5, n_groups), shuffle=True, random_state=seed)
    clf = make_pipeline(MaxAbsScaler(), LogisticRegression(C=1.0, max_iter=2000))
    proba = cross_val_predict(clf, x, y, groups=g, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))


def pca_2d(golden: list, synthetic: list, codebook_size: int) -> np.ndarray:
    """[N_golden + N_synthetic, 2] PCA coordinates of unigram code frequencies (one PCA over both)."""
    from sklearn.decomposition import PCA

    x = code_features(list(golden) + list(synthetic), codebook_size).toarray()[:, :codebook_size]
    if len(x) < 3:
        return np.zeros((len(x), 2))
    return PCA(n_components=2, random_state=0).fit_transform(x)


@torch.no_grad()
def completion_logprobs(policy, texts: list[str], prompts: list[torch.Tensor], seqs: list,
                        batch_size: int = 16, reduce: str = "mean") -> np.ndarray:
    """Mean (``reduce="sum"``: summed, as DPO's implicit reward reads it) per-token log-prob [N] of each speech
    stream (+ ``<eos>``) given its text and prompt.

    texts: N strings; prompts: N LongTensors [n_q, Tp] (full prompt codes); seqs: N streams of the
    policy's layout [T_i] (RVQ-1 codes, with unit markers when interleaved). Scored under the policy's
    emit rule (models/walk.py), the distribution it samples from; a stream it could never say
    (a unit out of order) scores -inf.
    """
    from models.walk import completion_log_probs

    lm, tok, fmt, rule = policy.lm.eval(), policy.tokenizer, policy.format, policy.emit_rule
    device = next(lm.parameters()).device
    max_len = int(getattr(lm.config, "max_position_embeddings", 1 << 30))
    out = np.zeros(len(seqs))
    for start in range(0, len(seqs), batch_size):
        rows = []
        for t, p, s in zip(texts[start:start + batch_size], prompts[start:start + batch_size],
                           seqs[start:start + batch_size]):
            head = tok(policy.conditioning(p, t), add_special_tokens=False)["input_ids"]
            stream = torch.as_tensor(np.asarray(s)).reshape(-1)
            tail = tok(fmt.completion_str(stream), add_special_tokens=False)["input_ids"]
            rows.append((head, tail[: max(0, max_len - len(head))]))
        width = max(len(h) + len(c) for h, c in rows)
        # Right padding: positions then count from 0 for every row without passing position_ids.
        x = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full_like(x, -100)
        mask = torch.zeros_like(x)
        for i, (h, c) in enumerate(rows):
            x[i, : len(h) + len(c)] = torch.tensor(h + c)
            labels[i, len(h): len(h) + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(h) + len(c)] = 1
        scored = completion_log_probs(lm, rule, x.to(device), mask.to(device), labels.to(device))
        n = scored["label_mask"].sum(1)
        value = scored["log_probs"].sum(1) / (n.clamp_min(1) if reduce == "mean" else 1)
        out[start:start + len(rows)] = torch.where(n > 0, value, float("nan")).double().cpu().numpy()
    return out


def gap_analysis(policy, texts: list[str], prompts: list[torch.Tensor], golden: list[torch.Tensor], ids: list[str],
                 *, temperature: float, top_k: int, top_p: float, seed: int, batch_size: int) -> tuple[dict, dict]:
    """Sample the policy on (texts, prompts), then measure the golden-vs-synthetic gap.

    golden: N golden streams of the policy's layout [T_i] (``Context.golden_stream``).
    Returns (summary, detail): summary
    holds ``gap_auc``, ``gap_logp_margin``, ``gap_logp_golden``, ``gap_logp_synthetic``, ``gap_n``
    (goes into the round's eval summary and metrics.jsonl); detail adds per-utterance log-probs, the
    PCA coordinates and labels (1 golden, 0 synthetic) for the report.
    """
    synth = [s[0] for s in policy.generate(texts, prompts, n=1, temperature=temperature, top_k=top_k, top_p=top_p,
                                           seed=seed, batch_size=batch_size, progress=True)]
    K = policy.codec.codebook_size
    lp_gold = completion_logprobs(policy, texts, prompts, golden, batch_size)
    lp_syn = completion_logprobs(policy, texts, prompts, synth, batch_size)
    golden, synth = [policy.format.frames(g) for g in golden], [policy.format.frames(s) for s in synth]  # codes [T]
    auc = classifier_auc(golden, synth, ids, K, seed=seed)
    # a golden stream the walk cannot say (a unit longer than the policy's frame cap) scores -inf: counted, and
    # left out of the means rather than making them -inf
    ok = np.isfinite(lp_gold) & np.isfinite(lp_syn)
    summary = {"gap_auc": auc, "gap_logp_margin": float(np.mean(lp_gold[ok] - lp_syn[ok])) if ok.any() else None,
               "gap_logp_golden": float(np.mean(lp_gold[ok])) if ok.any() else None,
               "gap_logp_synthetic": float(np.mean(lp_syn[ok])) if ok.any() else None,
               "gap_n": len(texts), "gap_unscored": int((~ok).sum())}
    detail = dict(summary, ids=list(ids), logp_golden=np.where(np.isfinite(lp_gold), lp_gold, None).tolist(),
                  logp_synthetic=np.where(np.isfinite(lp_syn), lp_syn, None).tolist(),
                  golden_len=[int(len(g)) for g in golden], synthetic_len=[int(len(s)) for s in synth],
                  pca=pca_2d(golden, synth, K).round(5).tolist(), labels=[1] * len(golden) + [0] * len(synth),
                  n=len(texts))
    return summary, detail
