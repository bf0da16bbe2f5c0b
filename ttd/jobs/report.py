"""`ttd report`: a static, self-contained HTML report of a `ttd tag` or `ttd segment` output.

Each item shows its image with coloured mask overlays (toggled from the legend), the candidate
tags with their scores, selected or rejected, and its error if it has one; errors are also
listed at the top of each page. Images and masks are embedded as data URIs, so a page is one
file that opens anywhere, offline; large jobs are split into pages of `per_page` items
(report.html, report-2.html, ...), linked to each other.

Masks come from a record's "segments" (RLE, in the image's geometry: `ttd segment`), its
"rle_masks" (RLE of `ttd tag --rle-masks`) or its "masks" (PNG files of `ttd tag --masks-dir`);
the last two cover the centre crop the model saw and are placed over that crop. RECORDS is a
JSON-lines file or the Parquet folder of `ttd tag --format parquet`. Every text from a record is
HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ttd.errors import InputError
from ttd.runtime.images import ImageError, decode_image
from ttd.data.inputs import refuse_output_over_input
from ttd.jobs.mask_files import mask_image

COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0))
OVERLAY_ALPHA = 128  # of 255: the image stays visible under a mask
MASK_LEVEL = 128  # a `ttd tag` PNG mask (M × 255) is inside where ≥ this, i.e. M ≥ 0.5


@dataclass
class Overlay:
    label: str
    kind: str
    score: float | None
    colour: tuple[int, int, int]
    data_uri: str


@dataclass
class Entry:
    number: int  # 1-based line of the records file
    title: str
    caption: str | None
    image_uri: str | None
    size: tuple[int, int] | None  # original width, height
    overlays: list[Overlay] = field(default_factory=list)
    candidates: list[tuple[str, float, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # `ttd segment` records: the share of the image's pixels each class won in the label map (its
    # per-pixel argmax, background where every mask is below θ). Its scores are 0 or 1 for most
    # classes and tell a reader little: a class scored 1.000 can still win no pixel, and is rejected for that
    pixel_shares: dict[str, float] | None = None


# why a class of `ttd segment` won no pixel whatever its score (the label map is a per-pixel argmax
# of the class masks, background where every mask is below θ): shown when the pointer is on it
WON_NO_PIXEL_WHY = "each of its pixels went to a class with a higher mask there, or to the background"


def _data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 88} if fmt == "JPEG" else {"optimize": True}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


MIN_SIDE = 256  # small images (a world sample is 64 px) are enlarged to this for the eye


def _display_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    longer = max(width, height)
    ratio = max_side / longer if longer > max_side else max(1.0, min(MIN_SIDE, max_side) / longer)
    return max(1, round(width * ratio)), max(1, round(height * ratio))


def _overlay_uri(mask: np.ndarray, colour: tuple[int, int, int], display: tuple[int, int]) -> str:
    """A bool mask [H, W] as an RGBA PNG at the display size: the colour where inside, clear elsewhere."""
    small = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(display, Image.Resampling.NEAREST)
    alpha = (np.asarray(small) >= 128).astype(np.uint8) * OVERLAY_ALPHA
    rgba = np.zeros((display[1], display[0], 4), np.uint8)
    rgba[..., :3] = colour
    rgba[..., 3] = alpha
    return _data_uri(Image.fromarray(rgba, "RGBA"))


MAX_CROP_SIDE = 4096  # a square mask of an older `ttd tag` covers the model's crop: never larger than this


def _check_mask_size(height: int, width: int, size: tuple[int, int], what: str, crop_ok: bool) -> None:
    """Refuse a mask whose declared size is neither the image's nor (for `ttd tag` masks) a model
    crop's, before anything is decoded: a 122-byte RLE line can declare 40000 x 40000."""
    if (height, width) == (size[1], size[0]):
        return
    if crop_ok and height == width and 0 < height <= MAX_CROP_SIDE:
        return
    raise InputError(f"{what} is {width}x{height}, the image {size[0]}x{size[1]}")


def _rle_mask(rle: object, size: tuple[int, int], what: str, crop_ok: bool) -> np.ndarray:
    from ttd.jobs.coco import decode_rle

    if not isinstance(rle, dict) or not isinstance(rle.get("size"), list) or len(rle["size"]) != 2 \
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in rle["size"]):
        raise InputError(f"{what} is not an RLE mask (needs size [h, w] and counts)")
    _check_mask_size(*rle["size"], size, what, crop_ok)
    return decode_rle(rle)


def _tag_png_mask(path: Path, size: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A `ttd tag` mask PNG as a bool mask in the image's geometry (its size checked before decoding)."""
    if not path.is_file():  # a FIFO or a device would block the report forever; a folder is no mask
        raise InputError(f"{what} {path} is not a file" if path.exists() else f"{what} {path}: file not found")
    with Image.open(path) as png:
        _check_mask_size(png.height, png.width, size, what, crop_ok=True)
        return _crop_mask_in_image(np.asarray(png.convert("L")), size)


def _crop_mask_in_image(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A `ttd tag` mask (uint8 M x 255) as a bool mask in the image's geometry. Masks are written in
    it; an output of an older `ttd tag` holds the centre crop's [S, S] mask, laid where the crop was."""
    width, height = size
    if mask.shape != (height, width):
        mask = np.asarray(mask_image(mask / 255.0, mask.shape[0], size))
    return mask >= MASK_LEVEL


@dataclass(frozen=True)
class FileAccess:
    """Which files a report may embed. Relative paths in records start at `root`; with `confined`
    (the default) a path — relative, absolute, or through a link — must resolve inside one of
    `allowed`, so records cannot make a report that will be shared carry other files
    (`../../secret.png`, `/etc/...`)."""

    root: Path
    allowed: tuple[Path, ...]
    confined: bool = True
    hint: str = ""  # said beside an image that is not found (where the job read its captions)

    @classmethod
    def under(cls, root: Path, *more: Path, confined: bool = True, hint: str = "") -> FileAccess:
        return cls(root, tuple(dict.fromkeys(p.resolve() for p in (root, *more))), confined, hint)

    def path(self, name: str, what: str) -> Path:
        path = Path(name)
        path = path if path.is_absolute() else self.root / path
        if self.confined:
            real = path.resolve()
            if not any(real.is_relative_to(folder) for folder in self.allowed):
                raise PermissionError(f"{what} {name!r} is outside {', '.join(map(str, self.allowed))}: not embedded "
                                      "(pass --images-root with a folder that holds it, or --allow-any-path for a "
                                      "report you will not share)")
        return path


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _candidates(record: dict, entry: Entry) -> None:
    """The candidate rows that are well formed; each malformed one is an error of the item."""
    selected = record.get("selected")
    if selected is not None and not isinstance(selected, list):
        entry.errors.append(f"report: 'selected' is {type(selected).__name__}, not a list")
        selected = []
    chosen = {s.get("tag") if isinstance(s, dict) else s for s in selected or []}
    chosen = {c for c in chosen if isinstance(c, str)}
    key = "candidates" if record.get("candidates") is not None else "top"
    rows = record.get(key) or []
    if not isinstance(rows, list):
        entry.errors.append(f"report: '{key}' is {type(rows).__name__}, not a list")
        return
    for k, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("tag"), str):
            entry.errors.append(f"report: {key}[{k}] is not an object with a 'tag'")
        elif not _finite(row.get("score")):
            entry.errors.append(f"report: {key}[{k}] ({row['tag']!r}): score {json.dumps(row.get('score'))} is not "
                                "a finite number")
        else:
            entry.candidates.append((row["tag"], float(row["score"]), row["tag"] in chosen))


def _masks(record: dict, image_size: tuple[int, int], access: FileAccess) -> list[tuple[str, str, float | None, np.ndarray]]:
    """The record's masks in the image's geometry: segments, else RLE tag masks, else PNG files."""
    masks: list[tuple[str, str, float | None, np.ndarray]] = []
    segments = record.get("segments") or []
    tag_rles = (record.get("rle_masks") or {}) if not segments else {}
    pngs = (record.get("masks") or {}) if not (segments or tag_rles) else {}
    for name, value, kind in (("segments", segments, list), ("rle_masks", tag_rles, dict), ("masks", pngs, dict)):
        if not isinstance(value, kind):
            raise InputError(f"'{name}' is {type(value).__name__}, not {'a list' if kind is list else 'an object'}")
    for k, segment in enumerate(segments):
        if not isinstance(segment, dict) or "label" not in segment:
            raise InputError(f"segments[{k}] is not an object with a 'label'")
        mask = _rle_mask(segment.get("rle"), image_size, f"mask {segment['label']!r}", crop_ok=False)
        score = segment.get("score") if _finite(segment.get("score")) else None
        masks.append((str(segment["label"]), str(segment.get("kind", "")), score, mask))
    for label, rle in tag_rles.items():  # self-contained: shown instead of the PNG files
        mask = _rle_mask(rle, image_size, f"mask {label!r}", crop_ok=True)
        masks.append((str(label), "tag", None, _crop_mask_in_image(mask.astype(np.uint8) * 255, image_size)))
    for label, png in pngs.items():
        if not isinstance(png, str):
            raise InputError(f"mask {label!r} is {type(png).__name__}, not a file name")
        masks.append((str(label), "tag", None, _tag_png_mask(access.path(png, "mask"), image_size, f"mask {label!r}")))
    return masks


def _entry(number: int, record: dict, access: FileAccess, max_side: int,
           colours: dict[str, tuple[int, int, int]] | None = None, mask_access: FileAccess | None = None) -> Entry:
    """One item of the report; `colours` (label -> colour, filled as labels appear) keeps a
    label's colour the same across the items of a report. Whatever is wrong with the record
    becomes an error of this item: the rest of the report renders."""
    colours = {} if colours is None else colours
    title = str(record.get("image", f"line {number}"))
    caption = record.get("caption")
    entry = Entry(number, title, caption if isinstance(caption, str) else None, None, None)
    try:
        _fill(entry, record, access, mask_access or access, max_side, colours)
    except Exception as error:  # a record no check above foresaw: this item fails, not the report
        entry.errors.append(f"report: cannot show this record ({type(error).__name__}: {error})")
    return entry


def _fill(entry: Entry, record: dict, access: FileAccess, mask_access: FileAccess, max_side: int,
          colours: dict[str, tuple[int, int, int]]) -> None:
    if record.get("error"):
        entry.errors.append(str(record["error"]))
    image = None
    if isinstance(record.get("image"), str):
        try:
            image = decode_image(access.path(record["image"], "image"), entry.title)
        except (ImageError, PermissionError) as error:
            if not entry.errors or isinstance(error, PermissionError):  # an error record already says why
                missing = isinstance(error, ImageError) and not access.path(record["image"], "image").exists()
                entry.errors.append(f"report: {error}{access.hint if missing else ''}")
    if image is not None:
        entry.size = image.size
        display = _display_size(*image.size, max_side)
        entry.image_uri = _data_uri(image.resize(display, Image.Resampling.BILINEAR), "JPEG")
        try:
            masks = _masks(record, image.size, mask_access)
        except (ValueError, KeyError, TypeError, OSError) as error:
            entry.errors.append(f"report: cannot show masks ({error})")
            masks = []
        for label, kind, score, mask in masks:
            colour = colours.setdefault(label, COLOURS[len(colours) % len(COLOURS)])
            entry.overlays.append(Overlay(label, kind, score, colour, _overlay_uri(mask, colour, display)))
    _candidates(record, entry)
    entry.pixel_shares = _pixel_shares(record)


def _pixel_shares(record: dict) -> dict[str, float] | None:
    """label -> share of the image's pixels its segments cover, for a record with segments and
    its size; None for any other record (or one whose areas cannot be read)."""
    segments, width, height = record.get("segments"), record.get("width"), record.get("height")
    if not isinstance(segments, list) or not segments or not all(isinstance(v, int) and v > 0 for v in (width, height)):
        return None
    shares: dict[str, float] = {}
    for segment in segments:
        if not isinstance(segment, dict) or not isinstance(segment.get("label"), str) or not _finite(segment.get("area")):
            return None
        shares[segment["label"]] = shares.get(segment["label"], 0.0) + float(segment["area"]) / (width * height)
    return shares


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a JSONL output (an unreadable line becomes an error record), or
    (row number, record) of a Parquet output folder."""
    if path.is_dir():
        from ttd.jobs.parquet_output import read_records as read_parquet

        return list(enumerate(read_parquet(path), start=1))
    out = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise InputError("not a JSON object")
            except ValueError as error:
                record = {"image": f"line {number}", "error": f"{path.name} line {number}: not a record ({error})"}
            out.append((number, record))
    return out


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:20px;margin:0 0 4px}.meta{color:#555;margin-bottom:12px}
nav{margin:8px 0}nav a,nav span{margin-right:8px}
.errors{background:#fff0f0;border:1px solid #e99;padding:8px 12px;margin:8px 0}
.item{display:flex;align-items:flex-start;gap:16px;background:#fff;border:1px solid #ddd;padding:12px;margin:12px 0}
.item.failed{border-color:#e99}
.stage{position:relative;flex:none;line-height:0}.stage img{display:block}
.stage img.overlay{position:absolute;left:0;top:0;width:100%;height:100%}
.stage img.overlay.hidden{display:none}
.info{min-width:240px}.info h2{font-size:15px;margin:0 0 4px;word-break:break-all}
.caption{font-style:italic;margin:0 0 8px}
.legend label{display:block;cursor:pointer}.swatch{display:inline-block;width:12px;height:12px;
margin-right:6px;vertical-align:middle;border:1px solid #0003}
table{border-collapse:collapse;margin-top:8px}td,th{padding:2px 8px;text-align:left}
tr.rejected td{color:#999}tr.selected td:first-child{font-weight:600}
.bar{display:inline-block;height:8px;background:#4a7}.error{color:#b00}
"""

SCRIPT = """
document.querySelectorAll('input[data-overlay]').forEach(function (box) {
  box.addEventListener('change', function () {
    var overlay = document.getElementById(box.dataset.overlay);
    if (overlay) { overlay.classList.toggle('hidden', !box.checked); }
  });
});
document.body.dataset.ready = '1';
"""


def _render_entry(entry: Entry) -> str:
    e = html.escape
    parts = [f'<section class="item{" failed" if entry.errors else ""}" id="item-{entry.number}">']
    if entry.image_uri:
        parts.append('<div class="stage">')
        parts.append(f'<img class="base" src="{entry.image_uri}" alt="{e(entry.title)}">')
        for k, overlay in enumerate(entry.overlays):
            parts.append(f'<img class="overlay" id="ov-{entry.number}-{k}" src="{overlay.data_uri}" '
                         f'alt="mask {e(overlay.label)}">')
        parts.append("</div>")
    parts.append('<div class="info">')
    size = f" ({entry.size[0]}×{entry.size[1]})" if entry.size else ""
    parts.append(f"<h2>{e(entry.title)}{size}</h2>")
    if entry.caption:
        parts.append(f'<p class="caption">{e(entry.caption)}</p>')
    for error in entry.errors:
        parts.append(f'<p class="error">error: {e(error)}</p>')
    if entry.overlays:
        parts.append('<div class="legend">')
        for k, overlay in enumerate(entry.overlays):
            colour = "#%02x%02x%02x" % overlay.colour
            score = f" {overlay.score:.3f}" if isinstance(overlay.score, (int, float)) else ""
            parts.append(f'<label><input type="checkbox" checked data-overlay="ov-{entry.number}-{k}">'
                         f'<span class="swatch" style="background:{colour}"></span>{e(overlay.label)} '
                         f'<small>{e(overlay.kind)}{score}</small></label>')
        parts.append("</div>")
    if entry.candidates:
        shares = entry.pixel_shares
        pixels_head = "<th>pixels won</th>" if shares is not None else ""
        parts.append(f"<table><tr><th>tag</th><th>score</th>{pixels_head}<th></th><th></th></tr>")
        for tag, score, chosen in entry.candidates:
            width = max(0, min(100, round(100 * score)))
            status = "<td>selected</td>" if chosen else "<td>rejected</td>"
            pixels = ""
            if shares is not None:
                share = shares.get(tag, 0.0)
                pixels = f"<td>{100 * share:.1f} %</td>"
                if not chosen and share == 0:  # the label map decides, not the score (whole_image.label_map)
                    status = f'<td title="{WON_NO_PIXEL_WHY}">rejected: won no pixel</td>'
            parts.append(f'<tr class="{"selected" if chosen else "rejected"}"><td>{e(tag)}</td>'
                         f"<td>{score:.3f}</td>{pixels}{status}"
                         f'<td><span class="bar" style="width:{width}px"></span></td></tr>')
        parts.append("</table>")
    parts.append("</div></section>")
    return "\n".join(parts)


def page_name(html_path: Path, page: int) -> Path:
    return html_path if page == 1 else html_path.with_name(f"{html_path.stem}-{page}{html_path.suffix}")


def _nav(html_path: Path, page: int, pages: int) -> str:
    if pages == 1:
        return ""
    links = []
    for p in range(1, pages + 1):
        name = html.escape(page_name(html_path, p).name)
        links.append(f"<span>{p}</span>" if p == page else f'<a href="{name}">{p}</a>')
    return "<nav>page " + " ".join(links) + "</nav>"


def render_page(title: str, entries: list[Entry], page: int, pages: int, html_path: Path, totals: dict) -> str:
    e = html.escape
    errors = [(entry, message) for entry in entries for message in entry.errors]
    error_list = ""
    if errors:
        error_list = ('<div class="errors"><strong>errors on this page</strong><ul>' +
                      "".join(f'<li><a href="#item-{entry.number}">{e(entry.title)}</a>: {e(message)}</li>'
                              for entry, message in errors) + "</ul></div>")
    nav = _nav(html_path, page, pages)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)} ({page}/{pages})</title>'
            f'<link rel="icon" href="data:,"><style>{STYLE}</style></head><body>'
            f"<h1>{e(title)}</h1><div class=\"meta\">{totals['items']} items, {totals['errors']} with errors · "
            f"page {page} of {pages}</div>{nav}{error_list}"
            + "\n".join(_render_entry(entry) for entry in entries)
            + f"{nav}<script>{SCRIPT}</script></body></html>\n")


def job_images_root(records_path: Path) -> Path | None:
    """The folder of the captions file the job recorded (relative image paths in its records start
    there), or None (images given as arguments, no job record). Data that travels with the records:
    a report names it in a hint, and never takes it as its root (docs/reliability.md, "Reports")."""
    if records_path.is_dir():
        from ttd.jobs.parquet_output import JOB_FILE

        places = [records_path / JOB_FILE]
    else:
        from ttd.jobs.jsonl_output import finished_job_path, job_path

        places = [finished_job_path(records_path), job_path(records_path)]
    for place in places:
        try:
            captions = json.loads(place.read_text(encoding="utf-8")).get("captions")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(captions, str) and captions:
            return Path(captions).parent
    return None


REPORT_MARK = '<h1>ttd report: '  # in every page render_page writes (its title heading)


def _written_by_report(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return REPORT_MARK in f.read(1 << 16)
    except OSError:
        return False


def write_report(records_path: Path, html_path: Path, per_page: int = 50, max_side: int = 480,
                 images_root: Path | None = None, allow_any_path: bool = False) -> list[Path]:
    """Write the report of `records_path` (JSONL) to `html_path` (+ further pages); returns the pages.

    Relative image and mask paths in the records start at `images_root` (default: the
    records file's folder; where the job recorded captions elsewhere, a missing image names them
    in a hint). Unless `allow_any_path`,
    an image must resolve inside that root and a mask inside it or the records' folder; any other
    path is an error of its item, not embedded."""
    refuse_output_over_input(html_path, records_path, "the report")
    records = read_records(records_path)
    if not records:
        raise InputError(f"{records_path}: no records to report")
    # the default root is where the records file is, never a folder named by data that travels with
    # it: a job record saying {"captions": "/x"} would otherwise open /x to embedding (docs/formats.md,
    # "Reports and metrics"); where the job read its captions elsewhere, a missing image says so
    root = images_root or records_path.parent
    hint = ""
    captions_root = job_images_root(records_path)
    if images_root is None and captions_root is not None and captions_root.resolve() != root.resolve():
        hint = (f" (the job read its captions in {captions_root}: pass --images-root {captions_root} if you "
                "trust these records)")
    images = FileAccess.under(root, confined=not allow_any_path, hint=hint)
    masks = FileAccess.under(root, records_path if records_path.is_dir() else records_path.parent,
                             confined=not allow_any_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    pages = max(1, -(-len(records) // per_page))
    for page in range(2, pages + 1):  # further pages go beside the first: never over a file of the user's
        if page_name(html_path, page).exists() and not _written_by_report(page_name(html_path, page)):
            raise InputError(f"{page_name(html_path, page)} exists and is not a page of a ttd report: the report "
                             f"needs {pages} pages beside {html_path}; choose another --html name, or move it away")
    totals = {"items": len(records), "errors": sum(1 for _, r in records if r.get("error"))}
    written = []
    colours: dict[str, tuple[int, int, int]] = {}
    for page in range(1, pages + 1):
        chunk = records[(page - 1) * per_page : page * per_page]
        entries = [_entry(number, record, images, max_side, colours, masks) for number, record in chunk]
        path = page_name(html_path, page)
        path.write_text(render_page(f"ttd report: {records_path.name}", entries, page, pages, html_path, totals),
                        encoding="utf-8")
        written.append(path)
    return written
