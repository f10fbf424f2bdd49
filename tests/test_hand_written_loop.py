"""LensCallback without a Trainer: `attach` and `probe_step` in a loop of your own (or Lightning Fabric's, litgpt's way of training)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lens_callback import LensCallback
from lens_callback.snapshots import list_snapshots
from nanogpt_model import GPT, GPTConfig, TextDataModule


def test_a_fabric_loop_attaches_the_module_it_gave_fabric_and_probes_the_wrapped_ones_weights(tmp_path: Path) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    wrapped, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    data = TextDataModule(block_size=32, batch_size=2, val_batches=1)
    data.setup("fit")
    lens = LensCallback(every_n_steps=2, log_spaced=False, repeat_length=8, text_len=32, snapshot_dir=tmp_path)
    with pytest.raises(ValueError, match="no registered converter matches a _FabricModule.*pass the model itself"):
        lens.attach(wrapped, data.train_data, data.val_data)
    lens.attach(model, data.train_data, data.val_data)

    batches = iter(data.train_dataloader())
    for step in range(4):
        if step % 2 == 0:
            lens.probe_step(None, step, wrapped.state_dict())
        tokens, targets = next(batches)
        fabric.backward(wrapped(tokens, targets)[1])
        optimizer.step()
        optimizer.zero_grad()
    lens.probe_step(None, 4, wrapped.state_dict(), final=True)

    assert lens.probed_steps == [0, 2, 4] and not lens.errors
    assert [s.step for s in list_snapshots(tmp_path)] == [0, 2, 4]
    # the values are the trained weights': a fresh callback on the module's own state dict agrees
    again = LensCallback(every_n_steps=2, log_spaced=False, repeat_length=8, text_len=32)
    again.attach(model, data.train_data, data.val_data)
    again.probe_step(None, 4, model.state_dict())
    assert again.history[4] == lens.history[4]
    assert lens.history[4] != lens.history[0]


def test_a_hand_written_loop_records_the_tokenizer_it_is_given(tmp_path: Path) -> None:
    """``attach`` sees no datamodule: its snapshots recorded no tokenizer, so they reloaded without one."""
    from lens_callback import load_snapshot
    from lens_callback.tokenizer import TOKENIZER_KEY

    model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
    data = TextDataModule(block_size=32, batch_size=2, val_batches=1)
    data.setup("fit")
    lens = LensCallback(every_n_steps=1, repeat_length=8, text_len=32, snapshot_dir=tmp_path)
    with pytest.raises(ValueError, match=r"attach\(tokenizer_spec=...\): a tokenizer record is"):
        lens.attach(model, data.train_data, data.val_data, tokenizer_spec={"kind": "bpe"})
    with pytest.raises(ValueError, match=r"attach\(tokenizer_spec=...\): the 'char' tokenizer record has 300 ids, "
                                         r"more than the model's vocabulary d_vocab=256"):
        lens.attach(model, data.train_data, data.val_data,
                    tokenizer_spec={"kind": "char", "chars": "".join(map(chr, range(1000, 1300)))})
    with pytest.raises(RuntimeError, match="call attach"):  # refused as a whole
        lens.probe_step(None, 0, model.state_dict())
    lens.attach(model, data.train_data, data.val_data, tokenizer_spec=data.tokenizer_spec())
    lens.probe_step(None, 0, model.state_dict(), final=True)
    (snapshot,) = list_snapshots(tmp_path)
    reloaded = load_snapshot(snapshot.path)
    assert reloaded.to_tokens("déf", prepend_bos=False)[0].tolist() == list("déf".encode())
    # each attach sets the record anew: one without it writes the snapshots after it without a record
    lens.attach(model, data.train_data, data.val_data)
    lens.probe_step(None, 1, model.state_dict(), final=True)
    assert [TOKENIZER_KEY in s.metadata for s in list_snapshots(tmp_path)] == [True, False]
    assert load_snapshot(list_snapshots(tmp_path)[-1].path).tokenizer is None
