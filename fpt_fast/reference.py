"""The pure-PyTorch reference of FPT / FPT+: the oracle every fast path is tested against.

Op twins (same signatures as fpt_fast.ops): token_importance, attention_with_importance,
select_tokens, prompt_attention. Model twins (on an fpt_fast.FPT's weights): extract_features,
fusion_forward, side_forward, fpt_forward. The method they implement is docs/method.md.
"""
from .model.reference import extract_features, fpt_forward, fusion_forward, side_forward
from .ops.reference import attention_with_importance, prompt_attention, select_tokens, token_importance

__all__ = ["token_importance", "attention_with_importance", "select_tokens", "prompt_attention",
           "extract_features", "fusion_forward", "side_forward", "fpt_forward"]
