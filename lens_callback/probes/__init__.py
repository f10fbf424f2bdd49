"""Mechanistic-interpretability probes for any `transformer_lens.HookedTransformer`.

Probes return named tensors on the model's device; a `ProbeRunner` runs all enabled probes with
one shared forward per probe batch (see `lens_callback.probes.runner`). Each probe also has a
standalone function, e.g. ``induction_score(model, tokens)``.

Built-in probes (registry name: class, batch, results):

* ``induction``: `InductionProbe`, repeated, ``[n_layers, n_heads]``
* ``duplicate_token``: `DuplicateTokenProbe`, repeated, ``[n_layers, n_heads]``
* ``prev_token``: `PreviousTokenProbe`, repeated, ``[n_layers, n_heads]``
* ``attn_entropy``: `AttentionEntropyProbe`, text, ``[n_layers, n_heads]``
* ``logit_lens``: `LogitLensProbe`, text, ``logit_lens/{loss,kl,top1}`` ``[n_layers + 1]``
* ``icl_score``: `ICLScoreProbe`, text, ``icl_score``, ``icl_score/{early_loss,late_loss}``
* ``repeated_loss``: `RepeatedLossProbe`, repeated, ``repeated_loss``,
  ``repeated_loss/first_half``
* ``q_composition``, ``k_composition``, ``v_composition``: `QCompositionProbe`, `KCompositionProbe`,
  `VCompositionProbe`, from the weights (no forward), ``[n_layers, n_heads]``
* ``copying``: `CopyingProbe`, from the weights (no forward; eigenvalues on the host), ``[n_layers, n_heads]``
"""

from lens_callback.probes.attention import (
    AttentionWorkspace,
    lean_attention,
    lean_attention_unsupported,
    pack_attention_weights,
    verify_lean_attention,
)
from lens_callback.probes.attention_entropy import AttentionEntropyProbe, attention_entropy
from lens_callback.probes.base import (
    BATCH_KINDS,
    MAIN_KEY,
    PROBES,
    AttentionPatternProbe,
    BatchKind,
    DiagonalAttentionProbe,
    LossProbe,
    Probe,
    WeightsProbe,
    available_probes,
    make_probe,
    register_probe,
    unregister_probe,
)
from lens_callback.probes.composition import (
    CompositionProbe,
    KCompositionProbe,
    QCompositionProbe,
    VCompositionProbe,
    composition_scores,
)
from lens_callback.probes.copying import CopyingProbe, copying_scores
from lens_callback.probes.duplicate_token import DuplicateTokenProbe, duplicate_token_score
from lens_callback.probes.icl_score import ICLScoreProbe, icl_score
from lens_callback.probes.induction import InductionProbe, induction_score
from lens_callback.probes.inputs import (
    ProbeInputs,
    TokenData,
    make_probe_inputs,
    repeated_tokens,
    text_batch,
    token_pool_from_data,
)
from lens_callback.probes.logit_lens import LogitLensProbe, evenly_spaced_positions, logit_lens
from lens_callback.probes.previous_token import PreviousTokenProbe, previous_token_score
from lens_callback.probes.repeated_loss import RepeatedLossProbe, repeated_loss
from lens_callback.probes.runner import ProbeRunner, per_token_loss, run_probe

__all__ = [
    "BATCH_KINDS",
    "MAIN_KEY",
    "PROBES",
    "AttentionEntropyProbe",
    "AttentionWorkspace",
    "AttentionPatternProbe",
    "CompositionProbe",
    "CopyingProbe",
    "DiagonalAttentionProbe",
    "LossProbe",
    "BatchKind",
    "DuplicateTokenProbe",
    "ICLScoreProbe",
    "InductionProbe",
    "KCompositionProbe",
    "LogitLensProbe",
    "PreviousTokenProbe",
    "Probe",
    "ProbeInputs",
    "ProbeRunner",
    "QCompositionProbe",
    "RepeatedLossProbe",
    "TokenData",
    "VCompositionProbe",
    "WeightsProbe",
    "attention_entropy",
    "available_probes",
    "composition_scores",
    "copying_scores",
    "duplicate_token_score",
    "evenly_spaced_positions",
    "icl_score",
    "induction_score",
    "lean_attention",
    "lean_attention_unsupported",
    "pack_attention_weights",
    "logit_lens",
    "make_probe",
    "make_probe_inputs",
    "per_token_loss",
    "previous_token_score",
    "register_probe",
    "unregister_probe",
    "repeated_loss",
    "repeated_tokens",
    "run_probe",
    "text_batch",
    "token_pool_from_data",
    "verify_lean_attention",
]
