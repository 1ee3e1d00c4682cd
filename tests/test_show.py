"""Tests of attnc.show: tile classification, density figures, terminal and PNG pictures."""

from __future__ import annotations

import re
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnc.errors import AttncError, InputError
from attnc.show import block_status, density_figures, render_png, render_terminal

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def causal(n_q: int, n_k: int | None = None) -> torch.Tensor:
    n_k = n_q if n_k is None else n_k
    return torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None]


def causal_window(n: int, window: int) -> torch.Tensor:
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (k <= q) & (q - k < window)


def brute_force_status(mask: torch.Tensor, block_m: int, block_n: int) -> list[list[int]]:
    """Tile classes by slicing each tile: the obvious definition, independent of the reshapes."""
    n_q, n_k = mask.shape
    rows = []
    for q0 in range(0, n_q, block_m):
        row = []
        for k0 in range(0, n_k, block_n):
            tile = mask[q0:q0 + block_m, k0:k0 + block_n]
            row.append(0 if not tile.any() else 2 if tile.all() else 1)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# block_status


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (17, 67), (67, 17), (130, 45), (45, 130), (256, 256)])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 64), (7, 5), (1, 1), (200, 3)])
def test_block_status_matches_brute_force(n_q, n_k, block_m, block_n):
    generator = torch.Generator().manual_seed(n_q * 1000 + n_k * 10 + block_m)
    # Mostly-true and mostly-false masks too, so every class shows up in most grids.
    for density in (0.02, 0.5, 0.98):
        mask = torch.rand(n_q, n_k, generator=generator) < density
        status = block_status(mask, block_m, block_n)
        assert status.dtype == torch.int8
        assert tuple(status.shape) == (-(-n_q // block_m), -(-n_k // block_n))
        assert status.tolist() == brute_force_status(mask, block_m, block_n)


@settings(max_examples=60, deadline=None)
@given(n_q=st.integers(1, 40), n_k=st.integers(1, 40), block_m=st.integers(1, 12),
       block_n=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
       density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
def test_block_status_property(n_q, n_k, block_m, block_n, seed, density):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_q, n_k, generator=generator) < density
    expected = brute_force_status(mask, block_m, block_n)
    assert block_status(mask, block_m, block_n).tolist() == expected


def test_ragged_boundary_tile_counts_only_in_range_elements():
    # 17 x 17 all-true: the last row/column of tiles holds one in-range row/column, still full.
    assert (block_status(torch.ones(17, 17, dtype=torch.bool), 16, 16) == 2).all()
    status = block_status(causal(130), 64, 64)
    # Rows 128..129 against keys 128..129 form a ragged diagonal tile: causal inside, so partial.
    assert status.tolist() == [[1, 0, 0], [2, 1, 0], [2, 2, 1]]


def test_block_status_accepts_singleton_batch_and_heads():
    mask = causal(33)
    assert torch.equal(block_status(mask[None, None], 8, 8), block_status(mask, 8, 8))


def test_block_status_agrees_with_chunked_counting_on_a_large_mask():
    # 3000 x 3000 spans several counting strips; the diagonal must still classify exactly.
    status = block_status(causal(3000), 128, 128)
    blocks = status.shape[0]
    expected = torch.tril(torch.full((blocks, blocks), 2, dtype=torch.int8), diagonal=-1)
    expected.diagonal().fill_(1)
    assert torch.equal(status, expected)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "16"])
def test_block_sizes_must_be_positive_integers(bad):
    with pytest.raises(InputError, match="block_m"):
        block_status(causal(8), bad, 4)


def test_mask_shape_errors_are_input_errors():
    with pytest.raises(InputError, match="shape"):
        block_status(torch.ones(2, 3, 4, 4, dtype=torch.bool), 2, 2)
    with pytest.raises(InputError, match="torch tensor"):
        block_status([[True]], 1, 1)


# --------------------------------------------------------------------------------------------
# density_figures


def test_density_figures_of_a_causal_mask():
    n = 100
    mask = causal(n)
    figures = density_figures(mask, block_status(mask, 32, 32))
    assert figures["n_q"] == n and figures["n_k"] == n
    assert figures["elements"] == n * n
    assert figures["true_elements"] == n * (n + 1) // 2
    assert figures["element_density"] == pytest.approx((n + 1) / (2 * n))
    # 4 x 4 tiles: 4 on the diagonal are partial (the last one is ragged), 6 below are full.
    assert figures["tiles"] == {"empty": 6, "partial": 4, "full": 6}
    assert figures["tile_count"] == 16
    assert figures["tile_fraction"] == pytest.approx(10 / 16)


def test_density_figures_of_empty_and_full_masks():
    none = torch.zeros(20, 30, dtype=torch.bool)
    figures = density_figures(none, block_status(none, 8, 8))
    assert figures["element_density"] == 0.0 and figures["tile_fraction"] == 0.0
    assert figures["tiles"] == {"empty": 12, "partial": 0, "full": 0}
    every = torch.ones(20, 30, dtype=torch.bool)
    figures = density_figures(every, block_status(every, 8, 8))
    assert figures["element_density"] == 1.0 and figures["tile_fraction"] == 1.0
    zero = torch.zeros(0, 7, dtype=torch.bool)
    figures = density_figures(zero, block_status(zero, 8, 8))
    assert figures["elements"] == 0 and figures["element_density"] == 0.0
    assert figures["tile_count"] == 0 and figures["tile_fraction"] == 0.0


# --------------------------------------------------------------------------------------------
# render_terminal


def widths(text: str) -> list[int]:
    return [len(ANSI.sub("", line)) for line in text.splitlines()]


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (17, 67), (130, 45), (300, 300), (2048, 512)])
@pytest.mark.parametrize("max_cells", [16, 64, 100])
def test_terminal_picture_has_legend_figures_and_bounded_width(n_q, n_k, max_cells):
    mask = causal(n_q, n_k)
    text = render_terminal(mask, 64, 64, title="causal", max_cells=max_cells)
    assert text.splitlines()[0] == "causal"
    assert "legend:" in text and "full tile" in text and "partial" in text and "empty tile" in text
    assert "element density" in text and "tile fraction" in text
    assert max(widths(text)) <= 160
    # No picture row is taller or wider than max_cells.
    picture_rows = [line for line in text.splitlines() if set(line) <= set("█▓▒░·■▣ ")]
    assert len([r for r in picture_rows if r.strip()]) <= 2 * max_cells
    assert all(len(part) <= max_cells for row in picture_rows for part in row.split())


def test_terminal_picture_is_exact_for_a_small_mask():
    mask = causal(5, 7)
    text = render_terminal(mask, 4, 4)
    rows = [line.split()[0] for line in text.splitlines() if line[:1] in ("█", "·")]
    assert rows == ["█······", "██·····", "███····", "████···", "█████··"]
    assert "1 char = 1 element" in text
    assert "15 of 35 pairs attended" in text


def test_terminal_tile_picture_lines_up_with_the_mask():
    # 8 x 8 causal with 4 x 4 tiles: each character lies in one tile, so the right picture is the
    # tile classification blown up to the element grid.
    text = render_terminal(causal(8), 4, 4)
    tiles = [line.split()[1] for line in text.splitlines() if line[:1] in ("█", "·")]
    assert tiles == ["▣▣▣▣····"] * 4 + ["■■■■▣▣▣▣"] * 4


def test_terminal_downsampling_uses_partial_glyphs():
    text = render_terminal(causal_window(1000, 100), 64, 64, max_cells=50)
    assert "1 char = 20x20 elements" in text
    assert any(glyph in text for glyph in "░▒▓")


def test_terminal_stacks_pictures_when_side_by_side_would_be_too_wide():
    text = render_terminal(causal(200), 16, 16, max_cells=100)
    assert max(widths(text)) <= 160
    lines = text.splitlines()
    # Stacked: the tile picture's caption starts a line of its own, below the mask's rows.
    mask_caption = next(i for i, line in enumerate(lines) if line.startswith("mask q"))
    tile_caption = next(i for i, line in enumerate(lines) if line.startswith("tiles 16x16: 13 x"))
    assert tile_caption > mask_caption + 100
    assert "tiles" not in lines[mask_caption]


def test_terminal_colour_only_adds_escape_codes():
    mask = causal_window(90, 30)
    plain = render_terminal(mask, 16, 16)
    coloured = render_terminal(mask, 16, 16, color=True)
    assert "\x1b[" in coloured and "\x1b[" not in plain
    assert ANSI.sub("", coloured) == plain


def test_terminal_handles_an_empty_mask():
    text = render_terminal(torch.zeros(0, 5, dtype=torch.bool), 16, 16)
    assert "nothing to draw" in text and "legend:" in text


# --------------------------------------------------------------------------------------------
# render_png


def png_size(path) -> tuple[int, int]:
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(path) as image:
        image.verify()
    with image_module.open(path) as image:
        return image.size


def test_png_of_a_causal_mask(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "causal.png"
    render_png(causal(300), 64, 64, path, title="causal", subtitle="n = 300")
    assert path.read_bytes()[:8] == PNG_MAGIC
    width, height = png_size(path)
    assert 800 <= width <= 3000 and 400 <= height <= 2000


def test_png_of_a_large_mask_is_fast(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "large.png"
    mask = causal(4096)
    start = time.perf_counter()
    render_png(mask, 128, 64, str(path), title="causal 4096")
    elapsed = time.perf_counter() - start
    assert path.read_bytes()[:8] == PNG_MAGIC
    width, height = png_size(path)
    assert 800 <= width <= 3000 and 400 <= height <= 2000
    assert elapsed < 30, f"rendering took {elapsed:.1f}s"


def test_png_of_an_elongated_mask(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "thin.png"
    render_png(causal(16, 3000), 16, 64, path)
    assert 300 <= png_size(path)[1] <= 2000


def test_png_with_more_tiles_than_pixels_and_dollar_signs_in_the_title(tmp_path):
    pytest.importorskip("matplotlib")
    # 1,500 key tiles of width 1 exceed the 1,024-cell picture: tiles are drawn in groups.
    path = tmp_path / "groups.png"
    render_png(causal(300, 1500), 300, 1, path, title="cost $5 and $6", subtitle="a $b")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_png_without_matplotlib_names_the_install_command(tmp_path, monkeypatch):
    # A None entry in sys.modules makes the import fail as if the package were missing.
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(AttncError, match="pip install matplotlib"):
        render_png(causal(8), 4, 4, tmp_path / "x.png")


def test_png_write_failure_is_an_attnc_error(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(AttncError, match="cannot write PNG"):
        render_png(causal(8), 4, 4, tmp_path / "missing-dir" / "x.png")
