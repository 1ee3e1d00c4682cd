"""Pictures of attention masks: the element mask, its block (tile) mask and density figures.

Everything here is a pure function over a boolean ``(n_q, n_k)`` torch tensor, so ``attnc show``
can draw any mask, whether it came from a compiled pattern or was built by hand. Two outputs:

- :func:`render_terminal` — text for a terminal, Unicode blocks, optional ANSI colours;
- :func:`render_png` — a two-panel PNG (element mask, block mask) drawn with matplotlib.

Large masks are reduced by counting ``True`` elements per cell in bounded row strips, so an
8192 x 8192 mask never needs more than a few tens of MiB beside the mask itself.
"""

from __future__ import annotations

import math
import os

import torch

from attnc.errors import AttncError, InputError

# Tile classes, in the order of their int8 codes in block_status().
EMPTY, PARTIAL, FULL = 0, 1, 2

# Elements a counting strip may hold; bounds the temporary memory of the reductions (a padded
# copy of ~4 Mi bools at most, and their column sums).
_STRIP_ELEMENTS = 1 << 22

# Terminal glyphs. Element cells show the fraction of attended pairs in four steps so that a
# downsampled band (e.g. a sliding window) still reads as "thin" vs "thick".
_ELEMENT_GLYPHS = ("·", "░", "▒", "▓", "█")
_TILE_GLYPHS = {EMPTY: "·", PARTIAL: "▣", FULL: "■"}
_TERMINAL_WIDTH = 160
_PANEL_GAP = 4

# ANSI SGR codes: dim grey for "nothing", cyan for attended pairs, green/yellow for full/partial
# tiles (the same meaning as the PNG's blue/amber, in colours every terminal has).
_ANSI_RESET = "\x1b[0m"
_ANSI_ELEMENT = {0: "\x1b[90m", 1: "\x1b[36m", 2: "\x1b[36m", 3: "\x1b[36m", 4: "\x1b[36m"}
_ANSI_TILE = {EMPTY: "\x1b[90m", PARTIAL: "\x1b[33m", FULL: "\x1b[32m"}

# PNG colours for empty / partial / full tiles: empty is nearly white (nothing to compute),
# full is a strong blue, partial a warm amber so the costly masked tiles stand out.
_PNG_TILE_COLOURS = ("#eeeeee", "#f2a541", "#2f6690")
_PNG_MAX_CELLS = 1024  # per side, for the averaged element picture and the tile picture
_PNG_GRID_MAX_BLOCKS = 48  # draw tile grid lines only while they stay readable


# --------------------------------------------------------------------------------------------
# Counting


def _as_mask_2d(mask) -> torch.Tensor:
    """A CPU bool ``(n_q, n_k)`` view of ``mask``; leading singleton dims (batch, heads) dropped."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask must be a torch tensor, got {type(mask).__name__}")
    if mask.dim() > 2 and all(size == 1 for size in mask.shape[:-2]):
        mask = mask.reshape(mask.shape[-2], mask.shape[-1])
    if mask.dim() != 2:
        raise InputError(f"mask must have shape (n_q, n_k), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        mask = mask != 0
    return mask.detach().cpu()


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _true_counts(mask: torch.Tensor, cell_h: int, cell_w: int) -> torch.Tensor:
    """Number of ``True`` elements in each ``cell_h x cell_w`` cell (boundary cells are clipped)."""
    n_q, n_k = mask.shape
    rows, cols = math.ceil(n_q / cell_h), math.ceil(n_k / cell_w)
    counts = torch.zeros(rows, cols, dtype=torch.int64)
    if rows == 0 or cols == 0:
        return counts
    # Whole cell rows per strip, at least one, so a strip is a reshape away from its cell sums.
    strip_rows = max(1, _STRIP_ELEMENTS // (cell_h * cols * cell_w))
    for r0 in range(0, rows, strip_rows):
        r1 = min(rows, r0 + strip_rows)
        q0, q1 = r0 * cell_h, min(r1 * cell_h, n_q)
        strip = mask[q0:q1]
        if q1 - q0 != (r1 - r0) * cell_h or n_k != cols * cell_w:
            # Padding with False keeps the count of a boundary cell equal to its in-range count.
            padded = torch.zeros((r1 - r0) * cell_h, cols * cell_w, dtype=torch.bool)
            padded[: q1 - q0, :n_k] = strip
            strip = padded
        # Rows first, in uint8 while a cell's height fits in it: adding whole rows is a fast
        # vectorised add, and it shrinks the data cell_h times before the slower column sums.
        cells = strip.contiguous().view(torch.uint8).view(r1 - r0, cell_h, -1)
        per_column = sum(cells[:, h:h + 255].sum(dim=1, dtype=torch.uint8).to(torch.int32)
                         for h in range(0, cell_h, 255))
        if cell_w == 1:
            counts[r0:r1] = per_column
        else:
            counts[r0:r1] = per_column.view(r1 - r0, cols, cell_w).sum(dim=2, dtype=torch.int64)
    return counts


def _valid_counts(n_q: int, n_k: int, cell_h: int, cell_w: int) -> torch.Tensor:
    """Number of in-range elements in each cell: the product of the clipped row and column sizes."""
    rows, cols = math.ceil(n_q / cell_h), math.ceil(n_k / cell_w)
    heights = (n_q - torch.arange(rows, dtype=torch.int64) * cell_h).clamp(max=cell_h)
    widths = (n_k - torch.arange(cols, dtype=torch.int64) * cell_w).clamp(max=cell_w)
    return heights[:, None] * widths[None, :]


def _cell_fraction(mask: torch.Tensor, cell_h: int, cell_w: int) -> torch.Tensor:
    """Fraction of attended pairs per cell, float32 in [0, 1]."""
    n_q, n_k = mask.shape
    counts = _true_counts(mask, cell_h, cell_w)
    return (counts.double() / _valid_counts(n_q, n_k, cell_h, cell_w).double()).float()


def block_status(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Classify every ``block_m x block_n`` tile of ``mask`` as empty (0), partial (1) or full (2).

    ``mask`` is a bool tensor ``(n_q, n_k)`` (leading singleton batch/head dims are accepted).
    A boundary tile counts only its in-range elements, so a ragged last tile whose in-range part
    is all ``True`` is full. Returns an int8 tensor ``(ceil(n_q/block_m), ceil(n_k/block_n))``.
    """
    mask = _as_mask_2d(mask)
    block_m = _positive_int(block_m, "block_m")
    block_n = _positive_int(block_n, "block_n")
    n_q, n_k = mask.shape
    counts = _true_counts(mask, block_m, block_n)
    valid = _valid_counts(n_q, n_k, block_m, block_n)
    status = torch.full(counts.shape, PARTIAL, dtype=torch.int8)
    status[counts == 0] = EMPTY
    status[counts == valid] = FULL
    return status


def density_figures(mask: torch.Tensor, status: torch.Tensor) -> dict:
    """Density figures of ``mask`` and of its tile classes ``status`` (from :func:`block_status`).

    Returns a dict with ``n_q``, ``n_k``, ``elements`` (n_q * n_k), ``true_elements``,
    ``element_density`` (fraction of ``True``), ``tiles`` (dict ``empty``/``partial``/``full`` ->
    count), ``tile_count`` and ``tile_fraction`` ((partial + full) / all tiles: the share of tiles a
    kernel must visit). Fractions are 0.0 for an empty mask.
    """
    mask = _as_mask_2d(mask)
    n_q, n_k = mask.shape
    elements = n_q * n_k
    # count_nonzero, not sum: summing a bool tensor widens every element to int64 first.
    true_elements = int(torch.count_nonzero(mask).item()) if elements else 0
    tiles = {
        "empty": int((status == EMPTY).sum().item()),
        "partial": int((status == PARTIAL).sum().item()),
        "full": int((status == FULL).sum().item()),
    }
    tile_count = int(status.numel())
    return {
        "n_q": n_q,
        "n_k": n_k,
        "elements": elements,
        "true_elements": true_elements,
        "element_density": true_elements / elements if elements else 0.0,
        "tiles": tiles,
        "tile_count": tile_count,
        "tile_fraction": (tiles["partial"] + tiles["full"]) / tile_count if tile_count else 0.0,
    }


def _tiles_under_cells(status: torch.Tensor, block_m: int, block_n: int, cell_h: int, cell_w: int,
                       row_edges: torch.Tensor, col_edges: torch.Tensor) -> torch.Tensor:
    """Tile class seen by each picture cell of ``cell_h x cell_w`` elements (edges from
    :func:`_cell_edges`).

    A cell shows a tile's class when every tile under it has that class, and partial otherwise.
    Along an axis where tiles are at least as large as cells, a cell samples the single tile under
    its centre, so tile boundaries stay crisp instead of turning into a seam of "mixed" cells.
    """
    def tile_range(edges: torch.Tensor, block: int, cell: int):
        start, stop = edges[:-1], edges[1:]
        if block >= cell:
            centre = (start + stop - 1) // 2 // block
            return centre, centre
        return start // block, (stop - 1) // block

    row_lo, row_hi = tile_range(row_edges, block_m, cell_h)
    col_lo, col_hi = tile_range(col_edges, block_n, cell_w)

    # 2-D prefix sums answer "how many full / empty tiles in this rectangle" for all cells at once.
    def prefix(flags: torch.Tensor) -> torch.Tensor:
        table = torch.zeros(flags.shape[0] + 1, flags.shape[1] + 1, dtype=torch.int64)
        table[1:, 1:] = flags.to(torch.int64).cumsum(0).cumsum(1)
        return table

    def rect_sum(table: torch.Tensor) -> torch.Tensor:
        r0, r1 = row_lo[:, None], row_hi[:, None] + 1
        c0, c1 = col_lo[None, :], col_hi[None, :] + 1
        return table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]

    area = (row_hi - row_lo + 1)[:, None] * (col_hi - col_lo + 1)[None, :]
    full = rect_sum(prefix(status == FULL))
    empty = rect_sum(prefix(status == EMPTY))
    shown = torch.full(area.shape, PARTIAL, dtype=torch.int8)
    shown[full == area] = FULL
    shown[empty == area] = EMPTY
    return shown


def _cell_edges(n: int, cell: int) -> torch.Tensor:
    """Element edges of cells of size ``cell`` along an axis of length ``n`` (last one clipped)."""
    cells = math.ceil(n / cell)
    edges = torch.arange(cells + 1, dtype=torch.int64) * cell
    edges[-1] = n
    return edges


# --------------------------------------------------------------------------------------------
# Terminal


def _element_glyph_level(fraction: torch.Tensor) -> torch.Tensor:
    """0 = none, 4 = all, 1..3 = partly attended in thirds."""
    level = torch.ceil(fraction * 3).to(torch.int64).clamp(1, 3)
    level[fraction <= 0] = 0
    level[fraction >= 1] = 4
    return level


def _paint(levels: torch.Tensor, glyphs, colours, color: bool) -> list[tuple[str, str]]:
    """Rows of (plain text, text to print); colour codes are emitted once per run of one colour."""
    rows = []
    for row in levels.tolist():
        plain = "".join(glyphs[v] for v in row)
        if not color:
            rows.append((plain, plain))
            continue
        pieces, current = [], None
        for v in row:
            if colours[v] != current:
                current = colours[v]
                pieces.append(current)
            pieces.append(glyphs[v])
        pieces.append(_ANSI_RESET)
        rows.append((plain, "".join(pieces)))
    return rows


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def render_terminal(mask: torch.Tensor, block_m: int, block_n: int, title: str = "",
                    max_cells: int = 64, color: bool = False) -> str:
    """A text picture of ``mask`` and its block mask, with a legend and density figures.

    The element mask (query rows top to bottom, key columns left to right) is shown one character
    per element when it fits in ``max_cells x max_cells``, else averaged over square cells of
    ``f x f`` elements (the same ``f`` on both axes keeps the shape of the pattern). The block mask
    is drawn on the same character grid, so the two pictures line up cell for cell. They are
    placed side by side when both fit in 160 columns, one above the other otherwise. ``color``
    adds ANSI colours. Returns the text, lines joined by ``\\n``, without a trailing newline.
    """
    mask = _as_mask_2d(mask)
    block_m = _positive_int(block_m, "block_m")
    block_n = _positive_int(block_n, "block_n")
    max_cells = _positive_int(max_cells, "max_cells")
    n_q, n_k = mask.shape
    status = block_status(mask, block_m, block_n)
    figures = density_figures(mask, status)
    tiles = figures["tiles"]

    lines: list[str] = []
    if title:
        lines += [title, ""]

    coarse_tiles = False
    if n_q and n_k:
        cell = max(1, math.ceil(max(n_q, n_k) / max_cells))
        # Tiles narrower than a character cell are merged, so "partial" may then mean "mixed".
        coarse_tiles = cell > min(block_m, block_n)
        levels = _element_glyph_level(_cell_fraction(mask, cell, cell))
        shown = _tiles_under_cells(status, block_m, block_n, cell, cell,
                                   _cell_edges(n_q, cell), _cell_edges(n_k, cell))
        scale = "1 char = 1 element" if cell == 1 else f"1 char = {cell}x{cell} elements"
        left_head = [f"mask q↓ {n_q} x k→ {n_k}", scale]
        right_head = [f"tiles {block_m}x{block_n}: {status.shape[0]} x {status.shape[1]}",
                      "same grid as the mask"]
        left = _paint(levels, _ELEMENT_GLYPHS, _ANSI_ELEMENT, color)
        right = _paint(shown.to(torch.int64), _TILE_GLYPHS, _ANSI_TILE, color)
        lines += _arrange(left_head, left, right_head, right)
    else:
        lines.append(f"mask q {n_q} x k {n_k}: empty, nothing to draw")

    def key(glyph: str, ansi: str) -> str:
        return f"{ansi}{glyph}{_ANSI_RESET}" if color else glyph

    partial_note = "partial (or mixed) tile" if coarse_tiles else "partial tile"
    lines += [
        "",
        f"legend: {key('█', _ANSI_ELEMENT[4])} all attended  "
        f"{key('▓ ▒ ░', _ANSI_ELEMENT[2])} partly attended (more to less)  "
        f"{key('·', _ANSI_ELEMENT[0])} none   |   "
        f"{key('■', _ANSI_TILE[FULL])} full tile  "
        f"{key('▣', _ANSI_TILE[PARTIAL])} {partial_note}  "
        f"{key('·', _ANSI_TILE[EMPTY])} empty tile (skipped)",
        f"elements: {figures['true_elements']:,} of {figures['elements']:,} pairs attended"
        f" (element density {_percent(figures['element_density'])})",
        f"tiles {block_m}x{block_n}: {tiles['full']:,} full, {tiles['partial']:,} partial,"
        f" {tiles['empty']:,} empty of {figures['tile_count']:,}"
        f" (tile fraction {_percent(figures['tile_fraction'])} visited)",
    ]
    return "\n".join(lines)


def _arrange(left_head: list[str], left: list[tuple[str, str]],
             right_head: list[str], right: list[tuple[str, str]]) -> list[str]:
    """Two captioned pictures side by side if they fit in the terminal width, else stacked."""
    left_width = max(len(s) for s in left_head + [p for p, _ in left])
    right_width = max(len(s) for s in right_head + [p for p, _ in right])
    if left_width + _PANEL_GAP + right_width > _TERMINAL_WIDTH:
        return (left_head + [shown for _, shown in left] + [""]
                + right_head + [shown for _, shown in right])
    gap = " " * _PANEL_GAP
    out = []
    heads = [(h, h) for h in left_head], [(h, h) for h in right_head]
    for (lp, ls), (_, rs) in zip(heads[0] + left, heads[1] + right):
        # Pad by the plain text's length: ANSI codes take no columns on screen.
        out.append((ls + " " * (left_width - len(lp)) + gap + rs).rstrip())
    return out


# --------------------------------------------------------------------------------------------
# PNG


def _plain_text(text: str) -> str:
    """Escape ``$`` so matplotlib prints a pattern's text as is instead of reading it as math."""
    return text.replace("$", r"\$")


def render_png(mask: torch.Tensor, block_m: int, block_n: int, path, title: str = "",
               subtitle: str = "") -> None:
    """Write a two-panel PNG of ``mask`` to ``path``: the element mask and its block mask.

    Left: the element mask, query position q down, key position k across, attended pairs dark;
    masks larger than 1024 on a side are averaged into at most 1024 x 1024 cells and shown as
    grey levels (the fraction of attended pairs). Right: the tiles of ``block_m x block_n``
    coloured empty / partial / full, with grid lines while there are few tiles. The title line
    carries ``title`` and ``subtitle`` and the density figures. Needs matplotlib (``pip install
    matplotlib``); raises :class:`attnc.AttncError` without it or when the file cannot be written.
    """
    try:
        # Figure + the Agg canvas, not pyplot: no global backend switch, no GUI, no figure registry.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise AttncError("attnc show --png needs matplotlib: pip install matplotlib") from exc

    mask = _as_mask_2d(mask)
    block_m = _positive_int(block_m, "block_m")
    block_n = _positive_int(block_n, "block_n")
    n_q, n_k = mask.shape
    if n_q == 0 or n_k == 0:
        raise InputError(f"cannot draw an empty mask of shape ({n_q}, {n_k})")
    status = block_status(mask, block_m, block_n)
    figures = density_figures(mask, status)
    tiles = figures["tiles"]
    blocks_q, blocks_k = status.shape

    summary = (f"{n_q} x {n_k} pairs, {_percent(figures['element_density'])} attended   ·   "
               f"tiles {block_m}x{block_n}: {tiles['full']:,} full, {tiles['partial']:,} partial, "
               f"{tiles['empty']:,} empty   ·   "
               f"tile fraction {_percent(figures['tile_fraction'])}")
    header = ([_plain_text(subtitle)] if subtitle else []) + [summary]

    # Very elongated masks would become slivers at their true aspect; stretch those instead.
    ratio = n_q / n_k
    keep_aspect = 0.25 <= ratio <= 4.0
    # Left panel: element mask, averaged into bounded cells (a separate factor per axis keeps
    # resolution on a short axis; the extent keeps the axes in element coordinates either way).
    cell_h = max(1, math.ceil(n_q / _PNG_MAX_CELLS))
    cell_w = max(1, math.ceil(n_k / _PNG_MAX_CELLS))
    averaged = cell_h * cell_w > 1

    # Size the figure around the panels' shape so a wide, flat mask does not leave a tall empty
    # band: a panel is about 5 in wide, and as tall as the mask's shape asks (1.8 to 5 in).
    panel_in = min(5.0, max(1.8, 5.0 * ratio))
    header_in = 0.55 + 0.3 * len(header)
    decorations_in = 0.35 + 0.7 + 0.45  # panel titles, tick labels and axis labels, key
    fig = Figure(figsize=(12.5, header_in + panel_in + decorations_in), dpi=120,
                 layout="constrained")
    fig.get_layout_engine().set(w_pad=0.12, h_pad=0.08)
    FigureCanvasAgg(fig)
    ax_mask, ax_tiles = fig.subplots(1, 2)
    # The suptitle reserves the header: the bold title plus one blank line per header line,
    # which are then drawn in a lighter font over the blank lines. (Constrained layout's own
    # `rect` would be neater, but it then ignores the room the figure legend below needs.)
    title_pt = 15
    fig.suptitle(_plain_text(title or "attention mask") + "\n" * len(header), fontsize=title_pt,
                 fontweight="bold", linespacing=1.35)
    height_pt = fig.get_figheight() * 72
    top_pt = (1 - 0.98) * height_pt  # suptitle's default top edge
    for i, line in enumerate(header):
        y_pt = top_pt + title_pt * 1.2 + 17 * i + 6
        fig.text(0.5, 1 - y_pt / height_pt, line, ha="center", va="top", fontsize=10.5,
                 color="#333333")

    fraction = _cell_fraction(mask, cell_h, cell_w).numpy()
    rows, cols = fraction.shape
    ax_mask.imshow(fraction, cmap="Greys", vmin=0.0, vmax=1.0,
                   extent=(0, cols * cell_w, rows * cell_h, 0),
                   interpolation="antialiased" if averaged else "nearest",
                   aspect="equal" if keep_aspect else "auto")
    ax_mask.set_xlim(0, n_k)
    ax_mask.set_ylim(n_q, 0)
    ax_mask.set_xlabel("key position k")
    ax_mask.set_ylabel("query position q")
    ax_mask.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_mask.yaxis.set_major_locator(MaxNLocator(integer=True))
    # An averaged picture says so in its title, and its key names three grey levels instead of
    # a colourbar: the key row is shared, so both panels keep the same height and stay aligned.
    if averaged:
        ax_mask.set_title(f"element mask (grey = share attended in {cell_h}x{cell_w} cells)",
                          fontsize=12)
        legend = [Patch(facecolor="black", label="all attended"),
                  Patch(facecolor="#808080", label="half"),
                  Patch(facecolor="white", edgecolor="#888888", label="none")]
    else:
        ax_mask.set_title("element mask", fontsize=12)
        legend = [Patch(facecolor="black", label="attended (True)"),
                  Patch(facecolor="white", edgecolor="#888888", label="masked (False)")]
    legend.append(Patch(visible=False, label="   "))  # a spacer between the two panels' keys

    # Right panel: tiles in tile units (ticks count tiles); the ragged last tile is clipped by the
    # limits, so the panel has the same shape as the left one.
    group_q = max(1, math.ceil(blocks_q / _PNG_MAX_CELLS))
    group_k = max(1, math.ceil(blocks_k / _PNG_MAX_CELLS))
    if group_q * group_k > 1:
        # Too many tiles to draw one pixel each: show groups, partial when they are mixed.
        shown = _tiles_under_cells(status, 1, 1, group_q, group_k,
                                   _cell_edges(blocks_q, group_q), _cell_edges(blocks_k, group_k))
    else:
        shown = status
    ax_tiles.imshow(shown.numpy(), cmap=ListedColormap(list(_PNG_TILE_COLOURS)), vmin=-0.5,
                    vmax=2.5, interpolation="nearest",
                    extent=(0, shown.shape[1] * group_k, shown.shape[0] * group_q, 0),
                    aspect=(block_m / block_n) if keep_aspect else "auto")
    ax_tiles.set_xlim(0, n_k / block_n)
    ax_tiles.set_ylim(n_q / block_m, 0)
    ax_tiles.set_xlabel(f"key tile (block_n = {block_n})")
    ax_tiles.set_ylabel(f"query tile (block_m = {block_m})")
    ax_tiles.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_tiles.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_tiles.set_title(f"block mask ({blocks_q} x {blocks_k} tiles)", fontsize=12)
    if blocks_q <= _PNG_GRID_MAX_BLOCKS and blocks_k <= _PNG_GRID_MAX_BLOCKS:
        ax_tiles.hlines(range(1, blocks_q), 0, n_k / block_n, colors="white", linewidth=0.8)
        ax_tiles.vlines(range(1, blocks_k), 0, n_q / block_m, colors="white", linewidth=0.8)
    legend += [Patch(facecolor=_PNG_TILE_COLOURS[FULL], label=f"full tile: {tiles['full']:,}"),
               Patch(facecolor=_PNG_TILE_COLOURS[PARTIAL],
                     label=f"partial tile: {tiles['partial']:,}"),
               Patch(facecolor=_PNG_TILE_COLOURS[EMPTY], edgecolor="#888888",
                     label=f"empty tile (skipped): {tiles['empty']:,}")]
    # One figure-level key below both panels: "outside" legends get their own row from the
    # constrained layout, whereas axes legends placed below an axes can be cut off.
    fig.legend(handles=legend, loc="outside lower center", ncol=len(legend), frameon=False,
               fontsize=10.5, handlelength=1.6)

    try:
        fig.savefig(os.fspath(path), format="png", facecolor="white")
    except OSError as exc:
        raise AttncError(f"cannot write PNG to {os.fspath(path)}: {exc.strerror or exc}") from exc
