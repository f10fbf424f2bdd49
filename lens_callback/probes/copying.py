"""The copying score: how much a head's OV circuit maps each token to itself, from the weights.

Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits" (Anthropic): a head that attends to a
token ``t`` raises, through its OV circuit alone, the logits ``W_E[t] W_V W_O W_U`` (the full OV circuit
``W_E W_V W_O W_U``, ``[d_vocab, d_vocab]``, of rank at most ``d_head``). A copying head raises ``t``'s own
logit: its full OV circuit's eigenvalues are mostly positive. The score is their positivity,

    sum(eigenvalues).real / sum(|eigenvalues|)    in [-1, 1],

TransformerLens's (Main_Demo, Exploratory_Analysis_Demo): ``full_OV_circuit = model.W_E @
FactoredMatrix(W_V, W_O) @ model.W_U``, ``eig = full_OV_circuit.eigenvalues``, ``eig.sum(-1).real /
eig.abs().sum(-1)``. 1 for a head that copies every token it attends to (its circuit a positive multiple of
the identity on the tokens it writes), -1 for one that suppresses them; an induction head both prefix-matches
(the ``induction`` probe) and copies (Olsson et al. 2022). The nonzero eigenvalues of ``A B`` are those of
``B A``: the score reads the ``[d_head, d_head]`` matrix ``W_O (W_U W_E) W_V``, as ``FactoredMatrix.eigenvalues``
does.

The weights are taken as TransformerLens's ``process_weights_`` leaves them by default, the model itself not
changed: ``W_V`` and ``W_O`` as the composition scores take them (`lens_callback.probes.composition`: ``ln1``'s
scale folded into ``W_V``; in a LayerNorm model ``W_V`` centred over ``d_model`` and ``W_O`` over its output),
``ln_final``'s scale folded into ``W_U`` (and, with LayerNorm, ``W_U`` centred over ``d_model``), ``W_E``
centred over ``d_model`` in a LayerNorm model (``center_writing_weights``) and ``W_U`` centred over the
vocabulary (``center_unembed``); with ``W_O`` and ``W_V`` centred, the centring of ``W_E`` and ``W_U`` over
``d_model`` changes nothing but the rounding: it is done on the ``[d_model, d_model]`` circuit ``W_U W_E``
(centred once over each dimension), which takes their large mean out before it meets the heads. The centring over
the vocabulary is done on both ``W_E`` and ``W_U`` before they meet, in copies of a block of tokens at a time
(`EMBEDDING_BLOCK_ELEMENTS`): as a rank-1 correction of their product it cancelled in float32 where they share a
large mean over the vocabulary, as a trained model's embeddings do (review: scores 1e-2 to 6e-2 off float64's
where the means were 200x the spread; 1e-7 now, as with no mean). One layer at a time (issue P4: every layer's,
folded at once, peaked at 86 MiB at GPT-2 small's shape and 6.3 GB at an 8B model's): in a model whose norm
centres, that layer's ``W_V`` and ``W_O`` folded (`folded_attention_weights`), 11 MiB and 320 MiB, the circuit,
the two, their ``W_O C`` and the result (centring the circuit alone, the heads' weights read un-centred, left the
rounding of their means times its sums: a head writing along the ones direction only, its centred ``W_O`` zero,
scored 1.0 for 0); with other norms they are read in place, ``ln1``'s
scale on the columns of each layer's ``W_O C``, 7 MiB and 194 MiB. What the score leaves out, as
TransformerLens's demo does:
positional embeddings (the circuit is token to token), biases, MLPs, every other layer's heads (the path from
the embedding through earlier layers, and from the head through later ones), the norms' per-token scale and
output soft-capping. A head whose circuit is zero (a pruned head) scores 0, as it composes with nothing in the
composition scores (0 / 0 there too; TransformerLens's: NaN); a head whose weights are not finite scores NaN.

The eigenvalues need the host: ``torch.linalg.eig`` synchronises a GPU with it. So the probe's `compute`
stays on the device and returns the ``[n_layers, n_heads, d_head, d_head]`` matrices (one ``W_U @ W_E``,
``d_model^2 * d_vocab`` multiply-adds, 30 G at GPT-2 small's 50,257 tokens, on the centred blocks; then
``n_layers * d_model^2 * (d_model + d_head)`` for the heads, 5.9 G there), which travel to the host with every
other result in the probe step's one transfer (float32: 2.4 MB for GPT-2 small), and its host step
(`Probe.on_host`) takes the eigenvalues there in float64 (`eigenvalue_positivity`): TransformerLens's numbers
to about 1e-6 (tested to 1e-5), the float32 transfer's rounding."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from typing_extensions import override

from lens_callback.probes.base import MAIN_KEY, WeightsProbe, register_probe
from lens_callback.probes.composition import (
    _CENTRED_NORMS,
    _check_ln1_alike,
    _fold_dtype,
    _ln1_scale,
    check_composition_model,
    folded_attention_weights,
)
from lens_callback.probes.runner import in_probe_modes

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

EMBEDDING_BLOCK_ELEMENTS = 2**22
"""The most elements of ``W_E`` (and of ``W_U``) that `copying_matrices` copies at once (16 MiB each in float32):
it centres them over the vocabulary in float32 copies (float64 for a float64 model) of a block of at most
``d_model`` tokens, no larger than the ``[d_model, d_model]`` circuit it holds anyway, and fewer where this bound
is smaller (past 2,048 wide). Neither is copied whole: GPT-2 small's are 154 MB each."""


def check_copying_model(cfg: HookedTransformerConfig) -> None:
    """Refuses a model whose copying score is not defined, or whose weights it cannot fold like
    ``process_weights_``.

    Raises:
        ValueError: for a post-norm architecture or a normalisation it does not know (as
            `check_composition_model`), an output vocabulary other than the input one (no token maps to
            itself), or LayerNorm blocks with an RMS final norm (``final_rms``: ``process_weights_`` then
            centres no writing weight).
    """
    check_composition_model(cfg, what="copying scores")
    if cfg.d_vocab_out != cfg.d_vocab:
        raise ValueError(f"copying scores map each token to itself: they need d_vocab_out == d_vocab, got "
                         f"d_vocab_out={cfg.d_vocab_out}, d_vocab={cfg.d_vocab}")
    if getattr(cfg, "final_rms", False) and cfg.normalization_type in _CENTRED_NORMS:
        raise ValueError(f"copying scores fold the final norm like the blocks' ones; final_rms=True with "
                         f"normalization_type={cfg.normalization_type!r} mixes an RMS final norm with LayerNorm blocks")


@in_probe_modes  # no autograd graph over the model's parameters, no caller's autocast
def copying_matrices(model: HookedTransformer) -> Float[Tensor, "n_layers n_heads d_head d_head"]:
    """Each head's ``W_O (W_U W_E) W_V``, ``[d_head, d_head]``: the full OV circuit's nonzero eigenvalues are
    this matrix's (module docstring), on the weights as ``process_weights_`` leaves them, on the model's device.

    Returns:
        ``[n_layers, n_heads, d_head, d_head]``, float32 (float64 for a float64 model).

    Raises:
        ValueError: for a model `check_copying_model` refuses.
    """
    check_copying_model(model.cfg)
    _check_ln1_alike(model)
    cfg = model.cfg
    n_layers, n_heads, d_model, d_head = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
    w_e, w_u = model.W_E, model.W_U  # (V, dm), (dm, V): never copied whole (GPT-2's are 154 MB each)
    d_vocab = w_e.shape[0]
    dtype = _fold_dtype(model)  # float32 or float64
    # D W_U (I - 11^T / V) W_E: ln_final's scale D, W_U centred over the vocabulary. Centring one side is enough in
    # exact arithmetic, not in float32: a trained model's W_E and W_U share a large mean over the vocabulary
    # (anisotropic embeddings), and the centring as a rank-1 correction of the product W_U W_E (sums of V terms of
    # their means' size) cancelled: scores 1e-2 to 6e-2 off float64's where the means were 200x the spread
    # (review). Both are centred before they meet, W_U' W_E' with W_U' = W_U - mean_u 1^T and W_E' = W_E - 1
    # mean_e^T, a block of tokens at a time, each block a copy in the dtype of d_model tokens or fewer: no larger
    # than the circuit, so the step's peak stays one layer's folded weights (a bfloat16 model's embeddings copied
    # whole to float32 were 2 x 154 MB at GPT-2 small's shape, 2 x 2.1 GB at a 128k-token, 4,096-wide model's).
    # The means' rounding leaves W_U' and W_E' sums over the vocabulary of its size, not 0: W_U' (I - 11^T / V)
    # W_E' = W_U (I - 11^T / V) W_E exactly, and its rank-1 correction, outer(W_U' 1, W_E'^T 1) / V, is small.
    # In a LayerNorm model, centring W_E and W_U over d_model as well changes nothing here: W_O's rows and
    # W_V's columns are centred over d_model (below)
    rows = max(1, min(d_model, EMBEDDING_BLOCK_ELEMENTS // d_model))
    # the means in the dtype (MPS has no float64): how far they are rounded matters only against the spread, as
    # W_U' and W_E' keep what is left of them, which the rank-1 correction below takes out. A float32 or float64
    # model's embeddings are summed in place, whole; a bfloat16 or float16 model's a float32 block at a time
    same = w_e.dtype == dtype and w_u.dtype == dtype
    mean_rows = d_vocab if same else rows
    mean_u = torch.zeros(d_model, dtype=dtype, device=w_u.device)
    mean_e = torch.zeros(d_model, dtype=dtype, device=w_e.device)
    for start in range(0, d_vocab, mean_rows):
        mean_u += w_u[:, start:start + mean_rows].to(dtype).sum(dim=-1)
        mean_e += w_e[start:start + mean_rows].to(dtype).sum(dim=0)
    mean_u /= d_vocab
    mean_e /= d_vocab
    circuit = torch.zeros(d_model, d_model, dtype=dtype, device=w_e.device)
    sum_u, sum_e = torch.zeros_like(mean_u), torch.zeros_like(mean_e)  # W_U' 1, W_E'^T 1: the means' rounding
    ones = torch.ones(min(rows, d_vocab), dtype=dtype, device=w_e.device)
    for start in range(0, d_vocab, rows):
        block_u = (w_u[:, start:start + rows] - mean_u[:, None]).to(dtype)  # (dm, rows): a copy, in the dtype
        block_e = (w_e[start:start + rows] - mean_e).to(dtype)  # (rows, dm)
        circuit.addmm_(block_u, block_e)
        sum_u.addmv_(block_u, ones[:block_e.shape[0]])  # one operator each, not a sum and an add
        sum_e.addmv_(block_e.T, ones[:block_e.shape[0]])
        del block_u, block_e  # before the next block's
    circuit.addr_(sum_u, sum_e, alpha=-1.0 / d_vocab)  # in place: the outer product would be one more (dm, dm)
    scale = getattr(getattr(model, "ln_final", None), "w", None)
    if isinstance(scale, Tensor):
        circuit *= scale.to(dtype)[:, None]
    # the heads' weights as `folded_attention_weights` folds them, a layer at a time (every layer's, folded at once,
    # were 2 x 2 GB at an 8B shape). In a model whose norm centres, W_O's rows and W_V's columns are centred over
    # d_model (W_O P, P D1 W_V with P = I - 11^T / d_model): those are folded copies of one layer's, as the
    # circuit's P C P alone, the heads' weights read in place, left the rounding of their means over d_model times
    # its sums (zero only in exact arithmetic): a head writing only along the ones direction (its centred W_O zero)
    # scored 1.0 in float64 for 0. P C P as well takes out the circuit's own large mean (W_E's, W_U's over d_model)
    # before it meets the heads. Other norms centre nothing: their W_O and W_V are read in place, ln1's scale D1
    # (D1 W_V) multiplying the columns of W_O C
    centred = cfg.normalization_type in _CENTRED_NORMS
    if centred:
        circuit -= circuit.mean(dim=0, keepdim=True)
        circuit -= circuit.mean(dim=1, keepdim=True)
    matrices = torch.empty(n_layers, n_heads, d_head, d_head, dtype=dtype, device=circuit.device)
    for layer, block in enumerate(model.blocks):
        # each head's W_O C W_V: (H*dh, dm) @ (dm, dm), then a batched (dh, dm) @ (dm, dh) per head
        if centred:
            w_v, w_o = folded_attention_weights(model, layer, "W_V", "W_O")  # ln1's scale folded into w_v
            written = w_o.reshape(-1, d_model) @ circuit  # (H*dh, dm)
            del w_o
        else:
            w_v = block.attn.W_V.to(dtype)  # read in place
            written = block.attn.W_O.to(dtype).reshape(-1, d_model) @ circuit  # (H*dh, dm)
            gamma = _ln1_scale(model, layer, dtype)
            if gamma is not None:
                written *= gamma
        matrices[layer] = written.view(n_heads, d_head, d_model) @ w_v
        del written, w_v  # before the next layer's
    return matrices


def eigenvalue_positivity(matrices: np.ndarray) -> np.ndarray:
    """``sum(eig).real / sum(|eig|)`` of each ``[n, n]`` matrix of ``matrices`` (``[..., n, n]``), on the host in
    float64: 0 where every eigenvalue is 0 (a zero matrix), NaN where the matrix is not finite.

    Returns:
        ``[...]`` float64 in [-1, 1].
    """
    matrices = np.asarray(matrices, dtype=np.float64)
    finite = np.isfinite(matrices).all(axis=(-2, -1))
    # NumPy refuses a matrix holding NaN or inf: those are decomposed as zeros and scored NaN below
    eig = np.linalg.eigvals(np.where(finite[..., None, None], matrices, 0.0))
    total = np.abs(eig).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(total > 0, eig.sum(axis=-1).real / total, 0.0)
    return np.where(finite, score, np.nan)


def copying_scores(model: HookedTransformer) -> Float[Tensor, "n_layers n_heads"]:
    """Every head's copying score (module docstring): ``copying_matrices`` moved to the host and
    `eigenvalue_positivity` there, in float64, TransformerLens's route's numbers.

    Returns:
        ``[n_layers, n_heads]`` float64, on the CPU.
    """
    matrices = copying_matrices(model).double().cpu().numpy()
    return torch.from_numpy(eigenvalue_positivity(matrices))


@register_probe
class CopyingProbe(WeightsProbe):
    """Per head, its copying score: the eigenvalue positivity of its full OV circuit (module docstring).

    Result: ``copying`` ``[n_layers, n_heads]`` in [-1, 1]. Reads the weights only: no batch is drawn for it.
    `compute` returns the heads' ``[n_layers, n_heads, d_head, d_head]`` matrices on the device and `on_host`
    turns them into the scores after the probe step's one transfer (the eigenvalues would synchronise a GPU).
    """

    name: ClassVar[str] = "copying"
    per_head: ClassVar[bool] = True
    heatmap_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)

    @override
    def check_config(self, cfg: HookedTransformerConfig) -> None:
        try:
            check_copying_model(cfg)
        except ValueError as err:
            raise ValueError(f"probe {self.name!r}: {err}") from None

    @override
    def compute(self) -> dict[str, Tensor]:
        return {MAIN_KEY: copying_matrices(self.model)}  # (L, H, dh, dh), finished in on_host

    @override
    def on_host(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {MAIN_KEY: eigenvalue_positivity(values[MAIN_KEY])}
