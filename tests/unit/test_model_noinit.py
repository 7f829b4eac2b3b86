"""``skip_default_init``: torch's default fills are skipped for the calling thread only, inside the block, and the
originals are back after; a model built by ``build_model`` still gets every parameter from its source."""

from __future__ import annotations

import threading

import torch

from dualpath.model.noinit import skip_default_init


def test_fills_are_skipped_in_the_block_only() -> None:
    before = torch.nn.init.kaiming_uniform_
    t = torch.full((4, 4), 7.0)
    with skip_default_init():
        assert torch.nn.init.normal_(t) is t and torch.equal(t, torch.full((4, 4), 7.0))
        lin = torch.nn.Linear(4, 4)
        with skip_default_init():  # (nested)
            torch.nn.init.ones_(t)
        assert torch.equal(t, torch.full((4, 4), 7.0))
        torch.nn.init.zeros_(t)
        assert torch.equal(t, torch.full((4, 4), 7.0))
    assert torch.nn.init.kaiming_uniform_ is before  # the originals are back
    torch.nn.init.zeros_(t)
    assert torch.equal(t, torch.zeros(4, 4))
    assert isinstance(lin.weight, torch.nn.Parameter) and lin.weight.shape == (4, 4)


def test_another_thread_initialises_as_usual_meanwhile() -> None:
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def other() -> None:
        inside.wait(10)
        t = torch.full((8,), 7.0)
        torch.nn.init.zeros_(t)  # while the main thread is in the block
        seen["t"] = t
        done.set()

    th = threading.Thread(target=other)
    th.start()
    with skip_default_init():
        inside.set()
        assert done.wait(10)
        t = torch.full((8,), 7.0)
        torch.nn.init.zeros_(t)
        assert torch.equal(t, torch.full((8,), 7.0))
    th.join(10)
    assert torch.equal(seen["t"], torch.zeros(8))


def test_build_model_fills_every_parameter_from_its_tensors() -> None:
    """Every parameter of a checkpoint-built model is the checkpoint's tensor (none left as allocated memory), and a
    seeded random build is the same on every call."""
    from dualpath.model.loader import build_model, init_random, state_dict_for_save
    from dualpath.model.spec import ModelSpec

    spec = ModelSpec(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=48, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, tie_embeddings=False)
    ref = build_model(spec, None, seed=3)
    again = build_model(spec, None, seed=3)
    for (name, a), (_, b) in zip(ref.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    tensors = {k: torch.randn_like(v) for k, v in state_dict_for_save(ref).items()}
    model = build_model(spec, tensors)
    got = state_dict_for_save(model)
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(got[k], v), k
    init_random(model, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))
