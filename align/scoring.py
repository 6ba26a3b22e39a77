"""TRL's trainers score sequences under the policy's emit rule (models/walk.py), not the full softmax.

TRL 1.x gives a policy (and a reference) a fused LM head when it builds a DPO or GRPO trainer
(``trl.trainer.utils.add_fused_lm_head``): ``model(..., labels=labels, fused_lm_head=True)`` returns
each label's log-prob under the *whole* vocabulary's softmax. Our sampler never draws from that: it
draws under the rule (codec tokens only; the interleaved walk), so a trainer scoring with the full
softmax can earn its DPO margin by moving mass the sampler never sees. ``rule_scoring(rule)`` makes
the trainers built inside it install ``rule_head`` instead: the same protocol and output fields
(log_probs, entropy, mean_logits, is_top1, log_sum_sq_probs, label_mask, loss), computed from the
model's logits under the rule. TRL's reference precompute runs inside the trainer's constructor, so
the head has to be in place then, which is why this swaps the name the trainer modules call.

    with rule_scoring(policy.emit_rule):
        trainer = DPOTrainer(...)        # policy, reference and precomputed reference all under the rule
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types

# The TRL modules whose trainers add a fused head (each imported the helper by name).
_TRAINER_MODULES = ("trl.trainer.dpo_trainer", "trl.trainer.grpo_trainer")


def rule_head(model, rule, temperature: float = 1.0) -> None:
    """Give ``model`` TRL's fused-head protocol, scored under ``rule``: ``model(..., labels=labels,
    fused_lm_head=True)`` -> per-token fields [B, L-1] of the labels; without the flag, the model's own forward.

    The logits are materialised ([B, L, V]; at a 7B model's 33k vocabulary and 2k tokens that is 0.26 GB per
    sequence in float32), which the rule needs: its walk pools and masks whole rows of them. The new forward
    shows the original's signature: ``generate`` and the Trainer read ``inspect.signature(model.forward)`` (does
    it take ``logits_to_keep``, ``attention_mask``, loss kwargs) and would otherwise see only ``*args``.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    original = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return original(*args, **kwargs, **extra)
        if shift_labels is not None:
            raise ValueError("scoring under the emit rule needs whole sequences; context/sequence parallelism "
                             "(pre-shifted labels) is not supported")
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        kwargs["use_cache"] = False
        logits = original(*args, **kwargs).logits
        scored = rule.token_log_probs(logits, input_ids, labels, temperature)
        n = scored["label_mask"].sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-scored["log_probs"].sum() / n, **scored)

    functools.update_wrapper(forward, original)
    # ``original`` is bound (no ``self``); the bound method made below drops the first parameter it is shown
    sig = inspect.signature(original)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    model.forward = types.MethodType(forward, model)


@contextlib.contextmanager
def rule_scoring(rule, override_temperature: float | None = None):
    """Within this block, TRL's DPO and GRPO trainers give their models ``rule_head`` in place of the fused
    full-softmax head (same arguments: a GRPO trainer passes its sampling temperature;
    ``override_temperature`` replaces it)."""
    import importlib

    modules = [importlib.import_module(name) for name in _TRAINER_MODULES]
    missing = [m.__name__ for m in modules if not hasattr(m, "add_fused_lm_head")]
    if missing:
        import trl

        raise RuntimeError(f"trl {trl.__version__} builds its trainers without add_fused_lm_head ({missing}); "
                           "speechalign scores under the emit rule through it: install trl>=1.16,<2")

    def install(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        rule_head(model, rule, temperature if override_temperature is None else override_temperature)

    saved = {m: m.add_fused_lm_head for m in modules}
    for m in modules:
        m.add_fused_lm_head = install
    try:
        yield
    finally:
        for m, fn in saved.items():
            m.add_fused_lm_head = fn
