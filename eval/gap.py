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
  that of the policy's own sample) under round k's policy, over the codec tokens + ``<eos>`` it may
  emit (the same renormalised distribution it samples from). A policy that samples from the golden
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
                        batch_size: int = 16) -> np.ndarray:
    """Mean per-token log-prob [N] of each speech stream (+ ``<eos>``) given its text and prompt.

    texts: N strings; prompts: N LongTensors [n_q, Tp] (full prompt codes); seqs: N streams of the
    policy's layout [T_i] (RVQ-1 codes, with unit markers when interleaved). Log-probs are over the
    tokens the policy may emit (codec tokens, ``<eos>`` and, interleaved, the text units), as it samples.
    """
    from models.layout import TEXT_UNITS

    lm, tok, fmt = policy.lm.eval(), policy.tokenizer, policy.format
    device = next(lm.parameters()).device
    K = policy.codec.codebook_size
    emit = fmt.speech_tokens(K) + fmt.stop_tokens + (TEXT_UNITS if fmt.units is not None else [])
    allowed = torch.tensor(tok.convert_tokens_to_ids(emit), device=device)
    column = torch.full((len(tok),), -1, dtype=torch.long, device=device)  # vocab id -> column of `allowed`
    column[allowed] = torch.arange(len(allowed), device=device)
    max_len = int(getattr(lm.config, "max_position_embeddings", 1 << 30))
    out = np.zeros(len(seqs))
    for start in range(0, len(seqs), batch_size):
        ids, starts = [], []
        for t, p, s in zip(texts[start:start + batch_size], prompts[start:start + batch_size],
                           seqs[start:start + batch_size]):
            head = tok(policy.conditioning(p, t), add_special_tokens=False)["input_ids"]
            stream = torch.as_tensor(np.asarray(s)).reshape(-1)
            tail = tok(fmt.completion_str(stream), add_special_tokens=False)["input_ids"]
            seq = (head + tail)[:max_len]
            ids.append(seq)
            starts.append(len(head))
        width = max(len(s) for s in ids)
        # Right padding: positions then count from 0 for every row without passing position_ids.
        x = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, s in enumerate(ids):
            x[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logits = lm(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[..., allowed], dim=-1)  # [B, L, |allowed|] over what it may emit
        for i, s in enumerate(ids):
            col = column[torch.tensor(s[starts[i]:], device=device)]
            pos = torch.arange(starts[i] - 1, len(s) - 1, device=device)
            out[start + i] = float(logp[i, pos, col].mean()) if len(pos) else float("nan")
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
    summary = {"gap_auc": auc, "gap_logp_margin": float(np.nanmean(lp_gold - lp_syn)),
               "gap_logp_golden": float(np.nanmean(lp_gold)), "gap_logp_synthetic": float(np.nanmean(lp_syn)),
               "gap_n": len(texts)}
    detail = dict(summary, ids=list(ids), logp_golden=lp_gold.tolist(), logp_synthetic=lp_syn.tolist(),
                  golden_len=[int(len(g)) for g in golden], synthetic_len=[int(len(s)) for s in synth],
                  pca=pca_2d(golden, synth, K).round(5).tolist(), labels=[1] * len(golden) + [0] * len(synth),
                  n=len(texts))
    return summary, detail
