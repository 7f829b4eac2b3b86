import pytest
import torch

from dualpath.kv.layout import KVLayout, KVSpec


def test_mha_bytes_per_token_layer_matches_formula():
    # Qwen2.5-32B: 2 x 8 heads x 128 dim x 2 bytes = 4096 B per layer; x 64 layers = 262144 (presets.md)
    spec = KVSpec.mha(n_layers=64, n_kv_heads=8, head_dim=128, dtype="float16")
    assert spec.bytes_per_token_layer == 4096
    assert spec.bytes_per_token == 262144


def test_mla_latent_layout_with_extra_bytes():
    # DeepSeek-V3.2 FP8 MLA entry is 656 B/layer; with the 132-B indexer key, 788 B; 61 layers.
    spec = KVSpec.mla(n_layers=61, latent_dim=656, dtype="uint8", extra_bytes=132)
    assert spec.bytes_per_token_layer == 788
    assert spec.bytes_per_token == 48068
    layout = KVLayout(spec, block_tokens=64)
    assert layout.layer_block_bytes == 64 * 788
    assert layout.full_block_shape == (61, 64, 788)


def test_layer_block_is_a_view_and_concatenation_is_the_full_block():
    layout = KVLayout(KVSpec.mha(n_layers=3, n_kv_heads=2, head_dim=4, dtype="float32"), block_tokens=8)
    full = torch.randint(0, 255, layout.full_block_shape, dtype=torch.uint8)
    views = [layout.layer_view(full, layer) for layer in range(3)]
    for layer, v in enumerate(views):
        assert v.shape == layout.layer_block_shape
        assert v.data_ptr() == full.data_ptr() + layer * layout.layer_block_bytes  # no copy
    assert torch.equal(torch.cat(views, dim=0), full)
    views[1].fill_(7)  # writing the view writes the Full Block
    assert bool((full[1] == 7).all())


def test_as_kv_reinterprets_rows():
    layout = KVLayout(KVSpec.mha(n_layers=1, n_kv_heads=2, head_dim=4, dtype="float32"), block_tokens=8)
    kv = torch.randn(8, 2, 2, 4)
    rows = kv.view(torch.uint8).view(8, -1)
    assert torch.equal(layout.as_kv(rows), kv)


@pytest.mark.parametrize(
    "kwargs",
    [{"n_layers": 0, "n_kv_heads": 1, "head_dim": 1}, {"n_layers": 1, "n_kv_heads": 0, "head_dim": 1},
     {"n_layers": 1, "n_kv_heads": 1, "head_dim": 1, "dtype": "int3"}],
)
def test_bad_specs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        KVSpec.mha(**kwargs)


def test_layer_view_checks_range_and_shape():
    layout = KVLayout(KVSpec.mha(n_layers=2, n_kv_heads=1, head_dim=2, dtype="float32"), block_tokens=4)
    full = torch.zeros(layout.full_block_shape, dtype=torch.uint8)
    with pytest.raises(IndexError):
        layout.layer_view(full, 2)
    with pytest.raises(ValueError):
        layout.layer_view(full.float(), 0)


@pytest.mark.parametrize("state_pages", [False, True])
@pytest.mark.parametrize("prompt, hit, pe_blocks", [(10, 1, 1), (10, 2, 0), (8, 1, 0), (13, 2, 1)])
def test_a_state_page_ships_whole(state_pages, prompt, hit, pe_blocks):
    """With state pages (a hybrid model's linear layers keep their state in pages) the PE ships the prompt's last
    block whole; otherwise only the prompt's rows. The rows before are the same either way."""
    from dualpath.engine.request import Turn
    from dualpath.types import PathKind

    layout = KVLayout(KVSpec.mha(2, 1, 4, "float32", state_pages=state_pages), block_tokens=4)
    turn = Turn("s", list(range(prompt)), 1, 0, 0, PathKind.PE, [], 0, pe_blocks, layout)
    turn.hit_blocks = hit
    ranges = turn.ship_ranges()
    end = -(-prompt // 4) * 4 if state_pages else prompt
    assert ranges[-1] == (0 if pe_blocks >= hit else hit * 4, end)
    assert turn.ship_rows == end - (hit - min(pe_blocks, hit)) * 4
    assert (":state-pages" in layout.spec.fingerprint()) == state_pages
