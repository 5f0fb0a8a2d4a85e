"""Contact sheets of round trips: original | reconstruction per item, with its name, score and caption beneath."""

import math
import unicodedata
from functools import lru_cache

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

SHEET_BACKGROUND = (255, 255, 255)
LETTERBOX = (226, 226, 226)  # distinct from white, so a letterboxed image's own edges stay visible
TEXT_COLOUR = (20, 20, 20)
MUTED_COLOUR = (110, 110, 110)
ROWS_PER_COLUMN = 4  # pairs stacked before the sheet grows another column of pairs...
MAX_COLUMNS = 4  # ...up to this many; beyond that the sheet grows downwards
NEAREST_FROM = 3  # upscaled by an integer factor with nearest-neighbour from 3x on: tiny images stay crisp pixels

# Typographic characters the default font lacks, written with ones it has.
_ASCII_FOR = {"\u2014": "-", "\u2013": "-", "\u2212": "-", "\u2018": "'", "\u2019": "'", "\u00d7": "x",
              "\u2192": "->", "\u2190": "<-", "\u00df": "ss", "\u00e6": "ae", "\u0153": "oe", "\u00f8": "o"}


def reconstruction_grid(
    originals: list[PIL.Image.Image],
    reconstructions: list[PIL.Image.Image | None],
    captions: list[str],
    names: list[str] | None = None,
    scores: list[float | None] | None = None,
    tile: int = 256,
    caption_lines: int = 10,
) -> PIL.Image.Image:
    """A sheet of round trips: each item is original | reconstruction, a header line and its caption beneath.

    Items run left to right, row by row: one pair per row up to 4 items, then a column more per 4 items up to 4
    columns (16 items: 4 x 4); more items add rows. Each image is letterboxed into a `tile` x `tile` square (aspect
    ratio kept, grey bars); tiny images are enlarged by an integer factor with nearest-neighbour. Text is cleaned
    to what the font can draw.

    Args:
        originals (`list[PIL.Image.Image]`): the input images.
        reconstructions (`list[PIL.Image.Image | None]`): one per original; `None` draws an empty tile.
        captions (`list[str]`): one per original, wrapped to the pair's width.
        names (`list[str]`, *optional*): a label per item (e.g. its file name); defaults to `#1`, `#2`, ...
        scores (`list[float | None]`, *optional*): a score per item, shown right of its label (`None`: none).
        tile (`int`, defaults to 256): side of each image's square, in pixels.
        caption_lines (`int`, defaults to 10): most lines of caption per item; a longer caption ends in "…".
    """
    count = len(originals)
    if not (count == len(reconstructions) == len(captions)):
        raise ValueError(
            f"got {count} originals, {len(reconstructions)} reconstructions and {len(captions)} captions; "
            "pass one of each per item"
        )
    for label, values in (("names", names), ("scores", scores)):
        if values is not None and len(values) != count:
            raise ValueError(f"got {len(values)} {label} for {count} items; pass one per item, or none")
    if tile < 16 or caption_lines < 1:
        raise ValueError(f"tile={tile}, caption_lines={caption_lines}: pass tile >= 16 and caption_lines >= 1")

    font = _font(min(28, max(12, round(tile / 14))))
    line_height = _line_height(font)
    pad = max(4, tile // 48)
    pair_width = 2 * tile
    text_width = pair_width - 2 * pad
    wrapped = [_wrap(_printable(caption, font), font, text_width, caption_lines) for caption in captions]
    gutter = max(8, tile // 16)

    columns = min(MAX_COLUMNS, max(1, math.ceil(count / ROWS_PER_COLUMN)))
    rows = [range(start, min(start + columns, count)) for start in range(0, count, columns)] or [range(0)]
    # each row of pairs is as tall as its longest caption: short captions leave no empty bands
    heights = [line_height + tile + 4 * pad + max((len(wrapped[i]) or 1 for i in row), default=1) * line_height
               for row in rows]
    band = line_height + pad  # column titles
    sheet = PIL.Image.new(
        "RGB", (columns * pair_width + (columns - 1) * gutter, band + sum(heights)), SHEET_BACKGROUND
    )
    draw = PIL.ImageDraw.Draw(sheet)
    for column in range(min(columns, count)):
        left = column * (pair_width + gutter)
        for offset, title in ((0, "original"), (tile, "reconstruction")):
            draw.text((left + offset + pad, pad // 2), title, fill=MUTED_COLOUR, font=font)

    top = band
    for row, height in zip(rows, heights):
        for column, index in enumerate(row):
            left = column * (pair_width + gutter)
            label = _printable(names[index], font) if names is not None else f"#{index + 1}"
            score = scores[index] if scores is not None else None
            score_text = f"score {float(score):.4g}" if score is not None else ""
            score_width = font.getlength(score_text)
            label_width = text_width - score_width - (2 * pad if score_text else 0)
            draw.text((left + pad, top), _fit_line(label, font, label_width), fill=TEXT_COLOUR, font=font)
            if score_text:
                draw.text((left + pair_width - pad - score_width, top), score_text, fill=TEXT_COLOUR, font=font)

            images_top = top + line_height + pad
            for offset, image in ((0, originals[index]), (tile, reconstructions[index])):
                sheet.paste(_letterbox(image, tile), (left + offset, images_top))
            # a hairline between the two, so full-tile images that meet edge to edge still read as two
            draw.line([(left + tile, images_top), (left + tile, images_top + tile - 1)], fill=SHEET_BACKGROUND, width=2)
            lines = wrapped[index] or ["(empty caption)"]
            colour = TEXT_COLOUR if wrapped[index] else MUTED_COLOUR
            for number, line in enumerate(lines):
                draw.text((left + pad, images_top + tile + pad + number * line_height), line, fill=colour, font=font)
        top += height
    return sheet


def _letterbox(image: PIL.Image.Image | None, tile: int) -> PIL.Image.Image:
    """`image` scaled to fit a `tile` square, aspect ratio kept, centred on letterbox grey."""
    square = PIL.Image.new("RGB", (tile, tile), LETTERBOX)
    if image is None:
        return square
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        flat = PIL.Image.new("RGBA", image.size, SHEET_BACKGROUND + (255,))
        image = PIL.Image.alpha_composite(flat, image.convert("RGBA"))  # transparent areas as viewers show them
    image = image.convert("RGB")
    scale = min(tile / image.width, tile / image.height)
    if scale >= NEAREST_FROM:
        factor = math.floor(scale)
        size, resample = (image.width * factor, image.height * factor), PIL.Image.NEAREST
    else:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resample = PIL.Image.LANCZOS if scale < 1 else PIL.Image.BICUBIC
    square.paste(image.resize(size, resample), ((tile - size[0]) // 2, (tile - size[1]) // 2))
    return square


@lru_cache(maxsize=8)
def _font(size: int) -> PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont:
    # Pillow's bundled font: the same glyphs on every machine, no font file to find
    return PIL.ImageFont.load_default(size=size)


def _line_height(font) -> int:
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return ascent + descent + max(2, (ascent + descent) // 5)
    return font.getbbox("Ag")[3] + 4


@lru_cache(maxsize=4096)
def _has_glyph(font, char: str) -> bool:
    """Whether `font` draws `char` as itself rather than as its missing-glyph box."""
    return char.isspace() or _rendered(font, char) != _rendered(font, "\U0010fffd")


@lru_cache(maxsize=4096)
def _rendered(font, char: str) -> bytes:
    canvas = PIL.Image.new("L", (4 * font.size if hasattr(font, "size") else 64,) * 2)
    PIL.ImageDraw.Draw(canvas).text((2, 2), char, fill=255, font=font)
    return canvas.tobytes()


def _printable(text: str, font) -> str:
    """`text` on one line in characters `font` can draw: accents dropped where the font lacks the accented letter,
    common typography spelled in ASCII, controls as spaces, anything else as "?"."""
    characters = []
    for char in str(text):
        if unicodedata.category(char) in ("Cc", "Zl", "Zp") or char.isspace():
            characters.append(" ")
        elif unicodedata.category(char) in ("Cf", "Cs", "Co", "Cn"):
            continue  # zero-width and format characters, lone surrogates, unassigned: nothing to see
        elif _has_glyph(font, char):
            characters.append(char)
        else:
            folded = _ASCII_FOR.get(char) or "".join(
                part for part in unicodedata.normalize("NFKD", char) if not unicodedata.combining(part)
            )
            characters.append(folded if folded and all(_has_glyph(font, part) for part in folded) else "?")
    return " ".join("".join(characters).split())


def _wrap(text: str, font, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; over-long words are broken; past `max_lines` the last line ends in "…"."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while font.getlength(word) > width:
            cut = max(1, _longest_prefix(word, font, width))
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit_line(lines[-1], font, width, cut=True)
    return lines


def _fit_line(text: str, font, width: float, cut: bool = False) -> str:
    """`text`, cut to `width` pixels with a trailing "…" when it does not fit (or always, with `cut`)."""
    if not cut and font.getlength(text) <= width:
        return text
    ellipsis = "\u2026" if _has_glyph(font, "\u2026") else "..."
    return text[: _longest_prefix(text, font, width - font.getlength(ellipsis))].rstrip() + ellipsis


def _longest_prefix(text: str, font, width: float) -> int:
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(text[:middle]) <= width:
            low = middle
        else:
            high = middle - 1
    return low
