"""LensCallback's hand-written loop under Lightning Fabric (litgpt's way of training)."""

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
