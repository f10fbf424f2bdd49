"""Tests for snapshots (save / list / load / prune / probe inputs), nanoGPT ``ckpt.pt`` import and ``lens-probe``.

Real objects throughout: tiny ``nanogpt_model.GPT``s, real safetensors and JSON files under
``tmp_path``, checkpoints written with ``torch.save`` the way nanoGPT's ``train.py`` writes them,
TensorBoard event files read back with ``read_metrics``. Nothing is mocked.
"""

from __future__ import annotations

import ast
import csv
import errno
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lens_callback.posthoc as posthoc_module
import lens_callback.snapshots as snapshots_module
from lens_callback.checkpoints import CheckpointError, load_nanogpt_checkpoint, read_nanogpt_checkpoint
from lens_callback.convert import ConversionError, to_hooked_transformer
from lens_callback.measure import DEFAULT_PROBES, build_runner, measure
from lens_callback.metrics import read_metrics
from lens_callback.posthoc import iter_reprobe, main, reprobe
from lens_callback.probes import ProbeInputs, composition_scores, make_probe_inputs
from lens_callback.snapshots import (
    SnapshotError,
    SnapshotPruneError,
    check_step,
    list_snapshots,
    scan_snapshots,
    load_probe_inputs,
    load_snapshot,
    load_snapshot_weights,
    prune_snapshots,
    read_snapshot_header,
    save_probe_inputs,
    save_snapshot,
)
from nanogpt_model import GPT, GPTConfig
from conftest import readme_block, readme_commands, write_nanogpt_data_dir

TOKENS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
PROBE_SETTINGS: dict[str, Any] = {
    "probes": list(DEFAULT_PROBES),
    "probe_options": {"logit_lens": {"max_positions": 8}},
    "max_batch_tokens": None,
    "per_head_scalars": True,
}


def make_gpt(config: GPTConfig, seed: int = 0) -> GPT:
    """A GPT whose every parameter (LayerNorm gains and biases included) is random, so a wrong map shows."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def snapshot(root: Path, step: int, model: GPT, **kwargs: Any) -> Path:
    converter = "nanogpt-modern" if model.config.architecture == "modern" else "nanogpt"
    return save_snapshot(root, step, converter=converter, model_config=model.config.to_dict(),
                         state_dict=model.state_dict(), **kwargs)


def live_logits(model: GPT, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, all_positions=True)[0]


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))


# -- save / load parity --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [dict(bias=True), dict(bias=False, tie_weights=False), dict(architecture="modern")],
    ids=["gpt2-bias-tied", "gpt2-nobias-untied", "modern"],
)
def test_save_load_snapshot_matches_live_logits(tmp_path: Path, tiny_config: Callable[..., GPTConfig], overrides: dict) -> None:
    model = make_gpt(tiny_config(**overrides))
    path = snapshot(tmp_path, 3, model, metadata={"probe_settings": PROBE_SETTINGS})

    assert path == tmp_path / "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "config.json", "model.safetensors"]
    hooked = load_snapshot(path)
    torch.testing.assert_close(hooked(TOKENS), live_logits(model), atol=1e-5, rtol=0)

    config = json.loads((path / "config.json").read_text())
    assert config["format_version"] == 1 and config["step"] == 3 and config["dtype"] == "float32"
    assert config["model_config"] == model.config.to_dict()
    assert config["metadata"] == {"probe_settings": PROBE_SETTINGS}
    assert set(config["versions"]) == {"torch", "transformer_lens", "lightning", "lens_callback"}
    assert config["versions"]["torch"] and config["created"]


@pytest.mark.parametrize("overrides", [dict(bias=True), dict(architecture="modern")], ids=["gpt2", "modern"])
def test_a_reloaded_snapshot_generates_what_nanogpt_generates(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                             overrides: dict) -> None:
    """The README's advice for TransformerLens's ``generate``: greedy decoding with
    ``use_past_kv_cache=False`` and ``stop_at_eos=False`` gives nanoGPT's own greedy tokens (``top_k=1``);
    without the latter, TransformerLens asks for a tokenizer's end-of-text token (posthoc review)."""
    model = make_gpt(tiny_config(**overrides)).eval()
    hooked = load_snapshot(snapshot(tmp_path, 0, model))
    prompt = TOKENS[:1, :8]
    with torch.no_grad():
        ours = model.generate(prompt, 6, top_k=1, generator=torch.Generator().manual_seed(0))
    theirs = hooked.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, use_past_kv_cache=False,
                             verbose=False)
    assert theirs.tolist() == ours.tolist()
    with pytest.raises(AssertionError, match="eos_token_id"):
        hooked.generate(prompt, max_new_tokens=1, use_past_kv_cache=False, verbose=False)


def test_a_snapshot_recording_its_tokenizer_loads_with_it_and_one_without_loads_as_before(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    """``metadata.tokenizer`` (what LensCallback records for a run on text) gives the reloaded model a tokenizer:
    ``to_tokens`` gives the run's byte ids and no BOS, and ``generate`` on text, with its defaults (the key-value
    cache among them), decodes greedily as nanoGPT does. A snapshot without it loads as before: no tokenizer."""
    model = make_gpt(tiny_config(vocab_size=256)).eval()
    hooked = load_snapshot(snapshot(tmp_path, 1, model, metadata={"tokenizer": {"kind": "byte"}}))
    prompt = "déf f(x):"
    assert hooked.to_tokens(prompt).tolist() == [list(prompt.encode())] and not hooked.cfg.default_prepend_bos
    with torch.no_grad():
        ours = model.generate(torch.tensor([list(prompt.encode())]), 6, top_k=1, generator=torch.Generator().manual_seed(0))
    assert hooked.generate(prompt, max_new_tokens=6, do_sample=False, verbose=False, return_type="tokens").tolist() == \
        ours.tolist()
    assert isinstance(hooked.generate(prompt, max_new_tokens=2, verbose=False), str)
    assert json.loads((tmp_path / "step-00000001" / "config.json").read_text())["metadata"] == {
        "tokenizer": {"kind": "byte"}}

    plain = load_snapshot(snapshot(tmp_path, 2, model))
    assert plain.tokenizer is None and plain.cfg.tokenizer_prepends_bos is None
    with pytest.raises(AssertionError, match="Cannot use to_tokens without a tokenizer"):
        plain.to_tokens(prompt)


def test_a_snapshot_without_a_record_takes_a_users_own_hugging_face_tokenizer_from_a_directory(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    """The README's route for a run on ids no record describes (GPT-2 BPE): TransformerLens's ``set_tokenizer``
    with ``AutoTokenizer.from_pretrained`` of a ``save_pretrained`` directory, offline; no BOS unless asked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    backend.train_from_iterator(["the cat sat on the mat"] * 20, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(tmp_path / "tokenizer")
    hooked = load_snapshot(snapshot(tmp_path / "snapshots", 0, make_gpt(tiny_config(vocab_size=300))))
    assert hooked.tokenizer is None
    hooked.set_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "tokenizer"))
    ids = backend.encode("the cat").ids
    assert hooked.to_tokens("the cat").tolist() == [ids] and len(ids) < len("the cat")  # merged: the BPE's ids
    assert hooked.to_tokens("the cat", prepend_bos=True).tolist() == [[backend.token_to_id("<|endoftext|>"), *ids]]
    assert hooked.generate("the cat", max_new_tokens=3, verbose=False).startswith("the cat")


def test_a_second_model_takes_a_new_tokenizer_from_the_record_not_the_snapshots_tokenizer_object(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    """The README's advice for a second model (TransformerLens review): TransformerLens's ``set_tokenizer`` names
    ``<|endoftext|>`` the BOS token of a tokenizer without one, in place, so that handing the loaded model's
    tokenizer to another model gave both ``prepend_bos=True`` its 13 bytes; a tokenizer attached from the
    record leaves the loaded model's alone."""
    from transformer_lens import HookedTransformer

    from lens_callback.snapshots import read_snapshot_config
    from lens_callback.tokenizer import attach_tokenizer

    path = snapshot(tmp_path, 0, make_gpt(tiny_config(vocab_size=256)), metadata={"tokenizer": {"kind": "byte"}})
    hooked = load_snapshot(path)
    HookedTransformer(hooked.cfg, tokenizer=hooked.tokenizer)
    assert hooked.to_tokens("ab", prepend_bos=True).tolist() == [list(b"<|endoftext|>ab")]

    hooked = load_snapshot(path)
    other = HookedTransformer(hooked.cfg)
    assert other.cfg is hooked.cfg and not other.cfg.init_weights  # the README's two notes on HookedTransformer(cfg)
    attach_tokenizer(other, read_snapshot_config(path)["metadata"]["tokenizer"])
    for model in (hooked, other):
        assert model.tokenizer.bos_token is None
        try:
            assert model.to_tokens("ab", prepend_bos=True).tolist() == [[97, 98]]
        except TypeError:  # TransformerLens before 3.8 concatenates the missing BOS token to the text
            pass


@pytest.mark.parametrize("overrides", [dict(bias=True), dict(architecture="modern")], ids=["gpt2", "modern"])
def test_transformerlens_weight_processing_keeps_a_snapshots_log_probs_and_makes_its_attributions_sum(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], overrides: dict
) -> None:
    """The README's note on TransformerLens's tools (TransformerLens review): a snapshot loads unprocessed, where
    ``apply_ln_to_stack`` leaves the norms' weights out and the parts of ``decompose_resid`` miss the logits
    (the logit lens of ``accumulated_resid`` recomputes ``ln_final``); after ``process_weights_()`` (LayerNorm
    and RMSNorm folded, biases and the converter's zeros alike) they sum to the logits and the log-probabilities
    are those of the model as trained. Weight processing computes in float32, a float64 model's too."""
    path = snapshot(tmp_path, 0, make_gpt(tiny_config(**overrides)))
    hooked = load_snapshot(path)
    expected = hooked(TOKENS)

    def parts_sum(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cache = model.run_with_cache(TOKENS)
        parts = cache.apply_ln_to_stack(cache.decompose_resid(), layer=None)
        lens = cache.accumulated_resid(apply_ln=True)[-1]
        return logits, torch.stack([parts.sum(0) @ model.W_U + model.b_U, lens @ model.W_U + model.b_U])

    logits, (summed, lens) = parts_sum(hooked)
    torch.testing.assert_close(lens, logits, atol=1e-5, rtol=0)
    assert (summed - logits).abs().max() > 1e-3  # make_gpt's norm weights are not 1: left out
    hooked.process_weights_()
    assert hooked.cfg.normalization_type == ("LNPre" if overrides.get("bias") else "RMSPre")
    logits, (summed, lens) = parts_sum(hooked)
    torch.testing.assert_close(logits.log_softmax(-1), expected.log_softmax(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(summed, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(lens, logits, atol=1e-5, rtol=0)
    if overrides.get("architecture") == "modern":
        with pytest.raises(AssertionError, match="rotary"):
            load_snapshot(path).process_weights_(refactor_factored_attn_matrices=True)
        assert not hasattr(hooked, "pos_embed")

    wide = load_snapshot(path, dtype=torch.float64)
    expected = wide(TOKENS).log_softmax(-1)
    wide.process_weights_(center_unembed=False)
    difference = (wide(TOKENS).log_softmax(-1) - expected).abs().max()
    assert wide.W_E.dtype == torch.float64 and difference < 1e-5  # TransformerLens 3.9 folds in float32: about 1e-7


NOT_RECORDS = [  # dicts with a "kind" that are no tokenizer record, and the error naming each
    ({"kind": "gpt2"}, r"a tokenizer record is"),
    ({"kind": "char", "chars": "abca"}, r"a 'char' tokenizer record's 'chars' holds \['a'\] more than once"),
]


@pytest.mark.parametrize(("record", "message"), [
    *NOT_RECORDS,
    ({"kind": "byte"}, r"ValueError: the 'byte' tokenizer record has 256 ids, more than the model's vocabulary "
                       r"d_vocab=64"),
    ({"kind": "bpe", "merges": []}, r"a tokenizer record is"),  # a later version's kind
    ({"kind": "char", "chars": "ab\udcff"}, r"lone surrogates"),  # raised the tokenizers library's TypeError
])
def test_a_snapshots_tokenizer_record_that_gives_no_tokenizer_loads_the_weights_with_a_warning_naming_it(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], record: dict, message: str
) -> None:
    """Written by hand into config.json (save_snapshot refuses the first two: the next test), one that does not
    fit the model's vocabulary, which save_snapshot cannot know, a kind of a later version, or one the tokenizers
    library cannot build. They raised (a SnapshotError, or the library's TypeError for the last), and the
    snapshot's weights could not be loaded at all; the record costs the tokenizer only."""
    model = make_gpt(tiny_config())
    path = snapshot(tmp_path, 0, model, metadata={"tokenizer": {"kind": "byte"}})
    config = json.loads((path / "config.json").read_text())
    config["metadata"]["tokenizer"] = record
    (path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=rf"step-00000000: config.json metadata.tokenizer gives no tokenizer for "
                                         rf"this model \(.*{message}.*\): loaded without a tokenizer") as warned:
        hooked = load_snapshot(path)
    assert hooked.tokenizer is None
    assert [w.filename for w in warned if "metadata.tokenizer" in str(w.message)] == [__file__]  # the caller's line
    torch.testing.assert_close(hooked(TOKENS), live_logits(model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("record", "message"), [
    *NOT_RECORDS,
    ({"kind": "char"}, r"a 'char' tokenizer record has the keys \['chars', 'kind'\]"),
])
def test_save_snapshot_refuses_a_tokenizer_record_that_load_snapshot_would_drop_and_writes_nothing(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], record: dict, message: str
) -> None:
    """It wrote such a record, and only load_snapshot, at the end of a run or a month later, found it out."""
    with pytest.raises(ValueError, match=rf"metadata\['tokenizer'\]: {message}.*load_snapshot would load the "
                                         r"snapshot without a tokenizer"):
        snapshot(tmp_path, 0, make_gpt(tiny_config()), metadata={"tokenizer": record})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["gpt2", ["byte"], 256, {"name": "gpt2", "vocab_size": 50257}])
def test_a_tokenizer_key_of_a_users_own_that_is_no_record_loads_without_a_tokenizer_and_a_warning(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], value: Any
) -> None:
    """``save_snapshot(metadata=...)`` took any plain JSON before the record existed: a user's own
    ``"tokenizer": "gpt2"`` (the name of what they trained with) stopped load_snapshot (diff review), and
    so did a dict of their own without a ``"kind"``, ``{"name": "gpt2", ...}`` (second diff review)."""
    path = snapshot(tmp_path, 0, make_gpt(tiny_config()), metadata={"tokenizer": value})
    with pytest.warns(UserWarning, match=r"step-00000000: config.json metadata.tokenizer holds "
                                         r"\w+( without a 'kind')?, not a tokenizer record .*loaded without a "
                                         r"tokenizer") as warned:
        model = load_snapshot(path)
    assert model.tokenizer is None
    assert [w.filename for w in warned if "metadata.tokenizer" in str(w.message)] == [__file__]  # the caller's line


def test_tied_weights_are_stored_once_and_restored(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    tied = make_gpt(tiny_config())
    path = snapshot(tmp_path / "tied", 0, tied)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        stored = set(f.keys())
    assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored
    config, state_dict = load_snapshot_weights(path)
    assert config["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert state_dict["lm_head.weight"] is state_dict["transformer.wte.weight"]
    assert set(state_dict) == set(tied.state_dict())
    for name, value in tied.state_dict().items():
        torch.testing.assert_close(state_dict[name], value, atol=0, rtol=0)

    untied = make_gpt(tiny_config(tie_weights=False))
    config, state_dict = load_snapshot_weights(snapshot(tmp_path / "untied", 0, untied))
    assert config["aliases"] == {}
    assert not torch.equal(state_dict["lm_head.weight"], state_dict["transformer.wte.weight"])


def test_sharing_is_found_by_storage_not_by_name(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    # "b" is the same view as "a" (an alias); "c" is another view of the same storage (stored apart);
    # "q" and "k" are same-shaped chunks of one packed storage at different offsets (not aliases)
    packed = torch.arange(24.0).reshape(3, 2, 4)
    state_dict = {"a": base, "b": base.view(3, 4), "c": base[1:], "d": base.clone(), "q": packed[0], "k": packed[1]}
    path = save_snapshot(tmp_path, 1, converter="anything", model_config={}, state_dict=state_dict)
    config, loaded = load_snapshot_weights(path)
    assert config["aliases"] == {"b": "a"}
    assert loaded["b"] is loaded["a"] and loaded["c"] is not loaded["a"]
    for name, value in state_dict.items():
        assert torch.equal(loaded[name], value), name


# -- incomplete, corrupt, unwritable --------------------------------------------------------------
def test_list_skips_junk_and_load_refuses_incomplete(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    model = make_gpt(tiny_config())
    snapshot(tmp_path, 5, model)
    incomplete = snapshot(tmp_path, 9, model)
    (incomplete / "COMPLETE").unlink()
    (tmp_path / ".tmp-step-00000011-x").mkdir()
    (tmp_path / "step-xyz").mkdir()
    (tmp_path / "notes.txt").write_text("junk")
    (tmp_path / "step-00000012").write_text("a file, not a dir")
    broken = snapshot(tmp_path, 13, model)
    (broken / "config.json").write_text("{not json")

    assert [info.step for info in list_snapshots(tmp_path)] == [5]
    info = list_snapshots(tmp_path)[0]
    assert info.path == tmp_path / "step-00000005" and info.converter == "nanogpt" and info.created
    with caplog.at_level(logging.WARNING, logger="lens_callback.snapshots"):
        assert list_snapshots(tmp_path / "missing") == []  # a mistyped root: [] and a logged warning
    assert "missing): no such directory" in caplog.text
    with pytest.raises(SnapshotError, match="step-00000009.*incomplete"):
        load_snapshot(incomplete)
    with pytest.raises(SnapshotError, match="config.json"):
        load_snapshot(broken)


def test_snapshots_past_eight_digit_steps_are_listed_in_step_order(tmp_path: Path) -> None:
    """From step 10**8 a directory's name has nine digits and sorts before ``step-99999999`` by name; the
    listing, whose last entry users load as the newest and whose order ``lens-probe`` probes and logs in,
    is by step (mutation review: a listing returned in name order went unnoticed)."""
    weights = {"w": torch.ones(2)}
    steps = [7, 99_999_999, 100_000_000, 1_000_000_000]
    for step in reversed(steps):
        save_snapshot(tmp_path, step, converter="nanogpt", model_config={}, state_dict=weights)
    assert [info.step for info in list_snapshots(tmp_path)] == steps
    assert [info.step for info in scan_snapshots(tmp_path)[0]] == steps
    assert list_snapshots(tmp_path)[-1].path == tmp_path / "step-1000000000"


def test_an_unreadable_snapshot_is_warned_about_once_per_reason(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The callback lists its snapshot directory at every snapshot step (pruning): another run's
    snapshot it cannot read is named once per process and reason, not at every step."""
    model = make_gpt(tiny_config())
    snapshot(tmp_path, 1, model)
    newer = snapshot(tmp_path, 2, model)
    config = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    misplaced = snapshot(tmp_path, 3, model)
    misplaced.rename(tmp_path / "step-00000004")

    with caplog.at_level(logging.WARNING, logger="lens_callback.snapshots"):
        for _ in range(3):
            assert [info.step for info in list_snapshots(tmp_path)] == [1]
            assert prune_snapshots(tmp_path, keep_last=5) == []
        skipped = [r.getMessage() for r in caplog.records if "skipping snapshot" in r.getMessage()]
        assert len(skipped) == 2, skipped
        assert "step-00000002" in skipped[0] and "unsupported format_version 2" in skipped[0]
        assert "step-00000004" in skipped[1] and "says step 3" in skipped[1]

        (newer / "config.json").write_text("{not json")  # another reason: named again, once
        list_snapshots(tmp_path)
        list_snapshots(tmp_path)
        skipped = [r.getMessage() for r in caplog.records if "skipping snapshot" in r.getMessage()]
        assert len(skipped) == 3 and "step-00000002" in skipped[2] and "unreadable or corrupt" in skipped[2]


def test_truncated_weights_raise_snapshot_error_naming_the_file(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    path = snapshot(tmp_path, 1, make_gpt(tiny_config()))
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SnapshotError, match="model.safetensors"):
        load_snapshot(path)
    weights.write_bytes(b"")
    with pytest.raises(SnapshotError, match="model.safetensors"):
        load_snapshot_weights(path)


def test_unknown_converter_lists_available_and_hints_registration(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    model = make_gpt(tiny_config())
    path = save_snapshot(tmp_path, 1, converter="my-arch", model_config=model.config.to_dict(),
                         state_dict=model.state_dict())
    with pytest.raises(SnapshotError, match=r"unknown converter 'my-arch'.*nanogpt.*register_converter.*--import MODULE"):
        load_snapshot(path)
    # every snapshot fails for it: no advice to move them out of the way to probe "the others"; and it is said
    # once for them all, where lens-probe without --import repeated it for each snapshot, up to 20 lines
    # (journey review)
    for step in (2, 3):
        save_snapshot(tmp_path, step, converter="my-arch", model_config=model.config.to_dict(),
                      state_dict=model.state_dict())
    with pytest.raises(SnapshotError, match=r"3 of 3 snapshots cannot be re-probed; nothing was probed:") as info:
        iter_reprobe(tmp_path)
    assert "move them out" not in str(info.value) and "--import MODULE" in str(info.value)
    assert str(info.value).count("unknown converter") == 1, str(info.value)
    assert "3 snapshots (step-00000001 to step-00000003) name an unknown converter 'my-arch'" in str(info.value)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
def test_unwritable_root_raises_oserror_and_leaves_nothing(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    model = make_gpt(tiny_config())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        snapshot(blocker / "snapshots", 1, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]

    # a failure inside the write (safetensors has no complex32) is an OSError; the temporary
    # directory is removed and an earlier snapshot of the same step survives
    root = tmp_path / "root"
    snapshot(root, 2, model)
    bad = {**model.state_dict(), "extra": torch.zeros(2, dtype=torch.complex32)}
    with pytest.raises(OSError, match="step-00000002"):
        save_snapshot(root, 2, converter="nanogpt", model_config=model.config.to_dict(), state_dict=bad)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    torch.testing.assert_close(load_snapshot(root / "step-00000002")(TOKENS), live_logits(model), atol=1e-5, rtol=0)


def test_invalid_arguments_are_rejected_before_writing(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    model = make_gpt(tiny_config())
    for step in (-1, 1.5, True, "7"):
        with pytest.raises(ValueError, match="step"):
            snapshot(tmp_path, step, model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="JSON"):
        snapshot(tmp_path, 1, model, metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_saving_a_step_again_replaces_it(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    first, second = make_gpt(tiny_config(), seed=0), make_gpt(tiny_config(), seed=1)
    snapshot(tmp_path, 4, first)
    path = snapshot(tmp_path, 4, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]
    assert [info.step for info in list_snapshots(tmp_path)] == [4]
    torch.testing.assert_close(load_snapshot(path)(TOKENS), live_logits(second), atol=1e-5, rtol=0)


def test_a_step_name_holding_the_users_files_is_not_replaced(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    model = make_gpt(tiny_config())
    (tmp_path / "step-00000002").write_text("a file of the user's")
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / "analysis.csv").write_text("step,value\n")
    for step in (2, 4):
        with pytest.raises(FileExistsError, match=f"step-0000000{step} exists and holds files other than a snapshot's"):
            snapshot(tmp_path, step, model)
    assert (tmp_path / "step-00000002").read_text() == "a file of the user's"
    assert (tmp_path / "step-00000004" / "analysis.csv").read_text() == "step,value\n"
    # hidden, but the user's: a folder of notes, a hidden file that no file browser writes (snapshots
    # review: any name starting with "." passed as a file browser's, and the folder was deleted)
    for step, hidden in ((12, ".notes/results.txt"), (14, ".git/HEAD"), (16, ".my-notes.txt")):
        kept = tmp_path / f"step-{step:08d}" / hidden
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text("the user's")
        with pytest.raises(FileExistsError, match=f"step-000000{step} exists and holds files other than"):
            snapshot(tmp_path, step, model)
        assert kept.read_text() == "the user's"
    assert leftovers(tmp_path) == []
    # an incomplete snapshot of the step (a write that died) and an empty directory are replaced
    incomplete = snapshot(tmp_path, 6, model)
    (incomplete / "COMPLETE").unlink()
    (tmp_path / "step-00000008").mkdir()
    (snapshot(tmp_path, 10, model) / ".DS_Store").write_bytes(b"")  # a file browser's, in a snapshot
    (tmp_path / "step-00000010" / "._config.json").write_bytes(b"")  # macOS's AppleDouble file
    for step in (6, 8, 10):
        snapshot(tmp_path, step, model)
    assert [info.step for info in list_snapshots(tmp_path)] == [6, 8, 10]
    assert not (tmp_path / "step-00000010" / ".DS_Store").exists()


def test_format_versions_are_checked_in_both_json_files(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    path = snapshot(tmp_path, 1, make_gpt(tiny_config()))
    for version, says in ((2, "written by a newer lens_callback"), (0, "not one lens_callback wrote"),
                          (None, "not one lens_callback wrote"), ("1", "not one lens_callback wrote")):
        edit_config(path, lambda config: config.update(format_version=version))
        with pytest.raises(SnapshotError, match=f"config.json: unsupported format_version.*{says}"):
            load_snapshot(path)
    inputs = ProbeInputs(repeated=torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)), text=None)
    save_probe_inputs(tmp_path, inputs, {"seed": 0})
    config = json.loads((tmp_path / "probe_inputs.json").read_text())
    config["format_version"] = 99
    (tmp_path / "probe_inputs.json").write_text(json.dumps(config))
    with pytest.raises(SnapshotError, match="probe_inputs.json: unsupported format_version 99.*newer"):
        load_probe_inputs(tmp_path)


@pytest.mark.parametrize("junk", ['{"n": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000],
                         ids=["int-over-4300-digits", "nested-too-deep"])
def test_valid_json_python_cannot_decode_is_a_snapshot_error(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                             junk: str) -> None:
    """``json.loads`` raises a bare ValueError for an int over 4,300 digits and RecursionError for deep
    nesting: both escaped ``list_snapshots`` ("never raises for junk"), ``load_snapshot`` and the probe
    inputs' readers, whose only catch was JSONDecodeError (snapshots review)."""
    model = make_gpt(tiny_config())
    snapshot(tmp_path, 1, model)
    bad = snapshot(tmp_path, 2, model)
    (bad / "config.json").write_text(junk)
    assert [info.step for info in list_snapshots(tmp_path)] == [1]
    for read in (load_snapshot, read_snapshot_header):
        with pytest.raises(SnapshotError, match=r"step-00000002.config\.json: unreadable or corrupt"):
            read(bad)
    inputs = ProbeInputs(repeated=torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)), text=None)
    save_probe_inputs(tmp_path, inputs, {"seed": 0})
    (tmp_path / "probe_inputs.json").write_text(junk)
    with pytest.raises(SnapshotError, match=r"probe_inputs\.json: unreadable or corrupt"):
        load_probe_inputs(tmp_path)
    other = ProbeInputs(repeated=inputs.repeated + 1, text=None)
    save_probe_inputs(tmp_path, other, {"seed": 1})  # the callback's write at a snapshot: the junk is replaced
    assert torch.equal(load_probe_inputs(tmp_path)[0].repeated, other.repeated)


def test_a_size_too_large_for_a_tensor_in_model_config_is_a_snapshot_error(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    """The modern model's block_size sizes no weight (rotary), so an edited 10**30 reached torch.arange in
    the converter's meta model: a bare OverflowError (snapshots review)."""
    path = snapshot(tmp_path, 3, make_gpt(tiny_config(architecture="modern")))
    edit_config(path, lambda config: config["model_config"].update(block_size=10**30))
    with pytest.raises(SnapshotError, match=r"converter 'nanogpt-modern' cannot build a model from this snapshot: "
                                            r"GPTConfig describes a weight of block_size x head size \(rotary tables\) "
                                            rf"= 8{'0' * 30} elements"):
        load_snapshot(path)
    # lens-probe checks the weights against the converter first (diff review: a traceback and exit 1)
    assert main([str(tmp_path), "--csv", str(tmp_path / "out.csv")]) == 2
    with pytest.raises(SnapshotError, match=r"config.json: model_config does not fit converter 'nanogpt-modern': "
                                            r"ValueError: GPTConfig describes a weight of block_size x head size"):
        reprobe(tmp_path)


def test_a_snapshots_probe_inputs_digest_never_becomes_a_path(tmp_path: Path) -> None:
    inputs = ProbeInputs(repeated=torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)), text=None)
    save_probe_inputs(tmp_path / "root", inputs, {"seed": 0})
    (tmp_path / "x.safetensors").write_bytes(b"outside the root")
    for digest in ("../../x", "A" * 64, "0" * 63, "0" * 64 + "\n"):
        with pytest.raises(SnapshotError, match="is not a SHA-256 digest"):
            load_probe_inputs(tmp_path / "root", sha256=digest)


def test_a_failed_rewrite_of_a_step_keeps_its_earlier_snapshot(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up while step 4 is written again: the earlier step-4 snapshot stays listed and
    loadable, and no partial directory is left; the root itself is not mistaken for a snapshot."""
    import lens_callback.snapshots as snapshots_module

    first = make_gpt(tiny_config(), seed=0)
    path = snapshot(tmp_path, 4, first)
    real = snapshots_module._write_bytes

    def full_disk(target: Path, data: bytes) -> None:
        if target.name == snapshots_module.COMPLETE_FILE:
            raise OSError(28, "No space left on device")
        real(target, data)

    monkeypatch.setattr(snapshots_module, "_write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        snapshot(tmp_path, 4, make_gpt(tiny_config(), seed=1))
    monkeypatch.undo()
    assert [info.step for info in list_snapshots(tmp_path)] == [4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]
    torch.testing.assert_close(load_snapshot(path)(TOKENS), live_logits(first), atol=1e-5, rtol=0)
    with pytest.raises(SnapshotError, match=r"not a snapshot directory \(it holds 1 snapshots: pass one"):
        load_snapshot(tmp_path)


def test_prune_keeps_newest_and_protected(tmp_path: Path) -> None:
    weights = {"w": torch.ones(2)}
    for step in (0, 10, 20, 30, 40):
        save_snapshot(tmp_path, step, converter="nanogpt", model_config={}, state_dict=weights)
    (tmp_path / "step-00000005").mkdir()  # incomplete: never touched

    assert prune_snapshots(tmp_path, keep_last=2, protect=[10]) == [0, 20]
    assert [info.step for info in list_snapshots(tmp_path)] == [10, 30, 40]
    assert (tmp_path / "step-00000005").is_dir() and leftovers(tmp_path) == []
    assert prune_snapshots(tmp_path, keep_last=5) == []
    assert prune_snapshots(tmp_path, keep_last=0) == [10, 30, 40]
    # `among` (the current run's steps): only those count and may go; 10 is another run's, left alone
    for step in (0, 10, 20, 30):
        save_snapshot(tmp_path, step, converter="nanogpt", model_config={}, state_dict=weights)
    assert prune_snapshots(tmp_path, keep_last=1, among=[0, 20, 30, 50]) == [0, 20]  # keeps 30, the newest of them
    assert [info.step for info in list_snapshots(tmp_path)] == [10, 30]
    assert prune_snapshots(tmp_path, keep_last=0, among=[30]) == [30]
    assert [info.step for info in list_snapshots(tmp_path)] == [10] and leftovers(tmp_path) == []
    for bad in (-1, np.int64(-1), True, 1.0, "1"):
        with pytest.raises(ValueError, match="keep_last must be a non-negative int"):
            prune_snapshots(tmp_path, keep_last=bad)
    assert prune_snapshots(tmp_path, keep_last=np.int64(0)) == [10]  # a numpy integer too (s34)


def test_prune_counts_a_snapshot_as_removed_once_it_is_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Deleting the renamed directory fails (an NFS ``.nfsXXXX`` file a reader holds open:
    ENOTEMPTY): the snapshots are gone from the listing, so they are reported removed, and one
    warning names the directories left behind."""
    weights = {"w": torch.ones(2)}
    for step in (0, 10, 20, 30):
        save_snapshot(tmp_path, step, converter="nanogpt", model_config={}, state_dict=weights)
    real_rmtree = shutil.rmtree

    def busy(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name.startswith(".tmp-prune-"):
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", busy)
    with caplog.at_level(logging.WARNING, logger="lens_callback.snapshots"):
        assert prune_snapshots(tmp_path, keep_last=1) == [0, 10, 20]
    assert [info.step for info in list_snapshots(tmp_path)] == [30]
    left = leftovers(tmp_path)
    assert len(left) == 3 and all(name.startswith(".tmp-prune-") for name in left)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and all(name in warnings[0] for name in left), warnings
    assert "Directory not empty" in warnings[0]


def test_prune_stops_at_a_failed_rename_and_reports_what_it_removed(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot that cannot be moved aside stops the pruning with an ``OSError`` that still
    carries the steps removed before it (``SnapshotPruneError.removed``)."""
    weights = {"w": torch.ones(2)}
    for step in (0, 10, 20, 30):
        save_snapshot(tmp_path, step, converter="nanogpt", model_config={}, state_dict=weights)
    real_replace = os.replace

    def refuse(src: Any, dst: Any) -> None:
        if Path(src).name == "step-00000010":
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(SnapshotPruneError, match=r"step-00000010.*Permission denied.*removed before it: \[0\]") as info:
        prune_snapshots(tmp_path, keep_last=1)
    monkeypatch.undo()
    assert isinstance(info.value, OSError) and isinstance(info.value.__cause__, PermissionError)
    assert info.value.removed == [0] and info.value.step == 10
    assert [i.step for i in list_snapshots(tmp_path)] == [10, 20, 30] and leftovers(tmp_path) == []


def _old_prune_result(root: Path, keep_last: int, protect: set[int], among: set[int] | None,
                      run_id: str | None) -> list[int]:
    """What `prune_snapshots` removed before it found its candidates by name (s34): every snapshot
    listed, then filtered by ``among`` and ``run_id``; all but the newest ``keep_last``, less the protected."""
    snapshots = list_snapshots(root)
    if among is not None:
        snapshots = [info for info in snapshots if info.step in among]
    if run_id is not None:
        snapshots = [info for info in snapshots if info.metadata.get("run_id") in (run_id, None)]
    return [info.step for info in snapshots[: max(len(snapshots) - keep_last, 0)] if info.step not in protect]


def test_prune_removes_what_listing_every_snapshot_removed(tmp_path: Path) -> None:
    """Pruning finds its candidates by directory name and reads few configs (s34): over two runs,
    snapshots without a run id, incomplete, unreadable, misnamed and misplaced directories, protected
    steps and ``among``, it removes exactly what the listing-based algorithm removed."""
    weights = {"w": torch.ones(2)}
    tree = tmp_path / "tree"
    runs = {**{s: "a" for s in (0, 1, 2, 3, 5, 8, 9, 11, 12, 13)}, **{s: "b" for s in (4, 6, 10, 14)}, 7: None, 15: "a"}
    for step, run in runs.items():
        save_snapshot(tree, step, converter="nanogpt", model_config={}, state_dict=weights,
                      metadata={} if run is None else {"run_id": run})
    (tree / "step-00000011" / "COMPLETE").unlink()  # incomplete: never counted nor touched
    (tree / "step-00000013" / "config.json").write_text("{not json")  # unreadable: skipped
    (tree / "step-00000014").rename(tree / "step-000000014")  # not step 14's directory name
    (tree / "step-00000015").rename(tree / "step-00000016")  # says step 15, in step 16's directory
    (tree / "step-00000017").mkdir()  # an empty step directory
    (tree / "step-00000018").write_text("a file")
    cases = 0
    for keep_last in (0, 1, 2, 4, 20):
        for protect in (set(), {0, 5, 12}, {3, 4, 7, 8, 9, 12}):
            for among in (None, {0, 1, 2, 3, 5, 7, 8, 9, 11, 12, 13, 16}, {4, 5, 6, 7, 14, 99}):
                for run_id in (None, "a", "b"):
                    expected = _old_prune_result(tree, keep_last, protect, among, run_id)
                    root = tmp_path / f"case-{cases}"
                    shutil.copytree(tree, root, copy_function=os.link)
                    before = sorted(p.name for p in root.iterdir())
                    removed = prune_snapshots(root, keep_last, protect=protect, among=among, run_id=run_id)
                    assert removed == expected, (keep_last, protect, among, run_id)
                    assert sorted(p.name for p in root.iterdir()) == [
                        name for name in before if name not in {f"step-{s:08d}" for s in removed}]
                    shutil.rmtree(root)
                    cases += 1
    assert cases == 135


def test_prune_reads_the_configs_it_needs_not_every_snapshots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The callback prunes at every snapshot step with hundreds of snapshots kept for events, beside
    other runs' (s34): listing them all read every ``config.json`` at every step, 276,147 reads in an
    800-step run. The newest ``keep_last`` are read, and the unprotected older ones; protected older
    ones and steps outside ``among`` are not."""
    import lens_callback.snapshots as snapshots_module

    weights = {"w": torch.ones(2)}
    ours, theirs = list(range(0, 40, 2)), list(range(1, 40, 2))
    for step in ours + theirs:
        save_snapshot(tmp_path, step, converter="nanogpt", model_config={}, state_dict=weights,
                      metadata={"run_id": "ours" if step in ours else "theirs"})
    reads: list[str] = []
    real_read = snapshots_module._read_config

    def counted(path: Path) -> dict[str, Any]:
        reads.append(path.name)
        return real_read(path)

    monkeypatch.setattr(snapshots_module, "_read_config", counted)
    assert prune_snapshots(tmp_path, 3, protect=ours, among=ours, run_id="ours") == []
    assert reads == ["step-00000038", "step-00000036", "step-00000034"]  # not the 37 others
    reads.clear()
    assert prune_snapshots(tmp_path, 3, protect=ours[2:], among=ours, run_id="ours") == [0, 2]
    assert len(reads) == 3 + 2
    reads.clear()
    assert prune_snapshots(tmp_path, 3, protect=range(40)) == []  # no among: the newest of every run count
    assert len(reads) == 3


def test_a_step_directory_this_user_cannot_read_is_skipped_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A shared root holding another user's snapshot written under umask 077: looking for its COMPLETE
    marker raises ``PermissionError``, which broke ``list_snapshots`` (documented never to raise for junk),
    lens-probe and every prune of the root (faults review). It is skipped, named once in a warning, and
    never counted or removed by pruning."""
    import lens_callback.snapshots as snapshots_module

    weights = {"w": torch.ones(2)}
    for step in (0, 4, 8, 12):
        save_snapshot(tmp_path, step, converter="nanogpt", model_config={}, state_dict=weights)
    locked = tmp_path / "step-00000004"
    real = snapshots_module._is_complete

    def is_complete(path: Path) -> bool:
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path / "COMPLETE"))
        return real(path)

    monkeypatch.setattr(snapshots_module, "_is_complete", is_complete)
    with caplog.at_level(logging.WARNING, logger="lens_callback.snapshots"):
        assert [info.step for info in list_snapshots(tmp_path)] == [0, 8, 12]
    reason = f"{locked / 'COMPLETE'}: cannot be read (PermissionError: Permission denied)"
    assert f"skipping snapshot {locked}: {reason}" in caplog.text
    assert scan_snapshots(tmp_path)[1] == [(locked, reason)]
    with pytest.raises(SnapshotError, match=re.escape(reason)):
        iter_reprobe(tmp_path)  # refused, named (its run cannot be told)
    assert prune_snapshots(tmp_path, keep_last=1) == [0, 8]
    assert locked.is_dir() and [info.step for info in list_snapshots(tmp_path)] == [12]


# -- probe inputs ---------------------------------------------------------------------------------
def test_probe_inputs_round_trip_once_per_root(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    inputs = ProbeInputs(repeated=torch.randint(0, 64, (2, 8), generator=gen), text=torch.randint(0, 64, (3, 16), generator=gen))
    settings = {"repeat_length": 4, "seed": 3}
    path = save_probe_inputs(tmp_path, inputs, settings)
    loaded, loaded_settings = load_probe_inputs(tmp_path)
    assert torch.equal(loaded.repeated, inputs.repeated) and torch.equal(loaded.text, inputs.text)
    assert loaded_settings == settings

    stat = path.stat()
    save_probe_inputs(tmp_path, inputs, dict(settings))  # identical: left alone
    assert path.stat().st_ino == stat.st_ino and path.stat().st_mtime_ns == stat.st_mtime_ns

    only_repeated = ProbeInputs(repeated=inputs.repeated[:1], text=None)
    save_probe_inputs(tmp_path, only_repeated, {"seed": 4})  # different: replaced
    loaded, loaded_settings = load_probe_inputs(tmp_path)
    assert torch.equal(loaded.repeated, inputs.repeated[:1]) and loaded.text is None
    assert loaded_settings == {"seed": 4} and leftovers(tmp_path) == []

    # another run's inputs replace these: they are kept by digest, and a snapshot's digest finds them
    # even when the current pair is broken (a write that failed half-way)
    from lens_callback.snapshots import probe_inputs_sha256

    digest = probe_inputs_sha256(only_repeated)
    later = ProbeInputs(repeated=inputs.repeated, text=None)
    save_probe_inputs(tmp_path, later, {"seed": 5})
    assert load_probe_inputs(tmp_path, sha256=probe_inputs_sha256(later))[1] == {"seed": 5}
    (tmp_path / "probe_inputs.json").write_text("{broken")
    kept, kept_settings = load_probe_inputs(tmp_path, sha256=digest)
    assert torch.equal(kept.repeated, only_repeated.repeated) and kept_settings == {"seed": 4}
    with pytest.raises(SnapshotError, match="probed on other inputs|unreadable or corrupt"):
        load_probe_inputs(tmp_path, sha256="0" * 64)
    for kept_file in tmp_path.glob("probe_inputs-*"):
        kept_file.unlink()
    save_probe_inputs(tmp_path, only_repeated, {"seed": 4})

    # a valid tensors file of another run beside this json: the checksum tells
    other = tmp_path / "other"
    save_probe_inputs(other, ProbeInputs(repeated=inputs.repeated[1:], text=None), {"seed": 4})
    (tmp_path / "probe_inputs.safetensors").write_bytes((other / "probe_inputs.safetensors").read_bytes())
    with pytest.raises(SnapshotError, match="does not match the checksum"):
        load_probe_inputs(tmp_path)

    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(SnapshotError, match="probe_inputs.safetensors"):
        load_probe_inputs(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_probe_inputs(tmp_path / "empty")


# -- nanoGPT ckpt.pt ------------------------------------------------------------------------------
def write_nanogpt_ckpt(path: Path, model: GPT, iter_num: int = 250, drop_args: tuple[str, ...] = ()) -> None:
    """As nanoGPT's train.py: a compiled model's state dict (``_orig_mod.``), AdamW state, plain config
    (``drop_args``: ``model_args`` keys left out, as older nanoGPT versions wrote them)."""
    cfg = model.config
    state_dict = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    # nanoGPT without flash attention also stores its causal mask as a buffer
    state_dict["_orig_mod.transformer.h.0.attn.bias"] = torch.tril(torch.ones(cfg.block_size, cfg.block_size)).view(
        1, 1, cfg.block_size, cfg.block_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(TOKENS, TOKENS)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    checkpoint = {
        "model": state_dict,
        "optimizer": optimizer.state_dict(),
        "model_args": dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                           bias=cfg.bias, vocab_size=cfg.vocab_size, dropout=0.1),
        "iter_num": iter_num,
        "best_val_loss": torch.tensor(2.5),
        "config": {"batch_size": 12, "learning_rate": 6e-4, "dataset": "shakespeare_char", "compile": True},
    }
    for key in drop_args:
        del checkpoint["model_args"][key]
    torch.save(checkpoint, path)


def test_nanogpt_checkpoint_loads_and_matches_logits(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    model = make_gpt(tiny_config(bias=False))
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, model)  # the AdamW step changes the weights: compare with the saved ones
    expected = live_logits(model)

    config, state_dict, iter_num = read_nanogpt_checkpoint(path)
    assert config == GPTConfig(**{**model.config.to_dict(), "dropout": 0.1})
    assert iter_num == 250 and not any(k.startswith("_orig_mod.") or k.endswith("attn.bias") for k in state_dict)
    torch.testing.assert_close(load_nanogpt_checkpoint(path)(TOKENS), expected, atol=1e-5, rtol=0)


def test_a_nanogpt_checkpoint_loads_with_the_tokenizer_of_its_meta_pkl(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], make_nanogpt_data_dir: Callable[..., Path]
) -> None:
    """nanoGPT's char-level ``meta.pkl`` (``itos``/``stoi``, read without unpickling code) gives an imported
    ``ckpt.pt`` the tokenizer of its ids; one that describes no ids this package tokenizes is refused, naming it."""
    root = make_nanogpt_data_dir()
    meta = pickle.loads((root / "meta.pkl").read_bytes())  # the test's own file
    model = make_gpt(tiny_config(vocab_size=64))  # past the table's ids: TOKENS's
    assert meta["vocab_size"] < 64
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", model)
    hooked = load_nanogpt_checkpoint(tmp_path / "ckpt.pt", meta=root / "meta.pkl")
    line = "moon — café.\n"  # within block_size 16: to_tokens truncates to the context
    assert hooked.to_tokens(line).tolist() == [[meta["stoi"][c] for c in line]]
    assert hooked.to_string(hooked.to_tokens(line)[0]) == line
    assert load_nanogpt_checkpoint(tmp_path / "ckpt.pt").tokenizer is None
    for name, table in (("bpe", {"vocab_size": 50257}), ("words", {"vocab_size": 3, "itos": ["the", "a", "b"]})):
        bad = make_nanogpt_data_dir(name, meta=table) / "meta.pkl"
        with pytest.raises(CheckpointError, match=rf"{name}/meta.pkl gives no tokenizer: .*load without meta="):
            load_nanogpt_checkpoint(tmp_path / "ckpt.pt", meta=bad)
    # a table of more ids than the model has is refused naming both files; 256 ids without a table are bytes
    wide = make_nanogpt_data_dir("wide", meta={"vocab_size": 100, "itos": [chr(0x100 + i) for i in range(100)]})
    with pytest.raises(CheckpointError, match=r"wide/meta.pkl with .*ckpt.pt: the 'char' tokenizer record has 100 ids, "
                                              r"more than the model's vocabulary d_vocab=64"):
        load_nanogpt_checkpoint(tmp_path / "ckpt.pt", meta=wide / "meta.pkl")
    write_nanogpt_ckpt(tmp_path / "bytes.pt", make_gpt(tiny_config(vocab_size=256)))
    byte_ids = make_nanogpt_data_dir("bytes", meta={"vocab_size": 256}) / "meta.pkl"
    hooked = load_nanogpt_checkpoint(tmp_path / "bytes.pt", meta=byte_ids)
    assert hooked.to_tokens(line).tolist() == [list(line.encode())]


def test_a_nanogpt_checkpoints_meta_whose_stoi_gives_two_characters_one_id_gives_no_tokenizer(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], make_nanogpt_data_dir: Callable[..., Path]
) -> None:
    """The same table as a data dir's (`meta_itos`): the model got a tokenizer decoding id 0 as the last of the
    characters the stoi gave it (small-items review); now a warning names them, and the table, not one character
    per id, gives no tokenizer, refused as a gap's is."""
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", make_gpt(tiny_config(vocab_size=64)))
    meta = make_nanogpt_data_dir("shared", meta={"vocab_size": 3, "stoi": {"a": 0, "b": 0, "c": 1}}) / "meta.pkl"
    with pytest.warns(UserWarning, match=r"shared/meta.pkl: its stoi maps several characters to one id "
                                         r"\(id 0: 'a', 'b'\)"), \
            pytest.raises(CheckpointError, match=r"shared/meta.pkl gives no tokenizer"):
        load_nanogpt_checkpoint(tmp_path / "ckpt.pt", meta=meta)


@pytest.mark.parametrize("iter_num, step", [(0, 0), (2**63 - 1, 2**63 - 1), (-1, None), (True, None)])
def test_a_checkpoints_iter_num_is_kept_from_zero_to_int64s_largest(
    iter_num: int, step: int | None, tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    """The README's range of steps, ``[0, 2**63)``, at both ends: ``iter_num`` 0 (a checkpoint saved before
    the first optimizer step) is step 0 to ``read_nanogpt_checkpoint``'s callers, not a missing one; a
    negative one or a bool is none (mutation review: ``0 < iter_num`` in place of ``0 <= iter_num`` went
    unnoticed, ``lens-probe`` reading a missing step as 0 too)."""
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", make_gpt(tiny_config()), iter_num=iter_num)
    assert read_nanogpt_checkpoint(tmp_path / "ckpt.pt")[2] == step


@pytest.mark.parametrize("bias", [True, False])
def test_older_nanogpt_checkpoints_without_bias_or_vocab_size_load(
    bias: bool, tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    """nanoGPT's model_args gained ``bias`` and ``vocab_size`` in 2023; older files say it with the weights."""
    model = make_gpt(tiny_config(bias=bias))
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, model, drop_args=("bias", "vocab_size"))
    expected = live_logits(model)
    config, _, _ = read_nanogpt_checkpoint(path)
    assert (config.bias, config.vocab_size) == (bias, model.config.vocab_size)
    torch.testing.assert_close(load_nanogpt_checkpoint(path)(TOKENS), expected, atol=1e-5, rtol=0)

    write_nanogpt_ckpt(path, model, drop_args=("n_layer",))  # the shape of the network is never guessed
    with pytest.raises(CheckpointError, match=r"model_args lacks \['n_layer'\]"):
        read_nanogpt_checkpoint(path)


@pytest.mark.parametrize("key", ["block_size", "n_head", "n_embd"])  # n_layer: the test above
def test_a_checkpoint_without_its_shape_in_model_args_is_refused(
    key: str, tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    """The depth, width and context are never guessed: a guessed block_size would probe a different model."""
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, make_gpt(tiny_config()), drop_args=(key,))
    with pytest.raises(CheckpointError, match=re.escape(f"model_args lacks ['{key}']")):
        read_nanogpt_checkpoint(path)


class _WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: code execution, as a malicious ckpt.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_a_checkpoint_the_safe_loader_cannot_read_is_named_as_such(tmp_path: Path,
                                                                   tiny_config: Callable[..., GPTConfig]) -> None:
    """A plain checkpoint saved with pickle protocol 4 was "not a readable torch checkpoint (a file written
    by torch.save)", which it was (posthoc review): torch's weights-only unpickler cannot read that protocol."""
    path = tmp_path / "ckpt.pt"
    torch.save({"model": make_gpt(tiny_config()).state_dict(), "iter_num": 1,
                "model_args": dict(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=True, vocab_size=64)}, path,
               pickle_protocol=4)
    legacy = tmp_path / "legacy.pt"  # torch.save's format before zip files
    torch.save(torch.load(path, weights_only=False), legacy, pickle_protocol=4, _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own note on the protocol
        for saved in (path, legacy):
            with pytest.raises(CheckpointError, match=r"cannot read it \(torch: Unsupported operand \d+\): saved with "
                                                      r"a pickle protocol that the safe loader does not read"):
                load_nanogpt_checkpoint(saved)
        # any other pickle (nanoGPT's meta.pkl) is no torch checkpoint at all (diff review)
        with open(tmp_path / "meta.pkl", "wb") as file:
            pickle.dump({"vocab_size": 65, "itos": {0: "a"}}, file, protocol=4)
        with pytest.raises(CheckpointError, match=r"not a readable torch checkpoint \(a file written by torch.save\)$"):
            load_nanogpt_checkpoint(tmp_path / "meta.pkl")


def test_a_bare_state_dict_is_named_as_one_with_the_way_to_make_a_checkpoint_of_it(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    """``torch.save(model.state_dict(), path)``, the usual way to save weights, was "not a nanoGPT checkpoint
    (expected 'model' and 'model_args', got [...])" listing every weight (148 names for GPT-2) on one line
    (posthoc review): it is named as a bare state dict, with four of its names and how to re-save it; a Lightning
    checkpoint (lens-train's), which listed 14 keys, names the snapshots to re-probe instead."""
    model = make_gpt(tiny_config())
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save({"step": 3, "state_dict": {}}, tmp_path / "other.pt")
    torch.save({}, tmp_path / "empty.pt")
    count = len(model.state_dict())
    expected = (rf"weights.pt: not a nanoGPT checkpoint \(expected 'model' and 'model_args', got a bare state dict "
                rf"of {count} tensors, 'lm_head.weight', 'transformer.h.0.attn.c_attn.bias', .* and {count - 4} more: "
                rf"nanoGPT's train.py saves .* re-save it as torch.save\({{'model': state_dict, 'model_args': dict\(")
    with pytest.raises(CheckpointError, match=expected) as raised:
        read_nanogpt_checkpoint(tmp_path / "weights.pt")
    assert "transformer.h.1" not in str(raised.value)
    with pytest.raises(CheckpointError, match=r"other.pt: .*, got the keys 'state_dict', 'step'\)$"):
        read_nanogpt_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"empty.pt: .*, got an empty dict\)$"):
        read_nanogpt_checkpoint(tmp_path / "empty.pt")
    # lens-train's Lightning checkpoint (its keys, as Trainer.save_checkpoint writes them) points to the snapshots
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 0, "global_step": 4,
                "pytorch-lightning_version": "2.5.0", "hyper_parameters": {"config": model.config.to_dict()},
                "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"last.ckpt: .*, got a Lightning checkpoint \('state_dict', "
                                              r"'hyper_parameters', ...\): a LensCallback run is re-probed from its "
                                              r"snapshots \(lens-probe SNAPSHOT_DIR"):
        read_nanogpt_checkpoint(tmp_path / "last.ckpt")


def test_a_file_of_a_snapshot_or_its_root_given_as_a_checkpoint_names_the_directory_to_pass(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    """``lens-probe root/step-00000007/model.safetensors`` (the weights, a natural thing to point at) was read as a
    nanoGPT ckpt.pt: "not a nanoGPT checkpoint", listing every weight, and its config.json or the root's
    probe_inputs.json "not a readable torch checkpoint" (posthoc review). Each names the directory to pass."""
    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    snap = root / "step-00000007"
    for name in ("model.safetensors", "config.json", "COMPLETE"):
        with pytest.raises(CheckpointError, match=rf"{name} is a file of the snapshot .*step-00000007, not a nanoGPT "
                                                  rf"ckpt.pt: pass the snapshot directory itself"):
            reprobe(snap / name)
    assert main([str(snap / "model.safetensors"), "--csv", str(tmp_path / "out.csv")]) == 2
    assert "is a file of the snapshot" in capsys.readouterr().err and not (tmp_path / "out.csv").exists()
    for name in ("probe_inputs.json", "probe_inputs.safetensors"):
        with pytest.raises(CheckpointError, match=rf"{name} is a file of the snapshot root .*snapshots, not a nanoGPT "
                                                  rf"ckpt.pt: pass the root itself"):
            reprobe(root / name)


def test_the_weights_only_loaders_reason_is_found_on_its_line_or_the_next() -> None:
    """torch 2.6 puts the reason after "WeightsUnpickler error:" on its line; later torch on the next."""
    from lens_callback.checkpoints import _unpickler_reason

    for text in ("Weights only load failed. In PyTorch 2.6, ...\n\nWeightsUnpickler error: Unsupported operand 149\n\nCheck",
                 "Weights only load failed.\nWeightsUnpickler error:\nUnsupported operand 149\n"):
        assert _unpickler_reason(pickle.UnpicklingError(text)) == "Unsupported operand 149"
    assert _unpickler_reason(pickle.UnpicklingError("something\nelse")) == "something"


def test_checkpoint_needing_arbitrary_unpickling_is_refused(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    # the payload is live: plain unpickling does create its marker
    probe_marker = tmp_path / "payload-works"
    pickle.loads(pickle.dumps(_WritesMarker(probe_marker))).close()
    assert probe_marker.exists()

    marker = tmp_path / "pwned"
    cfg = tiny_config()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": make_gpt(cfg).state_dict(), "iter_num": 1, "extra": _WritesMarker(marker),
                "model_args": dict(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=True, vocab_size=64)}, path)
    with pytest.raises(CheckpointError, match="refused.*arbitrary unpickling"):
        load_nanogpt_checkpoint(path)
    assert not marker.exists()
    assert main([str(path), "--logdir", str(tmp_path / "tb")]) == 2
    assert not marker.exists()


# -- re-probing -----------------------------------------------------------------------------------
def run_snapshots(root: Path, tiny_config: Callable[..., GPTConfig]) -> tuple[ProbeInputs, dict[int, dict[str, float]]]:
    """Two snapshots of differently-trained models plus the run's probe inputs; the live scalars per step."""
    data = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(5))
    inputs = make_probe_inputs(data, data, 64, repeat_length=4, repeat_batch=2, text_len=16, text_batch_size=2, seed=0)
    save_probe_inputs(root, inputs, {"repeat_length": 4, "text_len": 16, "seed": 0})
    runner = build_runner(PROBE_SETTINGS["probes"], PROBE_SETTINGS["probe_options"])
    live: dict[int, dict[str, float]] = {}
    for step, seed in ((7, 0), (14, 1)):
        model = make_gpt(tiny_config(), seed=seed)
        live[step] = measure(to_hooked_transformer(model), runner, inputs).scalars
        snapshot(root, step, model, metadata={"probe_settings": PROBE_SETTINGS})
    return inputs, live


@pytest.mark.parametrize("pruned", ["while-checked", "while-probed", "while-listed"])
def test_snapshots_a_running_fit_prunes_during_a_sweep_are_skipped_with_a_warning(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], monkeypatch: pytest.MonkeyPatch, pruned: str
) -> None:
    """lens-probe on a live run with ``max_snapshots``: a snapshot pruned after the root was listed made
    the sweep refuse every snapshot ("not a snapshot directory"), or stop part-way (faults review). It
    is skipped with a warning and the others are probed; a snapshot given itself still fails."""
    _, live = run_snapshots(tmp_path, tiny_config)
    shutil.copytree(tmp_path / "step-00000014", tmp_path / "step-00000021")
    edit_config(tmp_path / "step-00000021", lambda c: c.update(step=21))
    victim = tmp_path / "step-00000014"
    where = {"while-checked": "read_snapshot_header", "while-probed": "load_snapshot_weights",
             "while-listed": "_read_config"}[pruned]
    module = snapshots_module if pruned == "while-listed" else posthoc_module
    real = getattr(module, where)

    def prunes_first(path: Path, *args: Any, **kwargs: Any) -> Any:
        # the fit's prune, between the listing and this snapshot's turn (or, while listing, between the
        # victim's COMPLETE marker and its config.json)
        if Path(path).name == ("step-00000014" if pruned == "while-listed" else "step-00000007") and victim.exists():
            shutil.rmtree(victim)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, where, prunes_first)
    with pytest.warns(UserWarning, match=r"1 snapshot\(s\) removed since they were listed, not probed "
                                         r"\(step-00000014\): a running fit's max_snapshots prunes as it goes"):
        probed = reprobe(tmp_path)
    assert [step for step, _ in probed] == [7, 21] and probed[0] == (7, live[7])
    with pytest.raises(FileNotFoundError, match=r"no such file or directory: .*step-00000014"):
        reprobe(victim)
    with pytest.raises(SnapshotError, match=r"step-00000014: not a snapshot directory \(it does not exist"):
        load_snapshot(victim)
    # every one listed removed before it was read (a live run with max_snapshots=1): an error, not "0 probed"
    for step in (7, 21):
        shutil.rmtree(tmp_path / f"step-{step:08d}")
    snapshot(tmp_path, 28, make_gpt(tiny_config()), metadata={"probe_settings": PROBE_SETTINGS})
    victim = tmp_path / "step-00000028"
    monkeypatch.setattr(module, where, lambda path, *args, **kwargs: (shutil.rmtree(path, ignore_errors=True),
                                                                      real(path, *args, **kwargs))[1])
    with pytest.raises(SnapshotError, match=r"step-00000028"):  # as "every snapshot listed ... removed", or its own
        reprobe(tmp_path)


def test_reprobe_reproduces_live_measurement(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, live = run_snapshots(tmp_path, tiny_config)
    assert live[7] != live[14]
    assert "lens/induction/L1H1" in live[7] and "lens/icl_score" in live[7]

    packed: list[int] = []  # the sweep's own model has packed attention weights, the live one does not
    real_pack = posthoc_module.pack_attention_weights
    monkeypatch.setattr(posthoc_module, "pack_attention_weights", lambda model: packed.append(real_pack(model)))
    assert reprobe(tmp_path) == [(7, live[7]), (14, live[14])]
    assert packed == [2]  # built once, refreshed in place for the second snapshot
    assert reprobe(tmp_path / "step-00000014") == [(14, live[14])]
    monkeypatch.chdir(tmp_path / "step-00000014")  # `lens-probe .` inside a snapshot directory
    assert reprobe(".") == [(14, live[14])]


def test_lens_probe_writes_tensorboard_and_csv(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "snapshots"
    _, live = run_snapshots(root, tiny_config)
    logdir, table = tmp_path / "tb", tmp_path / "out" / "scalars.csv"
    assert main([str(root), "--logdir", str(logdir), "--csv", str(table)]) == 0

    frame = read_metrics(logdir)
    assert sorted(frame["step"].unique()) == [7, 14]
    for step in (7, 14):
        got = frame[frame["step"] == step].set_index("tag")["value"]
        assert set(got.index) == set(live[step])
        for tag, value in live[step].items():
            assert got[tag] == pytest.approx(value, rel=1e-6, abs=1e-6), tag  # float32 in events
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(int(r["step"]), r["tag"]): float(r["value"]) for r in rows} == {
        (step, tag): value for step, scalars in live.items() for tag, value in scalars.items()
    }

    assert main([str(tmp_path / "missing"), "--logdir", str(logdir)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    # the table may not overwrite what lens-probe reads: a snapshot's file, or the input itself
    config = root / "step-00000014" / "config.json"
    before = config.read_bytes()
    for target in (config, root / "step-00000014" / "table.csv"):
        assert main([str(root), "--csv", str(target)]) == 2
        assert "inside a snapshot directory" in capsys.readouterr().err
    assert config.read_bytes() == before and not (root / "step-00000014" / "table.csv").exists()
    # nor a file of the root the tools read, also when the input is one snapshot in it (post-hoc review:
    # the probe inputs, another run's archived ones and events.json were overwritten)
    (root / "events.json").write_text('{"events": []}')
    (root / "probe_inputs-0123456789abcdef.json").write_text("{}")
    kept = {name: (root / name).read_bytes() for name in ("probe_inputs.json", "events.json",
                                                          "probe_inputs-0123456789abcdef.json")}
    for source in (root, root / "step-00000007"):
        for name in kept:
            assert main([str(source), "--csv", str(root / name)]) == 2
            assert "a file of the snapshot root" in capsys.readouterr().err
    assert {name: (root / name).read_bytes() for name in kept} == kept
    (root / "events.json").unlink()
    (root / "probe_inputs-0123456789abcdef.json").unlink()
    assert main([str(root / "step-00000014"), "--csv", str(root / "step-00000014")]) == 2
    assert "is a directory" in capsys.readouterr().err
    # a table of its own in the root may be written again (lens-probe does not read it)
    for _ in range(2):
        assert main([str(root), "--csv", str(root / "table.csv")]) == 0
    (root / "table.csv").unlink()
    # an existing table elsewhere is replaced whole (through a temporary file), nothing left beside it
    assert main([str(root), "--csv", str(table)]) == 0
    assert sorted(p.name for p in table.parent.iterdir()) == ["scalars.csv"]
    # a root that also holds files named like a snapshot's (a user's output folder) is still a root
    (root / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(b"")
    assert reprobe(root) == [(7, live[7]), (14, live[14])]
    with pytest.raises(SnapshotError, match="not a snapshot directory .it holds 2 snapshots"):
        load_snapshot(root)
    incomplete = root / "step-00000014"
    (incomplete / "COMPLETE").unlink()
    assert main([str(incomplete), "--logdir", str(logdir)]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_lens_probe_re_probes_snapshots_with_the_probes_named_on_their_stored_batches(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    """``--probes`` on snapshots was refused ("applies to a nanoGPT ckpt.pt only"): a run trained without the
    composition probes could not get them in TensorBoard but by code. It now replaces the settings the snapshots
    carry, on the batches stored beside them; what it measures equals ``reprobe`` with those settings."""
    root = tmp_path / "snapshots"
    inputs, live = run_snapshots(root, tiny_config)
    table = tmp_path / "scalars.csv"
    assert main([str(root), "--csv", str(table), "--probes", "k_composition,induction", "--no-per-head-scalars"]) == 0
    with open(table, newline="") as f:
        rows = {(int(r["step"]), r["tag"]): float(r["value"]) for r in csv.DictReader(f)}
    expected = reprobe(root, settings={"probes": ["k_composition", "induction"], "per_head_scalars": False})
    assert rows == {(step, tag): value for step, scalars in expected for tag, value in scalars.items()}
    assert {tag for _, tag in rows} == {"lens/k_composition/max", "lens/k_composition/mean", "lens/induction/max",
                                        "lens/induction/mean"}
    for step in (7, 14):  # the stored batches: the induction values are the live run's
        assert rows[(step, "lens/induction/max")] == pytest.approx(live[step]["lens/induction/max"], rel=1e-6)
        model = load_snapshot(root / f"step-{step:08d}")
        assert rows[(step, "lens/k_composition/max")] == pytest.approx(
            composition_scores(model, "k").max().item(), rel=1e-5)


def test_lens_probe_and_reprobe_log_the_copying_scores_their_host_step_finishes(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    """Post hoc, the copying probe's host step runs as it does live (`measure`): ``lens-probe --probes copying``
    and ``reprobe`` log each head's ``copying_scores`` of the snapshot, not its compute() matrices."""
    from lens_callback.probes import copying_scores

    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    table = tmp_path / "scalars.csv"
    assert main([str(root), "--csv", str(table), "--probes", "copying"]) == 0
    with open(table, newline="") as f:
        rows = {(int(r["step"]), r["tag"]): float(r["value"]) for r in csv.DictReader(f)}
    expected = reprobe(root, settings={"probes": ["copying"]})
    assert rows == {(step, tag): value for step, scalars in expected for tag, value in scalars.items()}
    for step in (7, 14):
        scores = copying_scores(load_snapshot(root / f"step-{step:08d}")).numpy()
        logged = np.array([[rows[(step, f"lens/copying/L{l}H{h}")] for h in range(scores.shape[1])]
                           for l in range(scores.shape[0])])
        np.testing.assert_allclose(logged, scores, rtol=0, atol=1e-5)
        assert rows[(step, "lens/copying/max")] == pytest.approx(logged.max())


def test_probes_that_read_the_weights_only_re_probe_a_snapshot_without_its_roots_probe_inputs(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str]) -> None:
    """``copying`` and the composition probes read no batch, yet ``--probes copying`` on a snapshot copied out of
    its root (or a root whose probe inputs are gone) was refused, "no probe inputs", for a batch it never reads
    (second review of reads_batch). It re-probes the weights; a probe reading a batch is still refused."""
    from lens_callback.probes import copying_scores

    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    alone = tmp_path / "copied" / "step-00000014"
    shutil.copytree(root / "step-00000014", alone)
    table = tmp_path / "scalars.csv"
    assert main([str(alone), "--csv", str(table), "--probes", "copying,k_composition"]) == 0, capsys.readouterr().err
    with open(table, newline="") as f:
        rows = {(int(r["step"]), r["tag"]): float(r["value"]) for r in csv.DictReader(f)}
    model = load_snapshot(alone)
    assert rows[(14, "lens/copying/max")] == pytest.approx(copying_scores(model).max().item(), abs=1e-5)
    assert rows[(14, "lens/k_composition/max")] == pytest.approx(composition_scores(model, "k").max().item(), rel=1e-5)
    assert [step for step, _ in reprobe(alone, settings={"probes": ["copying"]})] == [14]
    # induction reads the repeated batch: the error said the file was missing, and no way on (posthoc review)
    with pytest.raises(FileNotFoundError, match=r"no probe inputs .*: a snapshot is re-probed on the probe inputs "
                                                r"its run wrote beside it; copy probe_inputs.json and "
                                                r"probe_inputs.safetensors from the directory it was written in into "
                                                rf"{re.escape(str(alone.parent))}, or re-probe it there \(probes "
                                                r"that read the weights only need none: --probes .*copying"):
        reprobe(alone, settings={"probes": ["copying", "induction"]})
    assert main([str(alone), "--csv", str(table)]) == 2
    assert "--probes q_composition,k_composition,v_composition,copying)\n" in capsys.readouterr().err


def test_lens_probe_probes_the_snapshots_cannot_run_are_one_line_naming_them(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str]) -> None:
    """``--probes logit_lens`` on a run that drew no text batch (text_batch=0), ``k_composition`` on a one-layer
    model and a ``--max-batch-tokens`` under a sequence were one line per snapshot, each saying the same of
    "settings" (a name the command line does not have): they are one line naming the command line's value."""
    repeated = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(0)).repeat(1, 2)
    own = {"probes": ["induction"], "probe_options": {}, "max_batch_tokens": None, "per_head_scalars": True}
    for name, layers in (("no-text", 2), ("one-layer", 1)):
        save_probe_inputs(tmp_path / name, ProbeInputs(repeated=repeated, text=None), {"repeat_length": 4, "seed": 0})
        for step in (7, 14, 21, 28):
            snapshot(tmp_path / name, step, make_gpt(tiny_config(n_layer=layers), seed=step),
                     metadata={"probe_settings": own})
    table = tmp_path / "out.csv"
    for name, flags, message in [
        ("no-text", ["--probes", "induction,logit_lens"],
         "command line: probes ['logit_lens'] need the text batch, which the probe inputs stored with the snapshots "
         "lack (they are re-probed on the batches their run drew)"),
        ("one-layer", ["--probes", "k_composition"],
         "command line: cannot run on the snapshots' model and their stored probe inputs: probe 'k_composition' "
         "scores heads against heads of earlier layers; a model of 1 layer has none"),
        ("no-text", ["--probes", "induction", "--max-batch-tokens", "3"],
         "command line: cannot run on the snapshots' model and their stored probe inputs: max_batch_tokens = 3 must "
         "be an int >= the probe sequence length"),
    ]:
        assert main([str(tmp_path / name), "--csv", str(table), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lens-probe: error: {message}"), err
        assert err.endswith(f"(step-00000007, step-00000014, step-00000021 and 1 more in {tmp_path / name}); "
                            f"nothing was probed\n"), err
        assert err.count("\n") == 1 and not table.exists()


def test_lens_probe_help_says_what_probes_does_for_snapshots_and_lists_the_default_probes_whole(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The group of --probes said "the other three apply with it", and the default probes, joined without spaces,
    were wrapped inside a name ("in" / "duction") at 80 columns (diff review)."""
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("what to measure (for snapshots: the settings they carry; with --probes, these four flags instead, those "
            "not given at their defaults)") in text
    assert f"(default for a ckpt.pt: {', '.join(DEFAULT_PROBES)}, without the text probes" in text


def test_lens_probe_probes_naming_no_probe_and_step_on_snapshots_are_refused_naming_the_value(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str]) -> None:
    """``--probes ""`` ran a ckpt.pt's default probes (exit 0), ``--probes ,`` was refused as "settings= on inputs=
    cannot run", and on snapshots "--probes names no probe" did not say what it was given, nor did a
    ``--probe-options`` that is not JSON; ``--step`` on snapshots
    was refused for the stored probe batches, which it has nothing to do with."""
    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", make_gpt(tiny_config()))
    table = tmp_path / "out.csv"
    for path, flags, message in [
        (tmp_path / "ckpt.pt", ["--probes", ""], "--probes '' names no probe"),
        (tmp_path / "ckpt.pt", ["--probes", " , "], "--probes ' , ' names no probe"),
        (root, ["--probes", ""], "--probes '' names no probe"),
        (root, ["--probes", "induction", "--probe-options", "{'induction': {}}"],
         "--probe-options \"{'induction': {}}\" is not valid JSON (Expecting property name enclosed in double quotes: "
         "line 1 column 2 (char 1)): give a JSON object, e.g. '{\"logit_lens\": {\"max_positions\": 32}}'"),
        (root, ["--step", "3"], "--step applies to a nanoGPT ckpt.pt only: snapshots are re-probed on the probe "
                                "batches stored beside them, each logged at its own step"),
    ]:
        assert main([str(path), "--csv", str(table), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(f"lens-probe: error: {message}") and err.count("\n") == 1, err
        assert not table.exists()


@pytest.mark.parametrize(
    ("keys", "value", "message"),
    [
        (("metadata", "probe_settings", "probes"), ["inducton"],
         r"unknown probe\(s\) \['inducton'\].*register_probe.*--import"),
        (("metadata", "probe_settings", "probe_options"), {"induction": {"x": 1}},
         r"probe_settings: probe_options\['induction'\]: .*unexpected keyword argument 'x'"),
        (("model_config", "dropout"), "0.0", r"model_config does not fit converter 'nanogpt': TypeError"),
    ],
    ids=["unknown-probe", "bad-probe-option", "string-dropout"],
)
def test_reprobe_errors_from_a_snapshots_config_name_the_file(
    keys: tuple[str, ...], value: Any, message: str, tmp_path: Path, tiny_config: Callable[..., GPTConfig],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In a root of hundreds of snapshots, a bad value in one ``config.json`` is found by its path,
    whether it raises ``ValueError`` or ``TypeError`` where it is used."""
    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    file = root / "step-00000014" / "config.json"
    config = json.loads(file.read_text())
    inner = config
    for key in keys[:-1]:
        inner = inner[key]
    inner[keys[-1]] = value
    file.write_text(json.dumps(config))

    # one bad snapshot of two: named, and the good one is not probed either, which the message says
    with pytest.raises(SnapshotError, match=f"^1 of 2 snapshots cannot be re-probed; nothing was probed .*:\n  "
                                            f"{re.escape(str(file))}: .*{message}"):
        reprobe(root)
    assert main([str(root), "--csv", str(tmp_path / "out.csv")]) == 2
    err = capsys.readouterr().err
    assert f"\n  {file}: " in err and "nothing was probed" in err and "Traceback" not in err, err


def edit_config(snapshot_dir: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Applies ``edit`` to a snapshot's ``config.json`` (as a hand edit or a newer writer would)."""
    file = snapshot_dir / "config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))
    return file


def test_lens_probe_checks_every_snapshot_before_probing_any(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad snapshots anywhere in the root (the last one truncated by a full disk, one probed on inputs
    that are gone, one from a newer lens_callback) are all named before any snapshot is probed, and
    nothing is written; a directory without COMPLETE (a write in progress) is not one of them."""
    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    for step in (21, 28, 35):
        snapshot(root, step, make_gpt(tiny_config(), seed=step), metadata={"probe_settings": PROBE_SETTINGS})
    other_inputs = edit_config(root / "step-00000014", lambda c: c["metadata"].update(probe_inputs_sha256="0" * 64))
    newer = edit_config(root / "step-00000021", lambda c: c.update(format_version=2))
    truncated = root / "step-00000035" / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (root / "step-00000028" / "COMPLETE").unlink()
    probed: list[int] = []
    real_measure = posthoc_module._measure
    monkeypatch.setattr(posthoc_module, "_measure", lambda *args: probed.append(1) or real_measure(*args))

    table, logdir = tmp_path / "out" / "scalars.csv", tmp_path / "tb"
    assert main([str(root), "--csv", str(table), "--logdir", str(logdir)]) == 2
    err = capsys.readouterr().err
    assert "3 of 4 snapshots cannot be re-probed; nothing was probed" in err, err
    for bad in (newer, truncated):
        assert str(bad) in err, (bad, err)
    assert "(the inputs of step-00000014)" in err, err
    assert "step-00000007" not in err and "step-00000028" not in err
    assert probed == [] and not table.exists() and list(logdir.iterdir()) == []

    with pytest.raises(SnapshotError, match="3 of 4 snapshots") as info:
        iter_reprobe(root)  # raised when called, before the first result is asked for
    assert "probed on other inputs" in str(info.value) and "format_version 2" in str(info.value)
    assert "model.safetensors: unreadable, truncated or corrupt" in str(info.value)
    # one bad snapshot: its own error, as it was
    with pytest.raises(SnapshotError, match=r"^\S*step-00000035/model.safetensors: unreadable, truncated"):
        reprobe(root / "step-00000035")
    # inputs that lack a batch the probes need
    inputs, _ = load_probe_inputs(root)
    with pytest.raises(ValueError, match=r"probes \['attn_entropy', 'logit_lens', 'icl_score'\] need the text batch"):
        reprobe(root / "step-00000007", inputs=ProbeInputs(repeated=inputs.repeated, text=None))
    # weights that do not fit their converter, found from the header
    partial = {k: v for k, v in make_gpt(tiny_config()).state_dict().items() if k != "transformer.ln_f.weight"}
    misfit = save_snapshot(tmp_path / "other", 7, converter="nanogpt", model_config=tiny_config().to_dict(),
                           state_dict=partial, metadata={"probe_settings": PROBE_SETTINGS})
    with pytest.raises(SnapshotError, match=r"step-00000007: weights do not fit converter 'nanogpt'.*ln_f.weight"):
        iter_reprobe(misfit)
    assert probed == []


def test_a_root_shared_by_two_runs_is_probed_one_run_at_a_time(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Two runs that wrote into one directory were probed into one curve, the later run's values
    between the earlier one's (README review); each snapshot records its run's id."""
    root = tmp_path / "snapshots"
    _, live = run_snapshots(root, tiny_config)
    edit_config(root / "step-00000007", lambda c: c["metadata"].update(run_id="a1" * 16))
    edit_config(root / "step-00000014", lambda c: c["metadata"].update(run_id="b2" * 16))
    table = tmp_path / "out.csv"
    assert main([str(root), "--csv", str(table)]) == 2
    err = capsys.readouterr().err
    assert "holds the snapshots of 2 training runs" in err and "a1a1a1a1a1a1 (steps 7); b2b2b2b2b2b2 (steps 14)" in err
    assert "--run ID" in err and not table.exists()
    for run, step in (("a1a1", 7), ("b2" * 16, 14)):
        assert main([str(root), "--csv", str(table), "--run", run]) == 0
        with open(table, newline="") as f:
            assert {(int(r["step"]), r["tag"]): float(r["value"]) for r in csv.DictReader(f)} == {
                (step, tag): value for tag, value in live[step].items()}
    assert reprobe(root, run="b2") == [(14, live[14])]
    with pytest.raises(SnapshotError, match=r"no run id starts with 'c3'; its runs: a1a1a1a1a1a1 \(steps 7\)"):
        reprobe(root, run="c3")
    assert main([str(root / "step-00000007"), "--csv", str(table)]) == 0  # one snapshot: one run
    assert main([str(tmp_path / "missing.pt"), "--csv", str(table)]) == 2
    # the run is chosen before the checks: another run's snapshot whose inputs are gone does not block
    # it (diff review)
    edit_config(root / "step-00000007", lambda c: c["metadata"].update(probe_inputs_sha256="0" * 64))
    assert reprobe(root, run="b2") == [(14, live[14])]
    with pytest.raises(SnapshotError, match="probed on other inputs"):
        reprobe(root, run="a1")
    edit_config(root / "step-00000007", lambda c: c["metadata"].pop("probe_inputs_sha256"))
    # snapshots without a run id (an earlier version's) before the one run with an id: that run's
    # first part, resumed (diff review: refused, and no --run could pick them)
    edit_config(root / "step-00000007", lambda c: c["metadata"].pop("run_id"))
    assert reprobe(root) == [(7, live[7]), (14, live[14])]
    edit_config(root / "step-00000014", lambda c: c["metadata"].pop("run_id"))
    edit_config(root / "step-00000007", lambda c: c["metadata"].update(run_id="c3" * 16))  # after: two runs
    with pytest.raises(SnapshotError, match=r"c3c3c3c3c3c3 \(steps 7\); \(no run id\) \(steps 14\)|"
                                            r"\(no run id\) \(steps 14\); c3c3c3c3c3c3 \(steps 7\)"):
        reprobe(root)
    assert reprobe(root, run="none") == [(14, live[14])]
    # --run on one snapshot directory was ignored: another run's snapshot was probed, exit 0 (post-hoc review)
    with pytest.raises(SnapshotError, match=r"step-00000007: not a snapshot of run 'a1' \(its config.json names c3c3"):
        reprobe(root / "step-00000007", run="a1")
    assert reprobe(root / "step-00000007", run="c3") == [(7, live[7])]
    assert main([str(root / "step-00000014"), "--csv", str(table), "--run", "c3"]) == 0  # no id: may be its first part
    assert main([str(root / "step-00000007"), "--csv", str(table), "--run", "none"]) == 2
    assert "not a snapshot of run 'none'" in capsys.readouterr().err


def test_lens_probe_marks_its_log_with_the_run_id_so_two_runs_in_one_logdir_are_refused(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    """Two runs re-probed into one --logdir were drawn by lens-report as one stitched curve, exit 0:
    lens-probe wrote no run-id marker (report review)."""
    from lens_callback.metrics import read_all_points
    from lens_callback.report import make_report

    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    edit_config(root / "step-00000007", lambda c: c["metadata"].update(run_id="a1" * 16))
    edit_config(root / "step-00000014", lambda c: c["metadata"].update(run_id="b2" * 16))
    logdir = tmp_path / "tb"
    for run in ("a1", "b2"):
        assert main([str(root), "--logdir", str(logdir), "--run", run]) == 0
    points = read_all_points(logdir, tags="lens/induction/max", run_ids=True)
    assert sorted(zip(points["step"], points["run_id"])) == [(7, "a1" * 16), (14, "b2" * 16)]
    with pytest.raises(ValueError, match=r"holds 2 runs \(LensCallback run ids: a1a1a1a1"):
        make_report(logdir, tmp_path / "r.png")
    # the same run probed twice into one directory is one run
    alone = tmp_path / "alone"
    for _ in range(2):
        assert main([str(root), "--logdir", str(alone), "--run", "a1"]) == 0
    make_report(alone, tmp_path / "alone.png")


def test_a_bad_probe_inputs_file_is_read_and_reported_once(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated probe_inputs.safetensors was hashed and listed once per snapshot (post-hoc review)."""
    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    inputs_file = root / "probe_inputs.safetensors"
    inputs_file.write_bytes(inputs_file.read_bytes()[:-8])
    assert main([str(root), "--csv", str(tmp_path / "out.csv")]) == 2
    err = capsys.readouterr().err
    assert "2 of 2 snapshots cannot be re-probed; nothing was probed:" in err, err
    assert err.count(str(inputs_file)) == 1 and "(the inputs of step-00000007, step-00000014)" in err, err
    with pytest.raises(SnapshotError, match=r"^\S*step-00000007: \S*probe_inputs"):
        reprobe(root / "step-00000007")


def test_lens_probe_keeps_the_results_before_a_late_failure(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure that no check could foresee (a read error while loading the second snapshot's
    weights, a probe crashing) still exits 2, or raises, but the models probed before it are written."""
    root = tmp_path / "snapshots"
    _, live = run_snapshots(root, tiny_config)
    real_load = posthoc_module.load_snapshot_weights

    def read_error(path: Path) -> Any:
        if path.name == "step-00000014":
            raise OSError(errno.EIO, "Input/output error", str(path / "model.safetensors"))
        return real_load(path)

    monkeypatch.setattr(posthoc_module, "load_snapshot_weights", read_error)
    table, logdir = tmp_path / "scalars.csv", tmp_path / "tb"
    assert main([str(root), "--csv", str(table), "--logdir", str(logdir)]) == 2
    err = capsys.readouterr().err
    assert "Input/output error" in err and "step-00000014" in err and "Traceback" not in err
    assert f"wrote the 1 model(s) probed before it (step(s) [7]) to {logdir} and {table}" in err, err
    with open(table, newline="") as f:
        rows = {(int(r["step"]), r["tag"]): float(r["value"]) for r in csv.DictReader(f)}
    assert rows == {(7, tag): value for tag, value in live[7].items()}
    assert sorted(read_metrics(logdir)["step"].unique()) == [7]

    monkeypatch.setattr(posthoc_module, "load_snapshot_weights", real_load)
    real_measure = posthoc_module._measure
    calls: list[int] = []

    def crash_second(*args: Any) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")  # not a user mistake: raised, after writing
        return real_measure(*args)

    monkeypatch.setattr(posthoc_module, "_measure", crash_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        main([str(root), "--csv", str(tmp_path / "again.csv")])
    assert "wrote the 1 model(s) probed before it (step(s) [7])" in capsys.readouterr().err
    with open(tmp_path / "again.csv", newline="") as f:
        assert {int(r["step"]) for r in csv.DictReader(f)} == {7}

    # a sys.exit(0) in a user's probe code mid-sweep exited 0 after writing part of the sweep (post-hoc review)
    calls.clear()

    def exit_second(*args: Any) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit(0)
        return real_measure(*args)

    monkeypatch.setattr(posthoc_module, "_measure", exit_second)
    assert main([str(root), "--csv", str(tmp_path / "exited.csv")]) == 2
    err = capsys.readouterr().err
    assert "sys.exit(0) was called during the sweep" in err and "wrote the 1 model(s) probed before it" in err
    ckpt = tmp_path / "ckpt.pt"  # and for a checkpoint, whose one model was probed outside that handling (diff review)
    write_nanogpt_ckpt(ckpt, make_gpt(tiny_config()))
    calls[:] = [1]
    assert main([str(ckpt), "--csv", str(tmp_path / "ckpt.csv")]) == 2
    assert "sys.exit(0) was called during the sweep" in capsys.readouterr().err
    assert not (tmp_path / "ckpt.csv").exists()


def test_a_probe_raising_while_re_probing_stops_lens_probe_with_its_name(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner isolates a probe's exception (as in training) and lens-probe read only the scalars:
    the probe's tags were missing from the table and the exit status was 0 (post-hoc review)."""
    from lens_callback.posthoc import ProbeFailure, reprobe
    from lens_callback.probes import InductionProbe

    root = tmp_path / "snapshots"
    _, live = run_snapshots(root, tiny_config)
    real_compute = InductionProbe.compute
    calls: list[int] = []

    def fails_at_the_second_model(self: InductionProbe) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("accumulator overflow")
        return real_compute(self)

    monkeypatch.setattr(InductionProbe, "compute", fails_at_the_second_model)
    table = tmp_path / "scalars.csv"
    assert main([str(root), "--csv", str(table)]) == 2
    err = capsys.readouterr().err
    assert ("step-00000014: probe 'induction' failed in compute(): RuntimeError: accumulator overflow" in err
            and "Traceback" not in err), err
    assert "wrote the 1 model(s) probed before it (step(s) [7])" in err
    with open(table, newline="") as f:
        assert {int(r["step"]) for r in csv.DictReader(f)} == {7}
    calls.clear()
    with pytest.raises(ProbeFailure, match="probe 'induction' failed") as failure:
        reprobe(root)
    # it says how to leave the probe out, and that way re-probes the rest (custom-probe review) as the run measured
    # them: with the snapshots' other settings (the logit lens's max_positions; its settings were {'probes': [...]},
    # whose default options gave other logit-lens numbers: diff review)
    hint = re.search(r"reprobe\(path, settings=(\{'probes': .*?\})\) in Python", str(failure.value))
    assert hint is not None, failure.value
    settings = ast.literal_eval(hint.group(1))
    assert "induction" not in settings["probes"] and settings["probes"]
    assert settings["probe_options"] == PROBE_SETTINGS["probe_options"]
    calls.clear()
    reprobed = reprobe(root, settings=settings)
    assert [step for step, _ in reprobed] == [7, 14]
    for step, scalars in reprobed:
        assert scalars == {tag: value for tag, value in live[step].items() if not tag.startswith("lens/induction/")}


def test_a_probe_raising_while_re_probing_says_the_lens_probe_flags_that_leave_it_out(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The hint said "lens-probe takes a snapshot's own settings", which stopped being true when ``--probes`` came
    to snapshots: it gives the flags that re-probe the others with the run's options (the logit lens's
    ``max_positions``; ``--probes`` alone would take their defaults), and those flags do (diff review)."""
    import shlex

    from lens_callback.probes import InductionProbe

    root = tmp_path / "snapshots"
    _, live = run_snapshots(root, tiny_config)
    real_compute = InductionProbe.compute

    def fails(self: InductionProbe) -> dict[str, torch.Tensor]:
        raise RuntimeError("accumulator overflow")

    monkeypatch.setattr(InductionProbe, "compute", fails)
    assert main([str(root), "--csv", str(tmp_path / "failed.csv")]) == 2
    err = capsys.readouterr().err
    assert "lens-probe takes a snapshot's own settings" not in err, err
    hint = re.search(r", or on lens-probe's command line (.*)\)$", err.strip())
    assert hint is not None, err
    flags = shlex.split(hint.group(1))
    assert flags[:2] == ["--probes", ",".join(p for p in DEFAULT_PROBES if p != "induction")], flags
    monkeypatch.setattr(InductionProbe, "compute", real_compute)
    table = tmp_path / "scalars.csv"
    assert main([str(root), "--csv", str(table), *flags]) == 0
    with open(table, newline="") as f:
        rows = {(int(r["step"]), r["tag"]): float(r["value"]) for r in csv.DictReader(f)}
    expected = {(step, tag): value for step, scalars in live.items() for tag, value in scalars.items()
                if not tag.startswith("lens/induction/")}
    assert rows.keys() == expected.keys()
    for key, value in expected.items():  # the run's logit-lens options: its numbers
        assert rows[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key


def test_the_command_line_flags_of_probe_settings_give_them_back() -> None:
    """`_command_line_flags` (a failing probe's hint) is `_command_line_settings`'s reverse, and gives none for an
    option JSON cannot hold (one set in Python)."""
    import shlex

    from lens_callback.posthoc import ProbeSettings, _command_line_flags, _command_line_settings
    from lens_callback.probe_cli import build_parser

    for settings in (ProbeSettings(("induction",)),
                     ProbeSettings(("logit_lens", "k_composition"), {"logit_lens": {"max_positions": 8}}, 64, False)):
        flags = _command_line_flags(settings)
        assert flags is not None
        args = build_parser().parse_args(["ckpt.pt", *shlex.split(flags)])
        assert _command_line_settings(args, args.probes.split(",")) == settings, flags
    assert _command_line_flags(ProbeSettings(("induction",), {"induction": {"heads": {1, 2}}})) is None


def test_lens_probe_on_nanogpt_checkpoint(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, make_gpt(tiny_config()), iter_num=300)
    logdir = tmp_path / "tb"
    assert main([str(path), "--logdir", str(logdir), "--repeat-length", "6"]) == 0
    frame = read_metrics(logdir)
    assert set(frame["step"]) == {300}
    assert {"lens/induction/max", "lens/repeated_loss"} <= set(frame["tag"])
    assert "lens/icl_score" not in set(frame["tag"])  # no --text: only the repeated-batch probes

    text = tmp_path / "val.bin"
    torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(1)).to(torch.int16).numpy().tofile(text)
    assert main([str(path), "--csv", str(tmp_path / "s.csv"), "--text", str(text), "--text-len", "16", "--step", "5"]) == 0
    with open(tmp_path / "s.csv", newline="") as f:
        tags = {row["tag"] for row in csv.DictReader(f) if row["step"] == "5"}
    assert {"lens/icl_score", "lens/attn_entropy/max", "lens/induction/max"} <= tags
    assert main([str(path), "--csv", str(tmp_path / "t.csv"), "--probes", "icl_score"]) == 2  # needs --text


def _checkpoint_and_text(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> tuple[Path, Path, str]:
    """A nanoGPT ckpt.pt at iter 3, a 200-token ``--text`` file for it, and a CSV path to write."""
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, make_gpt(tiny_config()), iter_num=3)
    text = tmp_path / "val.bin"
    torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(1)).to(torch.int16).numpy().tofile(text)
    return path, text, str(tmp_path / "s.csv")


def test_lens_probe_refuses_a_checkpoint_flag_of_a_batch_that_is_not_drawn(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    """--text-len without --text, or --repeat-length 500 with only text probes, were accepted and had no
    effect (posthoc review); flags that do nothing are errors, as checkpoint flags on snapshots are."""
    path, text, csv_path = _checkpoint_and_text(tmp_path, tiny_config)
    for flags, message in [
        (["--text-len", "8", "--text-batch", "2"], "--text-len, --text-batch set the text batch, which is drawn from --text FILE only"),
        (["--token-min-frequency", "0.01"], "--token-min-frequency sets the token pool of the repeated batch drawn "
                                            "from --text FILE; without --text it is the whole vocabulary"),
        (["--text", str(text), "--probes", "icl_score", "--token-min-frequency", "0.01"],
         "--token-min-frequency sets the repeated batch, which no chosen probe reads (probes: icl_score)"),
        (["--text", str(text), "--probes", "icl_score", "--repeat-length", "500"],
         "--repeat-length sets the repeated batch, which no chosen probe reads (probes: icl_score)"),
    ]:
        assert main([str(path), "--csv", csv_path, *flags]) == 2
        assert message in capsys.readouterr().err
        assert not Path(csv_path).exists()
    # a misspelt probe is named as such, not blamed on the flag (diff review)
    assert main([str(path), "--csv", csv_path, "--probes", "inducton", "--repeat-length", "4"]) == 2
    assert "unknown probe name(s) ['inducton']" in capsys.readouterr().err
    assert main([str(path), "--csv", csv_path, "--text", str(text), "--probes", "icl_score", "--text-len", "8"]) == 0


def test_lens_probe_refuses_text_and_seed_for_checkpoint_probes_that_read_the_weights_only(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    """``copying`` and the composition probes read no batch, so none is drawn for them: ``--seed`` and ``--text``
    beside them alone were accepted and did nothing (and a --text id outside the vocabulary was refused for a
    batch nobody reads), where a flag of a batch that is not drawn is refused (second review of reads_batch)."""
    path, text, csv_path = _checkpoint_and_text(tmp_path, tiny_config)
    for flags, message in [
        (["--seed", "5"], "--seed sets the probe batches, which no chosen probe reads (probes: copying, "
                          "k_composition, which read the weights only): leave --seed out"),
        (["--text", str(text), "--seed", "0"], "--text, --seed set the probe batches, which no chosen probe reads"),
    ]:
        assert main([str(path), "--csv", csv_path, "--probes", "copying,k_composition", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not Path(csv_path).exists()
    # beside a probe reading a batch they set it, as before
    assert main([str(path), "--csv", csv_path, "--probes", "copying,induction", "--seed", "5"]) == 0
    assert main([str(path), "--csv", csv_path, "--probes", "copying"]) == 0


def test_lens_probe_encodes_a_text_file_with_the_runs_meta_pkl_and_refuses_raw_bytes_for_another_vocabulary(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], make_nanogpt_data_dir: Callable[..., Path],
    tiny_text_file: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """``--text input.txt`` was read as raw bytes whatever the vocabulary: a character-level run's letters were
    ids past its table (refused, with no hint of the way that works), a GPT-2 run's ids in range but not the text's
    tokens (probed without a word). Raw bytes are for a byte-level vocabulary; ``--meta`` encodes the text with the
    run's ``meta.pkl``, to the same ids (so the same values) as its prepare.py's token file."""
    chars = sorted(set(tiny_text_file.read_text(encoding="utf-8")))  # a table of 64 ids (write_nanogpt_ckpt's)
    table = {"vocab_size": 64, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    root = make_nanogpt_data_dir(meta=table)
    meta = pickle.loads((root / "meta.pkl").read_bytes())
    ckpt = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(ckpt, make_gpt(tiny_config()), iter_num=3)
    whole = tmp_path / "whole.bin"  # the text's ids as prepare.py writes them (train.bin + val.bin, uncut)
    text = tiny_text_file.read_text(encoding="utf-8")  # the data dir's text
    np.array([meta["stoi"][c] for c in text], dtype=np.uint16).tofile(whole)

    def probed(*flags: str) -> list[dict[str, str]]:
        out = tmp_path / "s.csv"
        out.unlink(missing_ok=True)
        assert main([str(ckpt), "--csv", str(out), "--text-len", "8", *flags]) == 0, capsys.readouterr().err
        with open(out, newline="") as f:
            return list(csv.DictReader(f))

    encoded = probed("--text", str(tiny_text_file), "--meta", str(root / "meta.pkl"))
    assert encoded == probed("--text", str(whole))
    assert {"lens/icl_score", "lens/attn_entropy/max"} <= {row["tag"] for row in encoded}
    # a table given as itos alone encodes the same, also with the model's vocabulary padded past the table's
    itos_only = make_nanogpt_data_dir("itos", meta={"vocab_size": len(chars), "itos": meta["itos"]})
    assert probed("--text", str(tiny_text_file), "--meta", str(itos_only / "meta.pkl")) == encoded

    odd = tmp_path / "odd.txt"
    odd.write_text(text + "Zq~", encoding="utf-8")
    other = make_nanogpt_data_dir("other", meta={**table, "vocab_size": 65})
    for flags, message in [
        (["--text", str(tiny_text_file)], f"--text {tiny_text_file} would be read as raw bytes, ids 0-255 (a "
                                          f"byte-level vocabulary of 256 ids), but the checkpoint's vocab_size is "
                                          f"{meta['vocab_size']}: pass its data's token file"),
        (["--meta", str(root / "meta.pkl")], f"--meta {root / 'meta.pkl'} encodes the --text file, and no --text"),
        (["--text", str(whole), "--meta", str(root / "meta.pkl")], f"--text {whole} holds token ids already"),
        (["--text", str(tiny_text_file), "--meta", str(other / "meta.pkl")],
         f"--meta {other / 'meta.pkl'} has vocab_size 65, more ids than the checkpoint's 64: it is another run's"),
        (["--text", str(odd), "--meta", str(root / "meta.pkl")], "holds characters --meta"),
        (["--text", str(tiny_text_file), "--meta", str(tmp_path / "missing.pkl")], "--meta file not found"),
    ]:
        assert main([str(ckpt), "--csv", str(tmp_path / "x.csv"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "x.csv").exists()
    # the unknown characters are named
    assert main([str(ckpt), "--csv", str(tmp_path / "x.csv"), "--text", str(odd), "--meta", str(root / "meta.pkl")]) == 2
    assert "'Z', 'q', '~'" in capsys.readouterr().err
    table_less = make_nanogpt_data_dir("table-less", meta={"vocab_size": meta["vocab_size"]})
    assert main([str(ckpt), "--csv", str(tmp_path / "x.csv"), "--text", str(tiny_text_file),
                 "--meta", str(table_less / "meta.pkl")]) == 2
    assert "holds no character table" in capsys.readouterr().err
    # a byte-level vocabulary still reads any file's raw bytes
    byte_ckpt = tmp_path / "bytes.pt"
    write_nanogpt_ckpt(byte_ckpt, make_gpt(tiny_config(vocab_size=256)), iter_num=3)
    assert main([str(byte_ckpt), "--csv", str(tmp_path / "b.csv"), "--text", str(tiny_text_file), "--text-len", "8"]) == 0

def test_lens_probe_keeps_carriage_returns_of_a_text_whose_meta_pkl_has_an_id_for_them(
    make_nanogpt_data_dir: Callable[..., Path], tmp_path: Path,
) -> None:
    """``--text FILE --meta meta.pkl`` read the text with universal newlines, as nanoGPT's prepare.py reads its
    input: "\\r\\n" and "\\r" became "\\n". A table that has an id for "\\r" was made from text whose carriage
    returns were kept, so they are the run's own ids and were silently encoded as newlines (tok review); a table
    without one still reads them as prepare.py does."""
    from lens_callback.posthoc import _encode_with_meta

    text = tmp_path / "crlf.txt"
    text.write_bytes(b"ab\r\nba\rab\n")
    for name, chars in (("with-cr", "\n\rab"), ("without-cr", "\nab")):
        table = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
        meta = make_nanogpt_data_dir(name, meta=table) / "meta.pkl"
        expected = "ab\r\nba\rab\n" if "\r" in chars else "ab\nba\nab\n"
        assert _encode_with_meta(text, meta, 8).tolist() == [chars.index(c) for c in expected], name


def test_lens_probe_reads_a_token_file_named_in_upper_case_as_a_token_file(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str],
) -> None:
    """``--text VAL.BIN`` (a name from a case-insensitive file system) was not a ``.bin`` file: for a byte-level
    vocabulary its uint16 ids were read as raw bytes, each id and a zero byte, probed without a word (other values
    than ``val.bin``'s, review of --meta); for another it was refused as a text to encode with --meta."""
    ckpt = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(ckpt, make_gpt(tiny_config(vocab_size=256)), iter_num=3)
    ids = np.random.default_rng(0).integers(0, 256, 400).astype(np.uint16)
    lower, upper = tmp_path / "val.bin", tmp_path / "VAL.BIN"
    ids.tofile(lower)
    ids.tofile(upper)

    def probed(text: Path) -> list[dict[str, str]]:
        out = tmp_path / f"{text.name}.csv"
        assert main([str(ckpt), "--csv", str(out), "--text-len", "8", "--text", str(text)]) == 0, (
            capsys.readouterr().err)
        with open(out, newline="") as f:
            return list(csv.DictReader(f))

    assert probed(upper) == probed(lower)
    assert main([str(ckpt), "--csv", str(tmp_path / "x.csv"), "--text", str(upper),
                 "--meta", str(tmp_path / "m.pkl")]) == 2
    assert f"--text {upper} holds token ids already" in capsys.readouterr().err



def test_lens_probe_says_a_directory_given_as_text_or_meta_is_one_and_names_the_file_in_it(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], make_nanogpt_data_dir: Callable[..., Path],
    tiny_text_file: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A nanoGPT data dir given as ``--text`` or ``--meta`` (its path is the one a user has at hand) was "file not
    found", of a path that is there (review of --meta): it is named a directory, with the file in it to pass."""
    ckpt = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(ckpt, make_gpt(tiny_config()), iter_num=3)
    root = make_nanogpt_data_dir()
    for flags, message in [
        (["--text", str(root)], f"--text {root} is a directory: pass a file in it (a nanoGPT data dir's val.bin"),
        (["--text", str(tiny_text_file), "--meta", str(root)],
         f"--meta {root} is a directory: pass the meta.pkl in it"),
    ]:
        assert main([str(ckpt), "--csv", str(tmp_path / "x.csv"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "not found" not in err, err


def _spy_checkpoint_inputs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records the keyword arguments ``lens-probe`` hands ``checkpoint_probe_inputs`` (which still runs)."""
    calls: list[dict[str, Any]] = []
    real = posthoc_module.checkpoint_probe_inputs

    def spy(*args: Any, **kwargs: Any) -> ProbeInputs:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(posthoc_module, "checkpoint_probe_inputs", spy)
    return calls


def test_lens_probe_reads_a_bin_text_as_nanogpt_uint16_token_ids(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``--text val.bin`` is nanoGPT's uint16 ids; read otherwise, a BPE model's icl_score is measured on garbage."""
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, make_gpt(GPTConfig(block_size=32, vocab_size=512, n_layer=1, n_head=2, n_embd=16)))
    ids = (np.arange(600) * 7 % 512).astype(np.uint16)  # ids above 255, as any GPT-2 tokenised val.bin has
    ids.tofile(tmp_path / "val.bin")
    calls = _spy_checkpoint_inputs(monkeypatch)
    assert main([str(path), "--csv", str(tmp_path / "s.csv"), "--text", str(tmp_path / "val.bin"),
                 "--probes", "icl_score", "--text-batch", "1"]) == 0
    text = np.asarray(calls[0]["text"])
    assert text.dtype == np.uint16 and np.array_equal(text, np.fromfile(tmp_path / "val.bin", dtype=np.uint16))


def test_a_text_shorter_than_a_window_names_text_len_and_its_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lens-probe ckpt.pt --text val.bin`` of fewer tokens than a window said "data has 10 tokens, fewer than
    seq_len=16": neither the argument nor the flag (posthoc review; make_probe_inputs names its own since the
    inputs review). checkpoint_probe_inputs names text_len, and so lens-probe's message names --text-len."""
    from lens_callback.posthoc import checkpoint_probe_inputs

    with pytest.raises(ValueError, match=r"^the text has 10 tokens, fewer than text_len=16, one window of the "
                                         r"text batch: pass a longer text or a smaller text_len "
                                         r"\(lens-probe: --text-len\)$"):
        checkpoint_probe_inputs(64, repeat_length=4, text=torch.arange(10), text_len=16)
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, make_gpt(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)))
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "val.bin")
    assert main([str(path), "--csv", str(tmp_path / "s.csv"), "--text", str(tmp_path / "val.bin")]) == 2
    assert "the text has 10 tokens, fewer than text_len=16" in capsys.readouterr().err
    assert main([str(path), "--csv", str(tmp_path / "s.csv"), "--text", str(tmp_path / "val.bin"),
                 "--text-len", "10"]) == 0


def test_lens_probe_names_the_flags_whose_batches_or_settings_a_checkpoint_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lens-probe ckpt.pt --repeat-length 9`` on a block_size of 16 said "inputs.repeated has 18 tokens per
    sequence", and ``--max-batch-tokens 3`` "settings= on inputs= cannot run": reprobe's arguments, which the
    command line has none of (posthoc review). They name the flag and the largest value that fits."""
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, make_gpt(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)))
    (np.arange(600) % 60).astype(np.uint16).tofile(tmp_path / "val.bin")
    out = ["--csv", str(tmp_path / "s.csv")]
    for flags, message in (
        (["--repeat-length", "9"], "--repeat-length 9: the repeated batch's sequences would hold 18 tokens, more "
                                   "than the checkpoint's block_size = 16: pass --repeat-length 8 or less\n"),
        (["--text", str(tmp_path / "val.bin"), "--text-len", "17"],
         "--text-len 17: the text batch's sequences would hold 17 tokens, more than the checkpoint's block_size = 16: "
         "pass --text-len 16 or less\n"),
        (["--max-batch-tokens", "3"], "the probe settings on the probe batches cannot run on this checkpoint's "
                                      "model: max_batch_tokens = 3"),
    ):
        assert main([str(path), *out, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "inputs" not in err and "settings=" not in err, err
    assert main([str(path), *out, "--repeat-length", "8", "--text", str(tmp_path / "val.bin"), "--text-len", "16"]) == 0


def test_lens_probe_default_text_len_is_at_most_128(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``--text-len`` the text windows are min(128, block_size) long, not a whole (slow) long context."""
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, make_gpt(GPTConfig(block_size=256, vocab_size=64, n_layer=1, n_head=2, n_embd=16)))
    torch.randint(0, 64, (600,), generator=torch.Generator().manual_seed(1)).to(torch.int16).numpy().tofile(
        tmp_path / "val.bin")
    calls = _spy_checkpoint_inputs(monkeypatch)
    assert main([str(path), "--csv", str(tmp_path / "s.csv"), "--text", str(tmp_path / "val.bin"),
                 "--probes", "icl_score", "--text-batch", "1"]) == 0
    assert calls[0]["text_len"] == 128


def test_reprobe_a_short_context_checkpoint_with_default_inputs(tmp_path: Path,
                                                                tiny_config: Callable[..., GPTConfig]) -> None:
    """reprobe(ckpt.pt) picks repeat_length = block_size // 2, so a 16-token model's two halves fit its context."""
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, make_gpt(tiny_config(block_size=16)), iter_num=7)
    [(step, scalars)] = reprobe(path)
    assert step == 7 and "lens/induction/max" in scalars


def test_checkpoint_text_ids_equal_to_vocab_size_are_refused() -> None:
    """A text id == vocab_size is out of range: it must be a clear ValueError, not an embedding index error."""
    from lens_callback.posthoc import checkpoint_probe_inputs

    with pytest.raises(ValueError, match="token id 10 >= the model's vocab_size=10"):
        checkpoint_probe_inputs(10, repeat_length=4, text=np.array([0, 10] * 20), text_len=4)
    checkpoint_probe_inputs(10, repeat_length=4, text=np.array([0, 9] * 20), text_len=4)  # the largest valid id
    with pytest.raises(ValueError, match="token id -1 < 0"):  # indexing would read it as id 9 (post-hoc review)
        checkpoint_probe_inputs(10, repeat_length=4, text=np.array([0, -1] * 20), text_len=4)


def test_reprobe_of_a_checkpoint_checks_its_inputs_before_returning(tmp_path: Path,
                                                                    tiny_config: Callable[..., GPTConfig]) -> None:
    """iter_reprobe(ckpt.pt, inputs=...) returned an iterator whose first next() raised: a raw IndexError
    or RuntimeError for ids outside the vocabulary (a -1 scored as the last id by attention probes),
    a ValueError for a text probe without text or sequences past the context (post-hoc review)."""
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, make_gpt(tiny_config(block_size=16)), iter_num=7)
    good = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    cases = [
        (ProbeInputs(repeated=torch.cat([good[:, :8], good[:, :8]], 1) - 1, text=None), None, r"inputs=: the repeated batch holds token id -1"),
        (ProbeInputs(repeated=good[:, :8], text=good + 64), None, r"inputs=: the text batch holds token id \d+, outside"),
        (ProbeInputs(repeated=good[:, :8], text=None), {"probes": ["icl_score"]}, r"settings: probes \['icl_score'\] need the text batch"),
        (ProbeInputs(repeated=torch.cat([good, good], 1), text=None), None, r"inputs.repeated has 32 tokens per sequence, more than "
                                                                r"the model's block_size = 16"),
    ]
    for inputs, settings, message in cases:
        with pytest.raises(ValueError, match=message):
            iter_reprobe(path, inputs=inputs, settings=settings)
    [(step, scalars)] = reprobe(path, inputs=ProbeInputs(repeated=torch.cat([good[:, :8], good[:, :8]], 1), text=None))
    assert step == 7 and math.isfinite(scalars["lens/induction/max"])
    # a batch no probe reads is not checked (diff review: an unused text batch was refused)
    unused = ProbeInputs(repeated=torch.cat([good[:, :8], good[:, :8]], 1), text=good + 300)
    assert reprobe(path, inputs=unused, settings={"probes": ["induction"]})[0][1]["lens/induction/max"] == pytest.approx(
        scalars["lens/induction/max"])



def test_checkpoint_probe_batches_past_the_token_cap_are_refused_naming_the_setting(tmp_path: Path,
                                                                                  tiny_config: Callable[..., GPTConfig],
                                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """lens-probe's --repeat-batch / --text-batch had no cap (the callback's repeat_batch/text_batch do)."""
    from lens_callback.posthoc import checkpoint_probe_inputs

    with pytest.raises(ValueError, match=r"repeat_batch = 300000000 rows of 8 tokens = 2,400,000,000 tokens"):
        checkpoint_probe_inputs(10, repeat_length=4, repeat_batch=300_000_000)
    with pytest.raises(ValueError, match=r"text_batch = 10000000 rows of 4 tokens"):
        checkpoint_probe_inputs(10, repeat_length=4, text=np.array([0, 9] * 20), text_len=4, text_batch_size=10**7)
    ckpt = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(ckpt, make_gpt(tiny_config()))
    assert main([str(ckpt), "--csv", str(tmp_path / "out.csv"), "--repeat-batch", str(10**8)]) == 2
    assert "repeat_batch = 100000000 rows" in capsys.readouterr().err


def test_reprobe_honours_dtype_for_snapshots_and_checkpoints(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """reprobe(path, dtype=float64) probes a float64 model, for a snapshot root and for a ckpt.pt alike."""
    model = make_gpt(tiny_config())
    inputs = ProbeInputs(repeated=torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)), text=None)
    snapshot(tmp_path / "snaps", 1, model)
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", model)
    probed: list[torch.dtype] = []
    real = posthoc_module._measure
    monkeypatch.setattr(posthoc_module, "_measure",
                        lambda hooked, *args: (probed.append(hooked.W_E.dtype), real(hooked, *args))[1])
    reprobe(tmp_path / "snaps", dtype=torch.float64, settings={"probes": ["induction"]}, inputs=inputs)
    reprobe(tmp_path / "ckpt.pt", dtype=torch.float64, settings={"probes": ["induction"]}, inputs=inputs)
    assert probed == [torch.float64, torch.float64]




def test_list_snapshots_of_a_snapshot_directory_names_its_parent(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """``list_snapshots(root / "step-00000001")`` gave ``[]`` without a word (API review): it still gives ``[]``
    (it never raises for junk) and logs which directory to list instead."""
    path = snapshot(tmp_path / "snaps", 1, make_gpt(tiny_config()))
    with caplog.at_level(logging.WARNING, logger="lens_callback.snapshots"):
        assert list_snapshots(path) == []
    assert any("is a snapshot directory, not a root of snapshots; list its parent" in r.getMessage()
               and str(tmp_path / "snaps") in r.getMessage() for r in caplog.records)
    assert [info.step for info in list_snapshots(tmp_path / "snaps")] == [1]

def test_loaders_refuse_a_dtype_that_is_not_floating_or_given_as_the_device(tmp_path: Path,
                                                                            tiny_config: Callable[..., GPTConfig]) -> None:
    """``load_snapshot(path, torch.float16)`` put the dtype in ``device`` ("Invalid device string"),
    ``dtype="float16"`` was blamed on the snapshot and ``dtype=torch.int64`` failed inside TransformerLens
    (API review): each is refused first, naming the loader."""
    model = make_gpt(tiny_config())
    path = snapshot(tmp_path / "snaps", 1, model)
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", model)
    calls = {"load_snapshot": lambda **kw: load_snapshot(path, **kw),
             "load_nanogpt_checkpoint": lambda **kw: load_nanogpt_checkpoint(tmp_path / "ckpt.pt", **kw),
             "reprobe": lambda **kw: reprobe(tmp_path / "snaps", **kw)}
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"{name}: device=torch.float16 is a dtype .* pass dtype=torch.float16"):
            call(device=torch.float16)
        for bad in ("float16", torch.int64):
            with pytest.raises(TypeError, match=rf"{name}: dtype must be a floating-point torch.dtype .*got {bad!r}"):
                call(dtype=bad)
    with pytest.raises(TypeError, match="build_hooked_transformer: dtype must be a floating-point"):
        to_hooked_transformer(model, dtype=torch.bool)
    assert load_snapshot(path, "cpu", torch.float64).W_E.dtype == torch.float64
    assert load_snapshot(path, dtype=None).W_E.dtype == torch.float32  # None: the default (diff review)


def test_loaders_refuse_a_device_that_is_not_one_or_not_here_before_reading(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    """``reprobe(device="cuda")`` on a machine without a GPU read every snapshot and then failed inside
    TransformerLens (GPU review): the loaders name the device first, as ``lens-probe --device`` does.
    So for MPS and XPU too, which were let through (device review)."""
    # what `unavailable_accelerator` asks: MPS's availability through torch.backends.mps (patching torch.mps's,
    # which it does not read, left the MPS case to the machine: on a Mac it was let through; diff review)
    for module in (torch.cuda, torch.backends.mps, torch.xpu):
        monkeypatch.setattr(module, "is_available", lambda: False)
    model = make_gpt(tiny_config())
    path = snapshot(tmp_path / "snaps", 1, model)
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", model)
    calls = {"load_snapshot": lambda **kw: load_snapshot(path, **kw),
             "load_nanogpt_checkpoint": lambda **kw: load_nanogpt_checkpoint(tmp_path / "ckpt.pt", **kw),
             "reprobe": lambda **kw: reprobe(tmp_path / "snaps", **kw),
             "build_hooked_transformer": lambda **kw: to_hooked_transformer(model, **kw)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"{name}: device='cuda:0', but no CUDA device is available here"):
            call(device="cuda:0")
        for device, kind in (("mps", "MPS"), ("xpu:1", "XPU")):
            with pytest.raises(ValueError, match=rf"{name}: device='{device}', but no {kind} device is available here"):
                call(device=device)
        with pytest.raises(ValueError, match=rf"{name}: device='gpu' is not a torch device"):
            call(device="gpu")

def test_lens_probes_lines_name_a_long_sweeps_steps_by_its_ends() -> None:
    """A sweep of a thousand snapshots printed a thousand step numbers in its one line."""
    from lens_callback.posthoc import _steps_text

    assert _steps_text([7]) == "[7]" and _steps_text(list(range(7))) == "[0, 1, 2, 3, 4, 5, 6]"
    assert _steps_text(list(range(0, 5001, 50))) == "[0, 50, 100, ..., 4900, 4950, 5000]"


def test_lens_probe_imports_a_module_from_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``--import my_arch`` finds ``./my_arch.py`` as ``python -m`` would, though a console script's
    ``sys.path`` lacks the current directory; ``sys.path`` is as before afterwards."""
    (tmp_path / "lens_user_arch_xyz.py").write_text("IMPORTED = True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "lens_user_arch_xyz", raising=False)
    before = list(sys.path)
    status = main([str(tmp_path / "missing"), "--logdir", str(tmp_path / "tb"), "--import", "lens_user_arch_xyz"])
    assert status == 2 and "no such file or directory" in capsys.readouterr().err  # got past the import
    assert sys.modules["lens_user_arch_xyz"].IMPORTED and sys.path == before
    del sys.modules["lens_user_arch_xyz"]


@pytest.mark.parametrize(("given", "said"), [
    ("lens_user_arch_xyz.py", "takes a module name, as python -m does: --import lens_user_arch_xyz, not a file name"),
    ("./lens_user_arch_xyz", "takes a module name, as python -m does: --import lens_user_arch_xyz, not a file name"),
    ("lens_user_arch_absent", "no module named 'lens_user_arch_absent' in the current directory"),
])
def test_lens_probe_says_what_import_takes_for_a_file_name_or_a_module_it_cannot_find(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], given: str,
        said: str) -> None:
    """``--import my_arch.py`` (the file beside the user) failed as Python's "No module named 'my_arch.py';
    'my_arch' is not a package", ``./my_arch`` as "the 'package' argument is required to perform a relative
    import", and a module in another directory as "No module named 'my_arch'" (journey review)."""
    (tmp_path / "lens_user_arch_xyz.py").write_text("IMPORTED = True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "lens_user_arch_xyz", raising=False)
    status = main([str(tmp_path / "missing"), "--logdir", str(tmp_path / "tb"), "--import", given])
    err = capsys.readouterr().err
    assert status == 2 and said in err, err
    assert "lens_user_arch_xyz" not in sys.modules  # a file name is not imported under another name


def test_lens_probe_reports_a_missing_module_the_users_module_imports_as_python_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "lens_user_arch_xyz.py").write_text("import lens_user_dependency_absent\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "lens_user_arch_xyz", raising=False)
    assert main([str(tmp_path / "missing"), "--logdir", str(tmp_path / "tb"), "--import", "lens_user_arch_xyz"]) == 2
    assert "No module named 'lens_user_dependency_absent'" in (err := capsys.readouterr().err) and "--import" not in err


@pytest.mark.parametrize(("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)],
                         ids=["umask022", "umask077"])
def test_snapshots_and_reports_get_the_umasks_permissions(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                          umask: int, dir_mode: int, file_mode: int) -> None:
    """Not mkstemp's 0600 / mkdtemp's 0700: others on a shared machine (a TensorBoard server, a
    colleague) can read what the run wrote, as with any file the process makes under umask 022; and
    under umask 077 nobody else can (the umask's modes, not fixed ones)."""
    import stat

    from lens_callback.fileio import atomic_write

    previous = os.umask(umask)
    try:
        path = save_snapshot(tmp_path / "snaps", 3, converter="nanogpt",
                             model_config=tiny_config().to_dict(),
                             state_dict=GPT(tiny_config()).state_dict())
        atomic_write(tmp_path / "report.png", b"png")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [path, *path.iterdir(), tmp_path / "report.png"]}
    assert modes[path.name] == dir_mode
    assert {name: mode for name, mode in modes.items() if name != path.name} == dict.fromkeys(
        [p.name for p in path.iterdir()] + ["report.png"], file_mode)


def test_atomic_write_takes_every_name_the_file_system_takes(tmp_path: Path) -> None:
    """The temporary file beside the target is named ``.<name>.<16 hex>.tmp``, 22 bytes longer: a name
    of 234 to 255 bytes (78 CJK characters are 234), which a plain write takes, failed as "File name too
    long" of that temporary file (metrics review)."""
    from lens_callback.fileio import atomic_write

    if os.pathconf(tmp_path, "PC_NAME_MAX") < 255:
        pytest.skip("this file system takes names of fewer than 255 bytes")
    for name in ("n" * 255, "報告" * 41 + ".png"):  # 255 and 250 bytes
        atomic_write(tmp_path / name, b"png")
        atomic_write(tmp_path / name, b"png2")  # replacing it too
        assert (tmp_path / name).read_bytes() == b"png2"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["n" * 255, "報告" * 41 + ".png"])  # no temporary left


def test_lens_probe_user_mistakes_exit_2_with_a_message_before_any_probing(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    (tmp_path / "a_file").write_text("step,tag,value\n")
    (tmp_path / "hello.txt").write_text("hello world")
    probed: list[Path] = []
    monkeypatch.setattr(posthoc_module, "_probe_snapshots", lambda plan, *_: probed.append(plan) or iter([]))
    cases = {
        "csv is a directory": ([str(root), "--csv", str(tmp_path)], "is a directory"),
        "csv under a file": ([str(root), "--csv", str(tmp_path / "a_file" / "x.csv")],
                             f"cannot make the directory {tmp_path / 'a_file'}: {tmp_path / 'a_file'} is a file"),
        "logdir a file": ([str(root), "--logdir", str(tmp_path / "a_file")], "--logdir " + str(tmp_path / "a_file") +
                          " is a file; name a directory"),
        "logdir under a file": ([str(root), "--logdir", str(tmp_path / "a_file" / "tb")],
                                f"--logdir {tmp_path / 'a_file' / 'tb'}: cannot make the directory"),
        "unknown device": ([str(root), "--csv", str(tmp_path / "x.csv"), "--device", "nonsense"], "not a torch device"),
        "not a checkpoint (csv)": ([str(tmp_path / "a_file"), "--csv", str(tmp_path / "x.csv")],
                                   "not a readable torch checkpoint"),
        "not a checkpoint (text)": ([str(tmp_path / "hello.txt"), "--csv", str(tmp_path / "x.csv")],
                                    "not a readable torch checkpoint"),
        "zero repeat length": ([str(root), "--csv", str(tmp_path / "x.csv"), "--repeat-length", "0"], "must be >= 1"),
        "negative step": ([str(root), "--csv", str(tmp_path / "x.csv"), "--step", "-1"], "must be >= 0"),
        # "Overflow when unpacking long long", and -5 accepted (validation review)
        "seed too big": ([str(root), "--csv", str(tmp_path / "x.csv"), "--seed", str(2**64 - 1)],
                         "argument --seed: must be >= 0 and < 9223372036854775808"),
        "negative seed": ([str(root), "--csv", str(tmp_path / "x.csv"), "--seed", "-5"], "argument --seed: must be >= 0"),
    }
    if not torch.cuda.is_available():
        cases["no cuda"] = ([str(root), "--csv", str(tmp_path / "x.csv"), "--device", "cuda"], "no CUDA device")
    # MPS gave torch's dispatcher error, XPU a traceback (torch's AssertionError; device review)
    if not torch.backends.mps.is_available():
        cases["no mps"] = ([str(root), "--csv", str(tmp_path / "x.csv"), "--device", "mps"],
                           "--device 'mps': no MPS device is available here")
    if not torch.xpu.is_available():
        cases["no xpu"] = ([str(root), "--csv", str(tmp_path / "x.csv"), "--device", "xpu:0"],
                           "--device 'xpu:0': no XPU device is available here")
    cases["meta"] = ([str(root), "--csv", str(tmp_path / "x.csv"), "--device", "meta"], "holds no values")
    # checkpoint-only settings on snapshots did nothing, silently (exit 0, the snapshots' own settings)
    cases["ckpt-only flags"] = ([str(root), "--csv", str(tmp_path / "x.csv"), "--probes", "induction",
                                 "--repeat-length", "8", "--text-len", "8"],
                                "--repeat-length, --text-len apply to a nanoGPT ckpt.pt only: snapshots are re-probed "
                                "on the probe batches stored beside them")
    cases["ckpt-only flag"] = ([str(root), "--csv", str(tmp_path / "x.csv"), "--seed", "3"],
                               "--seed applies to a nanoGPT ckpt.pt only")
    # what is measured replaces a snapshot's settings only with the probes named
    cases["settings without --probes"] = ([str(root), "--csv", str(tmp_path / "x.csv"), "--no-per-head-scalars"],
                                          "--no-per-head-scalars replaces a snapshot's probe settings only with --probes")
    cases["unknown probe"] = ([str(root), "--csv", str(tmp_path / "x.csv"), "--probes", "k_compositon"],
                              "command line: unknown probe(s) ['k_compositon']")
    # ... also given with its default value, which passed (post-hoc review)
    cases["ckpt-only flags at their defaults"] = ([str(root), "--csv", str(tmp_path / "x.csv"), "--repeat-batch", "8",
                                                   "--seed", "0", "--text-batch", "8"],
                                                  "--repeat-batch, --text-batch, --seed apply to a nanoGPT ckpt.pt only")
    # the table and the log in one path: the events were written, then the table failed (post-hoc review)
    cases["csv is the logdir"] = ([str(root), "--csv", str(tmp_path / "same"), "--logdir", str(tmp_path / "same")],
                                  "--csv and --logdir name the same path")
    for name, (argv, message) in cases.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (name, err)
    assert probed == []  # every mistake was caught before probing
    monkeypatch.undo()
    # a run's log directory: the snapshots are below it
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path), "--csv", str(tmp_path / "x.csv")]) == 2
    assert f"no complete snapshot (step-NNNNNNNN with COMPLETE) in this directory; snapshots are in {root}" in (
        capsys.readouterr().err)
    assert main([str(tmp_path / "empty"), "--csv", str(tmp_path / "x.csv")]) == 2
    assert capsys.readouterr().err.endswith("in this directory\n")
    # a root of symlinked step directories, or a COMPLETE that is no file, was sent to itself (s28 review: "no
    # complete snapshot ... in this directory; snapshots are in <the same directory>")
    links, odd = tmp_path / "links", tmp_path / "odd"
    links.mkdir()
    step = next(root.glob("step-*"))
    for inputs in root.glob("probe_inputs*"):  # what a single snapshot is probed on, beside it
        shutil.copy(inputs, links / inputs.name)
    (links / step.name).symlink_to(step, target_is_directory=True)
    assert main([str(links), "--csv", str(tmp_path / "x.csv")]) == 2
    assert (f"in this directory; 1 step directories here are symbolic links to snapshots ({step.name}, ...), "
            f"which are not followed: pass one of them itself") in capsys.readouterr().err
    # a dangling link is no snapshot to pass (diff review): the hint names the snapshots below instead
    (tmp_path / "step-00000009").symlink_to(tmp_path / "gone", target_is_directory=True)
    assert main([str(tmp_path), "--csv", str(tmp_path / "x.csv")]) == 2
    assert capsys.readouterr().err.endswith(f"in this directory; snapshots are in {root}\n")
    (odd / step.name / "COMPLETE").mkdir(parents=True)
    assert main([str(odd), "--csv", str(tmp_path / "x.csv")]) == 2
    assert capsys.readouterr().err.endswith("in this directory\n")
    assert main([str(links / step.name), "--csv", str(tmp_path / "x.csv")]) == 0, capsys.readouterr().err
    config_json = next(root.glob("step-*")) / "config.json"
    assert main([str(config_json), "--csv", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err  # not "refused": nothing unsafe in it, and the snapshot to pass is named
    assert f"is a file of the snapshot {config_json.parent}, not a nanoGPT ckpt.pt" in err and "refused" not in err
    # --text files that hold no whole token ids are named, not numpy's words
    ckpt = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(ckpt, make_gpt(tiny_config()))
    (tmp_path / "odd.bin").write_bytes(b"abc")
    (tmp_path / "empty.bin").write_bytes(b"")
    for name, message in (("odd.bin", "3 bytes is not a whole number of uint16 token ids"), ("empty.bin", "is empty")):
        assert main([str(ckpt), "--csv", str(tmp_path / "x.csv"), "--text", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"--text {tmp_path / name}" in err and message in err, err


# -- documented details: dtypes, a failed final rename, roots of several architectures, seeds -------
def test_a_snapshots_dtype_is_mixed_for_mixed_weights_and_reloads_honour_dtype(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    path = save_snapshot(tmp_path, 1, converter="nanogpt", model_config={},
                         state_dict={"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.bfloat16)})
    assert json.loads((path / "config.json").read_text())["dtype"] == "mixed"
    assert list_snapshots(tmp_path)[0].dtype == "mixed"

    model = make_gpt(tiny_config())
    path = snapshot(tmp_path / "typed", 1, model)
    assert load_snapshot(path, dtype=torch.bfloat16).W_Q.dtype == torch.bfloat16
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", model)
    assert load_nanogpt_checkpoint(tmp_path / "ckpt.pt", dtype=torch.bfloat16).W_Q.dtype == torch.bfloat16


def test_a_failed_final_rename_puts_the_earlier_snapshot_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lens_callback.snapshots as snapshots_module

    save_snapshot(tmp_path, 4, converter="nanogpt", model_config={}, state_dict={"w": torch.ones(2)})
    real = os.replace

    def failing(src: Any, dst: Any) -> None:
        if Path(dst).name == "step-00000004" and Path(src).name.startswith(".tmp-step"):
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(snapshots_module.os, "replace", failing)
    with pytest.raises(OSError, match="I/O error"):
        save_snapshot(tmp_path, 4, converter="nanogpt", model_config={}, state_dict={"w": torch.zeros(2)})
    monkeypatch.undo()
    assert [i.step for i in list_snapshots(tmp_path)] == [4] and leftovers(tmp_path) == []
    assert torch.equal(load_snapshot_weights(tmp_path / "step-00000004")[1]["w"], torch.ones(2))


def test_reprobe_a_root_holding_two_architectures(tmp_path: Path) -> None:
    """Two runs in one root (allowed, with a warning): the sweep's model is rebuilt for the second."""
    for step, n_layer in ((1, 1), (2, 2)):
        config = GPTConfig(block_size=32, vocab_size=64, n_layer=n_layer, n_head=2, n_embd=16)
        save_snapshot(tmp_path, step, converter="nanogpt", model_config=config.to_dict(),
                      state_dict=GPT(config).state_dict())
    inputs = ProbeInputs(repeated=torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)), text=None)
    results = reprobe(tmp_path, settings={"probes": ["induction"]}, inputs=inputs)
    assert [step for step, _ in results] == [1, 2]
    assert "lens/induction/L1H0" in results[1][1] and "lens/induction/L1H0" not in results[0][1]
    # a misspelt key was dropped for its default without a word (post-hoc review); so were the input
    # settings a snapshot's probe_settings holds beside them (diff review)
    for typo in ({"probes": ["induction"], "per_head_scalar": False}, {"probe_option": {}}):
        with pytest.raises(ValueError, match=r"settings: unknown key\(s\) \['(per_head_scalar|probe_option)'\]; probe "
                                             r"settings take \['probes', 'probe_options', 'max_batch_tokens'"):
            reprobe(tmp_path, settings=typo, inputs=inputs)
    stored = {"probes": ["induction"], "repeat_batch": 2, "seed": 7}
    with pytest.raises(ValueError, match=r"settings: \['repeat_batch', 'seed'\] decide the probe inputs, not what is "
                                         r"measured, and would be left unused: pass inputs="):
        reprobe(tmp_path, settings=stored, inputs=inputs)
    from lens_callback.posthoc import ProbeSettings  # the stored dict, read as the snapshots' own are
    assert reprobe(tmp_path, settings=ProbeSettings.from_dict(stored), inputs=inputs)[1][1] == results[1][1]


def test_checkpoint_text_batch_is_drawn_with_seed_plus_one() -> None:
    from lens_callback.posthoc import checkpoint_probe_inputs
    from lens_callback.probes import repeated_tokens, text_batch

    text = torch.arange(1000) % 60
    inputs = checkpoint_probe_inputs(64, repeat_length=4, repeat_batch=2, text=text, text_len=16, text_batch_size=3,
                                     seed=7)
    assert torch.equal(inputs.text, text_batch(text, 3, 16, torch.Generator().manual_seed(8)))
    # the repeated batch draws from the text's ids (0-59 here), without text from the whole vocabulary
    assert torch.equal(inputs.repeated, repeated_tokens(torch.arange(60), 2, 4, torch.Generator().manual_seed(7)))
    inputs = checkpoint_probe_inputs(64, repeat_length=4, repeat_batch=2, seed=7)
    assert torch.equal(inputs.repeated, repeated_tokens(torch.arange(64), 2, 4, torch.Generator().manual_seed(7)))


def test_checkpoint_repeated_batch_draws_from_the_texts_frequent_tokens(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """lens-probe drew a checkpoint's repeated sequences from the whole vocabulary, rare and unseen ids
    included, where the callback draws from the tokens making up token_min_frequency of its data: the
    README's reason is an induction score reading 0.02 instead of 0.10 (inputs review)."""
    from lens_callback.posthoc import checkpoint_probe_inputs

    text = np.concatenate([np.arange(2000) % 20, [40, 41, 42]]).astype(np.uint16)  # 40-42 once each
    inputs = checkpoint_probe_inputs(64, repeat_length=16, repeat_batch=64, text=text, text_len=16,
                                     token_min_frequency=1e-3)  # at least 3 of 2,003 tokens
    assert set(inputs.repeated.unique().tolist()) == set(range(20))
    everything = checkpoint_probe_inputs(64, repeat_length=16, repeat_batch=64, text=text, text_len=16,
                                         token_min_frequency=0.0)
    assert set(everything.repeated.unique().tolist()) <= set(range(20)) | {40, 41, 42}
    with pytest.raises(ValueError, match=r"only token 7 makes up at least token_min_frequency=0.5 of the text"):
        checkpoint_probe_inputs(64, repeat_length=4, text=np.array([7] * 30 + [1, 2]), text_len=4,
                                token_min_frequency=0.5)
    with pytest.raises(ValueError, match=r"no token makes up at least token_min_frequency=0.5 of the text \(4 "
                                         r"tokens, min_count=2\), too few to draw repeated sequences from"):
        checkpoint_probe_inputs(64, repeat_length=4, text=np.array([7, 1, 2, 3]), text_len=4, token_min_frequency=0.5)
    for frequency in (0.0, 0.5):  # one distinct token: no token_min_frequency helps (diff review: "lower" it)
        with pytest.raises(ValueError, match=r"the text holds one distinct token \(7\), so every repeated sequence "
                                             r"would be that token repeated: pass a text with at least two"):
            checkpoint_probe_inputs(64, repeat_length=4, text=np.full(32, 7), text_len=4, token_min_frequency=frequency)
    with pytest.raises(ValueError, match=r"text must hold integer token ids, got dtype float32"):  # not "lower ..."
        checkpoint_probe_inputs(64, repeat_length=4, text=np.arange(64, dtype=np.float32), text_len=4)
    with pytest.raises(ValueError, match=r"text must be 1-D, got shape \(8, 8\)"):
        checkpoint_probe_inputs(64, repeat_length=4, text=torch.arange(64).reshape(8, 8), text_len=4)
    # nanoGPT's uint16 ids through torch.from_numpy: torch has no max() for uint16 (diff review round 3)
    as_uint16 = checkpoint_probe_inputs(64, repeat_length=16, repeat_batch=64, text=torch.from_numpy(text),
                                        text_len=16, token_min_frequency=1e-3)
    assert torch.equal(as_uint16.repeated, inputs.repeated) and torch.equal(as_uint16.text, inputs.text)
    with pytest.raises(ValueError, match=r"the text holds token id 9223372036854775813 >= the model's vocab_size=64"):
        checkpoint_probe_inputs(64, repeat_length=4, text=torch.tensor([1, 2, 2**63 + 5], dtype=torch.uint64),
                                text_len=2)
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match=r"token_min_frequency must be in \[0, 1\)"):
            checkpoint_probe_inputs(64, repeat_length=4, token_min_frequency=bad)
    # on the command line, with only repeated-batch probes too: --text feeds the pool
    path = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(path, make_gpt(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=16)))
    text.tofile(tmp_path / "val.bin")
    calls = _spy_checkpoint_inputs(monkeypatch)
    assert main([str(path), "--csv", str(tmp_path / "s.csv"), "--text", str(tmp_path / "val.bin"),
                 "--probes", "induction", "--token-min-frequency", "0.001"]) == 0
    assert calls[0]["token_min_frequency"] == 0.001 and calls[0]["text_batch_size"] == 0
    assert main([str(path), "--csv", str(tmp_path / "t.csv"), "--text", str(tmp_path / "val.bin"),
                 "--token-min-frequency", "1"]) == 2


# -- pinned by the mutation review -------------------------------------------------------------
def _tied_snapshot_for_mutants(root: Path) -> Path:
    import torch
    from lens_callback.snapshots import save_snapshot

    t = torch.ones(3)
    return save_snapshot(root, 10, converter="nanogpt", model_config={},
                         state_dict={"a": t, "b": t, "c": torch.zeros(3)})


def test_an_alias_naming_a_stored_tensor_is_refused(tmp_path: Path) -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    import json, pytest
    from lens_callback.snapshots import SnapshotError, load_snapshot_weights

    path = _tied_snapshot_for_mutants(tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert config["aliases"] == {"b": "a"}
    config["aliases"] = {"b": "a", "c": "a"}   # c is stored: the alias would overwrite its zeros
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SnapshotError, match="alias 'c'"):
        load_snapshot_weights(path)


def test_a_non_canonical_step_directory_is_not_listed(tmp_path: Path) -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    import shutil
    from lens_callback.snapshots import list_snapshots

    path = _tied_snapshot_for_mutants(tmp_path)
    shutil.copytree(path, tmp_path / "step-000000010")  # nine digits: not snapshot_dirname(10)
    assert [i.path.name for i in list_snapshots(tmp_path)] == ["step-00000010"]


def test_new_settings_for_the_same_probe_batches_are_written(tmp_path: Path) -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    import torch
    from lens_callback.probes import ProbeInputs
    from lens_callback.snapshots import load_probe_inputs, save_probe_inputs

    inputs = ProbeInputs(repeated=torch.arange(8).view(2, 4), text=None)
    save_probe_inputs(tmp_path, inputs, {"seed": 1})
    save_probe_inputs(tmp_path, inputs, {"seed": 2})
    assert load_probe_inputs(tmp_path)[1] == {"seed": 2}


def test_a_checkpoint_whose_model_args_lack_dropout_loads(tmp_path: Path) -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    import torch
    from nanogpt_model import GPT, GPTConfig
    from lens_callback.checkpoints import read_nanogpt_checkpoint

    cfg = GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg)
    args = dict(n_layer=1, n_head=2, n_embd=8, block_size=16, bias=cfg.bias, vocab_size=32)  # no dropout (a fork)
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 3}, tmp_path / "ckpt.pt")
    config, _, step = read_nanogpt_checkpoint(tmp_path / "ckpt.pt")
    assert (config.n_layer, config.dropout, step) == (1, 0.0, 3)


def test_a_missing_checkpoint_is_file_not_found(tmp_path: Path) -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    import pytest
    from lens_callback.checkpoints import read_nanogpt_checkpoint

    with pytest.raises(FileNotFoundError):
        read_nanogpt_checkpoint(tmp_path / "missing.pt")


def test_a_second_transposed_view_of_a_shared_storage_is_saved(tmp_path: Path) -> None:
    """clone() keeps a dense view's strides: a second, transposed view of a stored tensor reached
    safetensors non-contiguous and the snapshot was refused (mutation review)."""
    from lens_callback.snapshots import load_snapshot_weights, save_snapshot

    w = torch.arange(6.0).view(2, 3)
    path = save_snapshot(tmp_path, 1, converter="nanogpt", model_config={}, state_dict={"w": w, "w_t": w.t()})
    _, loaded = load_snapshot_weights(path)
    assert torch.equal(loaded["w"], w) and torch.equal(loaded["w_t"], w.t())


def test_run_picks_its_snapshots_past_another_runs_unreadable_one(tmp_path: Path,
                                                                  tiny_config: Callable[..., GPTConfig]) -> None:
    """--run chose among the readable snapshots only: another run's snapshot with a newer format_version
    still stopped the sweep (snapshots review). One whose run cannot be read still does."""
    root = tmp_path / "snapshots"
    _, live = run_snapshots(root, tiny_config)
    edit_config(root / "step-00000007", lambda c: c["metadata"].update(run_id="a1" * 16))
    edit_config(root / "step-00000014", lambda c: c["metadata"].update(run_id="b2" * 16, x=1))
    edit_config(root / "step-00000014", lambda c: c.update(format_version=2))
    assert reprobe(root, run="a1") == [(7, live[7])]
    with pytest.raises(SnapshotError, match="unsupported format_version 2"):
        reprobe(root, run="b2")
    (root / "step-00000014" / "config.json").write_text("{")  # its run cannot be told
    with pytest.raises(SnapshotError, match=r"1 of 2 snapshots cannot be re-probed"):
        reprobe(root, run="a1")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_weights_rewritten_in_another_dtype_are_refused(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                       dtype: torch.dtype) -> None:
    """Weights rewritten as integers or booleans were cast into a model (logits off by 3e4) and re-probed
    with exit 0: config.json's dtype was never compared with the file's."""
    path = snapshot(tmp_path, 3, make_gpt(tiny_config()))
    weights = path / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        tensors = {name: (f.get_tensor(name) * 100).round().to(dtype) for name in f.keys()}
    save_file(tensors, weights)
    for load in (load_snapshot, lambda p: reprobe(p, settings=PROBE_SETTINGS)):
        with pytest.raises(SnapshotError, match=r"config\.json: dtype 'float32', but model\.safetensors holds no "
                                                r"floating-point tensor"):
            load(path)
    edit_config(path, lambda c: c.update(dtype="none"))
    load_snapshot_weights(path)  # consistent again: what the file holds is read


def test_one_weight_rewritten_as_integers_is_refused_by_the_header_and_the_loader(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str]) -> None:
    """One weight rewritten as int32 among float32 ones left the file's set of float dtypes
    {float32}: it loaded, cast without a word (post-hoc review). What the converter makes of it is an
    integer HookedTransformer weight, found from the header (meta tensors) and when loading."""
    model = make_gpt(tiny_config())
    path = snapshot(tmp_path, 3, model, metadata={"probe_settings": PROBE_SETTINGS})
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    tensors["transformer.wpe.weight"] = (tensors["transformer.wpe.weight"] * 100).round().to(torch.int32)
    save_file(tensors, weights)
    config, header = read_snapshot_header(path)
    assert header["transformer.wpe.weight"].dtype == torch.int32 and header["transformer.wpe.weight"].device.type == "meta"
    message = r"made weights that are not floating point .*: pos_embed\.W_pos: int32"
    with pytest.raises(SnapshotError, match=message):
        load_snapshot(path)
    with pytest.raises(ConversionError, match=message):
        to_hooked_transformer(load_snapshot_weights(path)[1], config["model_config"], converter="nanogpt")
    with pytest.raises(SnapshotError, match=message):
        iter_reprobe(path)  # found from the header, before anything is probed
    assert main([str(path), "--csv", str(tmp_path / "out.csv")]) == 2
    assert "not floating point" in capsys.readouterr().err and not (tmp_path / "out.csv").exists()


def test_a_snapshot_directory_whose_config_names_another_step_is_refused_alone_too(
        tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    """The listing refused step-00000030 whose config.json says 31; re-probing that directory alone
    reported step 31."""
    path = snapshot(tmp_path, 30, make_gpt(tiny_config()), metadata={"probe_settings": PROBE_SETTINGS})
    edit_config(path, lambda c: c.update(step=31))
    with pytest.raises(SnapshotError, match=r"config\.json says step 31, in the directory of step 30"):
        load_snapshot(path)
    with pytest.raises(SnapshotError, match="says step 31"):
        reprobe(path)


def test_probe_inputs_outside_the_vocabulary_are_refused_before_probing(tmp_path: Path,
                                                                       tiny_config: Callable[..., GPTConfig]) -> None:
    """reprobe(inputs=...) with ids past the model's vocabulary raised an IndexError mid-run."""
    root = tmp_path / "snapshots"
    inputs, _ = run_snapshots(root, tiny_config)
    bad = ProbeInputs(repeated=inputs.repeated + 64, text=inputs.text)
    with pytest.raises(SnapshotError, match=r"inputs=: the repeated batch holds token id \d+, outside the model's "
                                            r"vocabulary \[0, 64\)"):
        reprobe(root, inputs=bad)


def test_float8_buffers_of_every_kind_pass_the_dtype_check(tmp_path: Path, tiny_config: Callable[..., GPTConfig]) -> None:
    """The header's dtype check knew only some of safetensors' float8 names: a float32 model with a
    float8_e5m2fnuz buffer ("mixed") was refused by the header route and accepted by the loader."""
    model = make_gpt(tiny_config())
    for step, dtype in enumerate((torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)):
        state = {**model.state_dict(), "amax": torch.ones(4).to(dtype), "count": torch.tensor(3)}
        path = save_snapshot(tmp_path, step, converter="nanogpt", model_config=model.config.to_dict(), state_dict=state)
        assert json.loads((path / "config.json").read_text())["dtype"] == "mixed"
        read_snapshot_header(path)
        load_snapshot_weights(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_complex_buffer_is_no_floating_point_tensor_to_the_header_check(
    dtype: torch.dtype, tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    """A half-precision model with a complex64 rotary table (Meta-Llama's freqs_cis; .bfloat16() leaves it
    complex): the writer and the loader skip it as not floating point, the header check read it as
    float32, and every such snapshot failed to re-probe (convert review)."""
    model = make_gpt(tiny_config()).to(dtype)
    state = {**model.state_dict(), "freqs_cis": torch.polar(torch.ones(4, 2), torch.zeros(4, 2))}
    path = save_snapshot(tmp_path, 0, converter="nanogpt", model_config=model.config.to_dict(), state_dict=state)
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    assert json.loads((path / "config.json").read_text())["dtype"] == name
    _, header = read_snapshot_header(path)
    assert header["freqs_cis"].dtype == torch.complex64
    assert load_snapshot_weights(path)[1]["freqs_cis"].dtype == torch.complex64


def test_reprobe_leaves_the_global_rngs_of_a_seeded_converter_alone(tmp_path: Path,
                                                                   tiny_config: Callable[..., GPTConfig]) -> None:
    """The vocabulary check built the converter's HookedTransformerConfig outside global_rngs_kept: a config
    with a seed re-seeded the caller's global RNGs (diff review)."""
    import dataclasses

    from transformer_lens import HookedTransformerConfig

    from lens_callback.convert import NanoGPTConverter, register_converter, unregister_converter

    class Seeded(NanoGPTConverter):
        name = "seeded-nanogpt-test"

        def hooked_config(self, model_config: dict[str, Any]) -> HookedTransformerConfig:
            cfg = super().hooked_config(model_config)
            fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
            return HookedTransformerConfig(**{**fields, "seed": 0})

    inputs, _ = run_snapshots(tmp_path / "snapshots", tiny_config)
    register_converter(Seeded())
    try:
        model = make_gpt(tiny_config())
        path = save_snapshot(tmp_path / "seeded", 3, converter="seeded-nanogpt-test",
                             model_config=model.config.to_dict(), state_dict=model.state_dict())
        torch.manual_seed(1234)
        expected = torch.rand(3)
        torch.manual_seed(1234)
        reprobe(path, settings=PROBE_SETTINGS, inputs=inputs)
        assert torch.equal(torch.rand(3), expected)
    finally:
        unregister_converter("seeded-nanogpt-test")


# -- files from someone else (the hostile-input review) ---------------------------------------------
def test_probe_settings_the_model_cannot_run_are_found_before_any_snapshot_is_probed(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    """The README: every snapshot's probe settings and inputs are checked before any is probed. An ICL
    band past the text windows, or chunks smaller than a sequence, were found mid-sweep: the earlier
    snapshots probed and written, the error naming neither the snapshot nor its file."""
    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    for options in ({"probe_options": {"icl_score": {"late": 10000}}}, {"max_batch_tokens": 1}):
        edit_config(root / "step-00000014", lambda c: c["metadata"]["probe_settings"].update(options))
        table = tmp_path / "out.csv"
        assert main([str(root), "--csv", str(table)]) == 2
        err = capsys.readouterr().err
        assert "step-00000014: its probe settings on its probe inputs cannot run on its model" in err, err
        assert "nothing was probed" in err and not table.exists()
        with pytest.raises(SnapshotError, match="step-00000014: its probe settings"):
            iter_reprobe(root)
        edit_config(root / "step-00000014", lambda c: c["metadata"].update(probe_settings=PROBE_SETTINGS))
    # settings= given: named as such; a checkpoint's settings are checked against its model too
    with pytest.raises(SnapshotError, match=r"^settings: cannot run on the snapshots' model and their stored probe "
                                            r"inputs: .*late.*\(step-00000007, step-00000014 in .*\); nothing was probed$"):
        iter_reprobe(root, settings={"probes": ["icl_score"], "probe_options": {"icl_score": {"late": 10000}}})
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", make_gpt(tiny_config()))
    with pytest.raises(ValueError, match="cannot run on this checkpoint's model: max_batch_tokens"):
        iter_reprobe(tmp_path / "ckpt.pt", settings={"probes": ["induction"], "max_batch_tokens": 1})


def test_settings_and_inputs_given_that_cannot_run_on_the_snapshots_are_one_error_naming_inputs(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    """``reprobe(root, settings=, inputs=)``: settings the given inputs lack a batch for are refused naming
    ``inputs=``; settings that cannot run on the snapshots' model with them are one error naming ``inputs=`` (not
    the stored inputs) and every snapshot, before any is probed (a branch of `_plan` that only lens-probe's tests
    reached, with inputs=None: diff review)."""
    root = tmp_path / "snapshots"
    inputs, _ = run_snapshots(root, tiny_config)
    repeated_only = ProbeInputs(repeated=inputs.repeated, text=None)
    with pytest.raises(ValueError, match=r"^settings: probes \['logit_lens'\] need the text batch, which inputs= "
                                         r"lacks$"):  # found before the snapshots are read (iter_reprobe)
        iter_reprobe(root, settings={"probes": ["induction", "logit_lens"]}, inputs=repeated_only)
    with pytest.raises(SnapshotError, match=r"^settings: cannot run on the snapshots' model and inputs=: "
                                            r"max_batch_tokens = 3 must be an int >= the probe sequence length.* "
                                            r"\(step-00000007, step-00000014 in .*\); nothing was probed$"):
        iter_reprobe(root, settings={"probes": ["induction"], "max_batch_tokens": 3}, inputs=repeated_only)


def test_probe_settings_take_a_numpy_integer_chunk_size_as_an_int() -> None:
    """``reprobe(settings={"max_batch_tokens": np.int64(512)})`` was refused as not an int (s34); it is taken
    and stored as a plain int, which the settings' JSON needs."""
    from lens_callback.posthoc import ProbeSettings

    settings = ProbeSettings.from_dict({"max_batch_tokens": np.int64(512)}, strict=True)
    assert settings.max_batch_tokens == 512 and type(settings.max_batch_tokens) is int
    json.dumps(settings.to_dict())
    for bad in (True, 0, np.int64(0), 512.0, "512"):
        with pytest.raises(ValueError, match="'max_batch_tokens' must be a positive int or null"):
            ProbeSettings.from_dict({"max_batch_tokens": bad})


def test_probe_settings_built_in_python_are_checked_as_stored_ones_are(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    """``ProbeSettings(probes="induction")`` was refused as the unknown probes 'i', 'n', 'd', ... (one name is
    taken, as build_runner takes it), and ``per_head_scalars="false"`` logged every head's scalar: the
    constructor checks what ``from_dict`` checks (posthoc review)."""
    from lens_callback.posthoc import ProbeSettings

    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    one = ProbeSettings(probes="induction", max_batch_tokens=np.int64(512))
    assert one.probes == ("induction",) and type(one.max_batch_tokens) is int
    assert ProbeSettings(["induction"]) == ProbeSettings(("induction",))
    assert set(reprobe(root, settings=one)[0][1]) >= {"lens/induction/max", "lens/induction/L0H0"}
    for bad, match in (({"per_head_scalars": "false"}, "per_head_scalars must be True or False, got 'false'"),
                       ({"per_head_scalars": 0}, "per_head_scalars must be True or False, got 0"),
                       ({"probes": 5}, "probes must be probe names .* got 5"),
                       ({"probes": ("induction", 1)}, "probes must be probe names"),
                       ({"probe_options": "{}"}, "probe_options must map probe names"),
                       ({"max_batch_tokens": 0}, "max_batch_tokens must be a positive int or None, got 0"),
                       ({"max_batch_tokens": "512"}, "max_batch_tokens must be a positive int or None")):
        with pytest.raises(ValueError, match=f"^ProbeSettings: {match}"):
            ProbeSettings(**bad)


def test_a_probe_inputs_sequence_longer_than_the_model_is_found_before_probing(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig]
) -> None:
    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    long = ProbeInputs(repeated=torch.randint(0, 64, (2, 2 * 16 + 1)), text=None)  # n_ctx is 16
    with pytest.raises(SnapshotError, match="the repeated batch has 33 tokens per sequence, more than the model's "
                                            "n_ctx = 16"):
        iter_reprobe(root, settings={"probes": ["induction"]}, inputs=long)
    odd = ProbeInputs(repeated=torch.randint(0, 64, (2, 9)), text=None)  # e.g. a BOS before the sequence (diff review)
    for path in (root, tmp_path / "ckpt.pt"):
        write_nanogpt_ckpt(tmp_path / "ckpt.pt", make_gpt(tiny_config()))
        with pytest.raises(ValueError, match="the repeated batch has 9 tokens per sequence, an odd number"):
            iter_reprobe(path, settings={"probes": ["induction"]}, inputs=odd)


def test_lens_probe_writes_no_event_file_into_a_snapshot_directory(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    """A snapshot directory holding other files is one the callback refuses to write again: a resumed
    run lost that step's snapshot. --csv there was refused, --logdir was not."""
    root = tmp_path / "snapshots"
    run_snapshots(root, tiny_config)
    for logdir in (root / "step-00000014", root / "step-00000014" / "tb"):
        assert main([str(root), "--logdir", str(logdir)]) == 2
        assert "is inside a snapshot directory" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "step-00000014").iterdir()) == ["COMPLETE", "config.json", "model.safetensors"]
    assert main([str(root / "step-00000014"), "--logdir", str(root / "step-00000014")]) == 2
    assert main([str(root), "--logdir", str(tmp_path / "tb")]) == 0  # beside the root is fine


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_config_json_that_is_not_a_regular_file_is_refused_unread(tmp_path: Path,
                                                                     tiny_config: Callable[..., GPTConfig]) -> None:
    """A shared directory's config.json that is a FIFO blocked the listing for ever; one linked to
    /dev/zero was read until memory ran out."""
    model = make_gpt(tiny_config())
    fifo, device = snapshot(tmp_path, 1, model), snapshot(tmp_path, 2, model)
    (fifo / "config.json").unlink()
    os.mkfifo(fifo / "config.json")
    (device / "config.json").unlink()
    (device / "config.json").symlink_to("/dev/zero")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list_snapshots(tmp_path) == []
    for path in (fifo, device):
        with pytest.raises(SnapshotError, match=r"config.json: not a regular file$"):  # said once, not reworded
            load_snapshot(path)
    # the weights too: safetensors blocked on a FIFO (diff review)
    weights = snapshot(tmp_path, 3, model) / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(SnapshotError, match=r"model.safetensors: not a regular file$"):
        load_snapshot(weights.parent)
    with pytest.raises(SnapshotError, match=r"model.safetensors: not a regular file"):
        iter_reprobe(weights.parent, settings={"probes": ["induction"]},
                     inputs=ProbeInputs(repeated=torch.randint(0, 64, (2, 8)), text=None))


def test_a_json_file_too_large_for_a_snapshot_is_refused_unread(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = snapshot(tmp_path, 1, make_gpt(tiny_config()))
    monkeypatch.setattr("lens_callback.snapshots._MAX_JSON_BYTES", 100)
    with pytest.raises(SnapshotError, match=r"config.json: \d+ bytes, more than a snapshot's JSON file holds"):
        load_snapshot(path)
    # nor is one written that the readers would refuse (diff review)
    with pytest.raises(ValueError, match=r"takes \d+ bytes as JSON, more than a snapshot's JSON file may hold \(100\)"):
        snapshot(tmp_path, 2, make_gpt(tiny_config()))
    assert not (tmp_path / "step-00000002").exists()


def test_steps_past_int64_are_refused_where_they_are_read(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """TensorBoard's steps are int64: a step of 2**63 was probed, then failed the event writer."""
    model = make_gpt(tiny_config())
    assert check_step(2**63 - 1) == 2**63 - 1
    with pytest.raises(ValueError, match="at most 2\\*\\*63 - 1"):
        check_step(2**63)
    path = snapshot(tmp_path / "root", 3, model)
    edit_config(path, lambda c: c.update(step=2**63))
    with pytest.raises(SnapshotError, match="missing or invalid 'step'"):
        load_snapshot(path)
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", model, iter_num=2**63)
    assert read_nanogpt_checkpoint(tmp_path / "ckpt.pt")[2] is None  # as a negative iter_num: not a step
    with pytest.raises(ValueError, match="step must be"):
        iter_reprobe(tmp_path / "ckpt.pt", step=2**63)
    assert main([str(tmp_path / "ckpt.pt"), "--step", str(2**63), "--csv", str(tmp_path / "x.csv")]) == 2
    assert "must be >= 0 and < 9223372036854775808" in capsys.readouterr().err


def test_a_checkpoints_model_args_are_checked_against_its_weights_first(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    """A forged n_layer listed 6 key names per block before any comparison (10**12 blocks: memory ran
    out); a vocab_size the embedding lacks sized lens-probe's token pool (an arange of 2**36 ids) before
    the weights were compared."""
    model = make_gpt(tiny_config())
    path = tmp_path / "ckpt.pt"
    for args, message in ((dict(n_layer=10**12), r"model_args has n_layer=1000000000000, but the weights hold 2 blocks"),
                          (dict(vocab_size=2**36), r"the weights do not match model_args: .*transformer\.wte\.weight"),
                          (dict(vocab_size=2**62), r"GPTConfig describes a weight of vocab_size x n_embd")):
        write_nanogpt_ckpt(path, model)
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["model_args"].update(args)
        torch.save(checkpoint, path)
        with pytest.raises(CheckpointError, match=message):
            read_nanogpt_checkpoint(path)
        assert main([str(path), "--csv", str(tmp_path / "x.csv")]) == 2
        assert "Traceback" not in capsys.readouterr().err


def test_gpt_config_refuses_flags_that_are_not_bools_and_sizes_no_tensor_holds() -> None:
    """``"bias": "false"`` in a hand-written model_config read as true (a misleading missing-keys error)."""
    for bad in (dict(bias="false"), dict(tie_weights=1), dict(vocab_size=2**62), dict(n_embd=2**31, n_head=1),
                dict(block_size=2**60)):
        with pytest.raises(ValueError, match="must be True or False|more than a tensor can hold"):
            GPTConfig(**bad)
    assert GPTConfig(vocab_size=2**20, n_embd=2**10, n_head=1).vocab_size == 2**20


def test_a_sweep_checks_the_weights_of_each_architecture_once(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking a snapshot's header against its converter builds the converter's reference model
    (~29 ms for nanoGPT); loading checks each snapshot again, so the plan checks each converter,
    model_config and header once (s34)."""
    small, other = make_gpt(tiny_config()), make_gpt(tiny_config(n_layer=1))
    for step, model in ((0, small), (1, small), (2, other), (3, small), (4, other)):
        snapshot(tmp_path, step, model)
    checked: list[str] = []
    real_check = posthoc_module._check_weights_fit

    def counted(snapshot: Path, *args: Any) -> None:
        checked.append(snapshot.name)
        real_check(snapshot, *args)

    monkeypatch.setattr(posthoc_module, "_check_weights_fit", counted)
    inputs = ProbeInputs(repeated=TOKENS[:, :8], text=TOKENS)
    plan = posthoc_module._plan(tmp_path, posthoc_module.ProbeSettings.from_dict(PROBE_SETTINGS), inputs)
    assert [item.snapshot.name for item in plan] == [f"step-{s:08d}" for s in range(5)]
    assert checked == ["step-00000000", "step-00000002"]


def test_the_readmes_lens_probe_command_lines_run_as_written(tmp_path: Path, tiny_config: Callable[..., GPTConfig],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Every ``lens-probe ...`` line of the README's prose names options lens-probe has and probes it knows, and
    each whose input is here runs as written: the snapshots of ``runs/default/version_0/snapshots`` (also its
    ``<snapshots>`` and ``<the run's snapshots>``), a nanoGPT ``out/ckpt.pt`` with its
    ``data/shakespeare_char/val.bin``. (``runs/my-arch/snapshots --import my_arch``: test_convert's guide test.)"""
    from lens_callback.probe_cli import build_parser
    from lens_callback.probes import available_probes

    monkeypatch.chdir(tmp_path)
    snapshots = "runs/default/version_0/snapshots"
    run_snapshots(Path(snapshots), tiny_config)
    Path("out").mkdir()
    write_nanogpt_ckpt(Path("out/ckpt.pt"), make_gpt(tiny_config()))
    write_nanogpt_data_dir(Path("data/shakespeare_char"))
    commands = readme_commands("lens-probe", {"<snapshots>": snapshots, "<the run's snapshots>": snapshots,
                                              "<its snapshots>": snapshots, "DIR": "runs/probed", "FILE": "out.csv"})
    options = build_parser()._option_string_actions
    ran = []
    for words in commands:
        assert {word.split("=")[0] for word in words if word.startswith("-")} <= set(options), words
        for names in (after for flag, after in zip(words, words[1:]) if flag == "--probes"):
            assert set(names.split(",")) - {"..."} <= set(available_probes()), words
        if words and Path(words[0]).exists():
            assert main(words) == 0, (words, capsys.readouterr().err)
            ran.append(words[0])
    assert sorted(set(ran)) == ["out/ckpt.pt", snapshots]
    assert len(ran) == 5 and Path("out.csv").is_file()
    for logdir in ("tb", "runs/posthoc", "runs/probed"):
        assert not read_metrics(logdir).empty, logdir


def test_the_readmes_unknown_converter_message_is_what_load_snapshot_raises(
    tmp_path: Path, tiny_config: Callable[..., GPTConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's ``UnknownConverterError: ...`` text, word for word, for the snapshot its lines name (a run's
    ``runs/my-arch/snapshots`` at step 3,000) loaded without the module that registers ``my-arch``."""
    from lens_callback.convert import available_converters

    monkeypatch.chdir(tmp_path)
    model = make_gpt(tiny_config())
    path = save_snapshot(Path("runs/my-arch/snapshots"), 3000, converter="my-arch",
                         model_config=model.config.to_dict(), state_dict=model.state_dict())
    assert available_converters() == ["nanogpt", "nanogpt-modern"]  # the README's list: no test's left over
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path)  # relative, as the README's lines give it
    said = " ".join(readme_block("text", "UnknownConverterError: ").split())
    assert f"{type(info.value).__name__}: {info.value}" == said
