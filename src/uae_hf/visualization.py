"""Side-by-side grids of originals and reconstructions, with the caption under each pair."""

import textwrap

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont


def reconstruction_grid(
    originals: list[PIL.Image.Image],
    reconstructions: list[PIL.Image.Image],
    captions: list[str],
    tile: int = 256,
    caption_lines: int = 4,
) -> PIL.Image.Image:
    """One row per item: original | reconstruction, its caption (wrapped, cut to `caption_lines` lines) beneath."""
    if not (len(originals) == len(reconstructions) == len(captions)):
        raise ValueError(
            f"got {len(originals)} originals, {len(reconstructions)} reconstructions and {len(captions)} captions; "
            "pass one of each per item"
        )
    font = PIL.ImageFont.load_default()
    line_height = 14
    chars_per_line = max(20, (2 * tile) // 7)
    row_height = tile + caption_lines * line_height + 8
    grid = PIL.Image.new("RGB", (2 * tile, row_height * len(originals)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for row, (original, reconstruction, caption) in enumerate(zip(originals, reconstructions, captions)):
        top = row * row_height
        grid.paste(original.convert("RGB").resize((tile, tile), PIL.Image.BICUBIC), (0, top))
        grid.paste(reconstruction.convert("RGB").resize((tile, tile), PIL.Image.BICUBIC), (tile, top))
        printable = "".join(char if char.isprintable() else "?" for char in caption) or "(empty caption)"
        lines = textwrap.wrap(printable, chars_per_line)[:caption_lines]
        for index, line in enumerate(lines):
            draw.text((4, top + tile + 4 + index * line_height), line, fill="black", font=font)
    return grid
