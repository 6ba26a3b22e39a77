"""What a policy may emit after its prompt: one rule for sampling and for scoring.

The sampler (``Policy.generate``) draws every speech token from the LM's logits after this rule has
masked and pooled them; DPO, continue-SFT, GRPO and the gap analysis score a sequence under the same
rule (``EmitRule.log_probs``). So a preference moves the distribution the sampler draws from, and a
trainer cannot earn its margin where the sampler never looks (mass moved onto a token the rule
forbids, or between the unit tokens it pools).

    plain layout        after the prompt: the format's speech tokens and its stop tokens only
    interleaved layout  the walk through the text's units (ELLA-V, models/layout.py): after
                        ``<speech>`` the first unit; after a unit at least one frame; then frames or
                        the *next* unit, which gets the pooled mass of every unit token and ``<eos>``
                        (the policy says *that* the unit is over, the text says *which* comes next),
                        until ``max_frames`` frames of one unit force it

The walk's state at every position (units said, frames of the current unit, the next unit) is a
function of the token ids alone, computed for a whole batch at once (``_walk_state``): generation
calls it on the ids so far and constrains the last position, scoring on the whole sequence and
constrains every completion position. One function, so the two cannot drift apart
(tests/test_walk.py: a sample's summed log-prob at temperature 1 equals the scoring path's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class EmitRule:
    """The tokens a policy may emit after its prompt, and how their logits are pooled.

    vocab_size: V; emit_ids: LongTensor of the tokens the plain rule allows (speech + stop tokens);
    walk: the interleaved walk instead; codec_ids / unit_ids: LongTensors of codec and text-unit token
    ids; eos_id, text_id: ``<eos>`` and ``<text>`` (the walk reads the units after ``<text>``);
    max_frames: the walk's cap on one unit's frames.
    """

    vocab_size: int
    emit_ids: torch.Tensor
    walk: bool = False
    codec_ids: torch.Tensor | None = None
    unit_ids: torch.Tensor | None = None
    eos_id: int = -1
    text_id: int = -1
    max_frames: int = 0

    @classmethod
    def for_policy(cls, tokenizer, fmt, codebook_size: int, max_frames_per_unit: int | None = None) -> "EmitRule":
        """The rule of a policy's tokenizer and sequence format (``Policy.emit_rule`` builds it from a policy)."""
        from models.layout import TEXT_UNITS

        vocab = len(tokenizer)
        speech = tokenizer.convert_tokens_to_ids(fmt.speech_tokens(codebook_size))
        stop = tokenizer.convert_tokens_to_ids(fmt.stop_tokens)
        emit = torch.tensor(speech + stop, dtype=torch.long)
        if fmt.units is None:
            return cls(vocab, emit)
        if max_frames_per_unit is None:
            raise ValueError("the interleaved walk needs max_frames_per_unit (the policy's meta has it)")
        return cls(vocab, emit, walk=True, codec_ids=torch.tensor(speech, dtype=torch.long),
                   unit_ids=torch.tensor(tokenizer.convert_tokens_to_ids(TEXT_UNITS), dtype=torch.long),
                   eos_id=int(stop[0]), text_id=int(tokenizer.convert_tokens_to_ids("<text>")),
                   max_frames=int(max_frames_per_unit))

    # -- the state of the walk ---------------------------------------------------------------------
    def _lookup(self, ids: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """BoolTensor like ``ids``: which ids are in ``members`` (ids outside the vocabulary are not)."""
        table = torch.zeros(self.vocab_size + 1, dtype=torch.bool, device=ids.device)
        table[members.to(ids.device)] = True
        return table[ids.clamp(0, self.vocab_size)]

    def _walk_state(self, input_ids: torch.Tensor, start: torch.Tensor):
        """Per position t of input_ids [B, L], the walk's state *after* reading token t.

        start: LongTensor [B], each row's first completion position (the token after ``<speech>``).
        Returns (units said [B, L], frames of the current unit [B, L], the next unit's id [B, L]; ``<eos>``
        after the last unit). Tokens before ``start`` say nothing; the text units are the unit tokens
        between the row's ``<text>`` and ``start``.
        """
        B, L = input_ids.shape
        ar = torch.arange(L, device=input_ids.device)
        start = start.to(input_ids.device)
        is_unit = self._lookup(input_ids, self.unit_ids)
        has_text = input_ids == self.text_id
        if not bool((has_text & (ar[None] < start[:, None])).any(1).all()):
            raise ValueError("a sequence scored under the interleaved walk has no <text> before its completion")
        text_pos = torch.where(has_text, ar, L).min(1).values
        in_text = is_unit & (ar[None] > text_pos[:, None]) & (ar[None] < start[:, None])
        n_units = int(in_text.sum(1).max()) if B else 0
        rank = torch.where(in_text, in_text.long().cumsum(1) - 1, n_units + 1)  # non-units to a spare column
        table = torch.full((B, n_units + 2), self.eos_id, dtype=torch.long, device=input_ids.device)
        table.scatter_(1, rank, input_ids)
        table = table[:, : n_units + 1]  # the spare column dropped: after a row's last unit comes <eos>
        comp = ar[None] >= start[:, None]
        unit_c = is_unit & comp
        codec_c = self._lookup(input_ids, self.codec_ids) & comp
        pos = unit_c.long().cumsum(1)
        frames_so_far = codec_c.long().cumsum(1)
        last_unit = torch.where(unit_c, ar, -1).cummax(1).values
        at_unit = torch.where(last_unit >= 0, frames_so_far.gather(1, last_unit.clamp_min(0)), 0)
        nxt = table.gather(1, pos.clamp(max=n_units))
        return pos, frames_so_far - at_unit, nxt

    def _apply_walk(self, scores: torch.Tensor, pos: torch.Tensor, frames: torch.Tensor, nxt: torch.Tensor):
        """scores [..., V] at positions with state (pos, frames, nxt) [...] -> what the walk lets through."""
        device = scores.device
        codec_ids = self.codec_ids.to(device)
        advance_ids = torch.cat([self.unit_ids, torch.tensor([self.eos_id])]).to(device)
        out = torch.full_like(scores, NEG_INF)
        codec_ok = ((pos > 0) & (frames < self.max_frames))[..., None]
        out[..., codec_ids] = torch.where(codec_ok, scores[..., codec_ids], NEG_INF)
        # the next unit carries the mass of every unit token and <eos>: "this unit is over"
        advance = torch.logsumexp(scores[..., advance_ids], dim=-1)
        may = (pos == 0) | (frames > 0)
        return out.scatter(-1, nxt[..., None], torch.where(may, advance, NEG_INF)[..., None])

    def _apply_plain(self, scores: torch.Tensor) -> torch.Tensor:
        emit = self.emit_ids.to(scores.device)
        out = torch.full_like(scores, NEG_INF)
        out[..., emit] = scores[..., emit]
        return out

    # -- sampling ----------------------------------------------------------------------------------
    def step(self, input_ids: torch.Tensor, scores: torch.Tensor, start: int) -> torch.Tensor:
        """Generation: ids so far [R, t] (completions begin at column ``start``), the next token's logits
        [R, V] -> the constrained logits (what ``Policy.generate``'s logits processor returns)."""
        if not self.walk:
            return self._apply_plain(scores)
        starts = torch.full((input_ids.shape[0],), start, dtype=torch.long, device=input_ids.device)
        pos, frames, nxt = self._walk_state(input_ids, starts)
        return self._apply_walk(scores, pos[:, -1], frames[:, -1], nxt[:, -1])

    # -- scoring -----------------------------------------------------------------------------------
    def constrain(self, logits: torch.Tensor, input_ids: torch.Tensor, predicts: torch.Tensor) -> torch.Tensor:
        """logits [B, L, V] of a forward over input_ids [B, L]; predicts [B, L] bool: the positions whose
        logits predict a completion token (the position before it). Those get the rule, others stay as
        they are. Returns [B, L, V]."""
        if not self.walk:
            return torch.where(predicts[..., None], self._apply_plain(logits), logits)
        L = input_ids.shape[1]
        ar = torch.arange(L, device=input_ids.device)
        # the first completion token is predicted from the position before it
        start = torch.where(predicts, ar, L).min(1).values + 1
        pos, frames, nxt = self._walk_state(input_ids, start)
        return torch.where(predicts[..., None], self._apply_walk(logits, pos, frames, nxt), logits)

    def token_log_probs(self, logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                        temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-token scores of the completion under the rule, as a trainer needs them.

        logits [B, L, V] over input_ids [B, L]; labels [B, L] (-100 outside the completion, as TRL and
        transformers mark them). Returns [B, L-1] tensors, zero where the next label is -100:
        ``log_probs`` (of each next label, under softmax(rule(logits) / temperature)), ``entropy``,
        ``mean_logits`` (mean constrained logit over the tokens the rule allows), ``is_top1``,
        ``log_sum_sq_probs`` (log sum p^2, for WPO), and ``label_mask``.
        """
        target = labels[:, 1:]
        mask = target != -100
        constrained = self.constrain(logits[:, :-1].float(), input_ids[:, :-1], mask) / temperature
        logp = torch.log_softmax(constrained, dim=-1)
        picked = logp.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
        with torch.no_grad():
            p = logp.exp()
            finite = torch.isfinite(constrained)
            mean_logits = torch.where(finite, constrained, 0.0).sum(-1) / finite.sum(-1).clamp_min(1)
            out = {"entropy": torch.special.entr(p).sum(-1), "mean_logits": mean_logits,
                   "is_top1": constrained.argmax(-1) == target, "log_sum_sq_probs": torch.logsumexp(2 * logp, -1)}
        out = {k: torch.where(mask, v, torch.zeros_like(v)) for k, v in out.items()}
        # masked positions: 0, not the (possibly -inf) log-prob of a padding label
        out["log_probs"] = torch.where(mask, picked, torch.zeros_like(picked))
        out["label_mask"] = mask
        return out


def completion_log_probs(lm, rule: EmitRule, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         labels: torch.Tensor, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """One forward of ``lm`` over right-padded input_ids [B, L] and the completion's per-token scores under
    ``rule`` (``EmitRule.token_log_probs``: [B, L-1] tensors, zero outside the completion)."""
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return rule.token_log_probs(logits, input_ids, labels, temperature)


class RuleProcessor:
    """A ``generate`` logits processor: the next token's logits under ``rule`` (completions start after the
    prompt, i.e. at the input's length when generation begins)."""

    def __init__(self, rule: EmitRule):
        self.rule = rule
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        return self.rule.step(input_ids, scores, self.start)
