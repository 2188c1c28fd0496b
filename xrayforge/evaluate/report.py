"""`xrayforge evaluate report RUN --out report.html`: one self-contained page for a trained model.

It gathers what exists: the training run's curves and latest sample grid, and every evaluation
written by the other `xrayforge evaluate` commands (each folder's summary.json names its
evaluation), from ``RUN/evaluations/*`` and from folders given with ``--evaluations``:
per-finding sample grids (diversity), the FID tables (fid-findings), the TSTR table, the
diversity tables and co-occurrence map, the memorisation audit and the reader study. Images are
embedded, so the page can be mailed on its own. A Markdown version is written beside it.
"""
from __future__ import annotations

import base64
import html
import logging
import os
from pathlib import Path

from ..errors import UserError
from ._format import number, split_row
from ..nn.checkpoint import checkpoint_dirs, is_best_record, names_a_checkpoint
from ..utils.files import read_json, read_jsonl, write_text_atomic

log = logging.getLogger(__name__)

SECTION_ORDER = ("diversity-grids", "fid-findings", "tstr", "diversity", "memorisation", "reader-study")
EVALUATIONS = ("fid-findings", "tstr", "diversity", "memorisation", "reader-study")  # what a summary.json may name


def find_evaluations(run: str | os.PathLike | None, extra=()) -> dict[str, Path]:
    """{evaluation kind: folder} from RUN/evaluations/* and the ``extra`` folders (later ones win)."""
    folders = []
    if run is not None and (Path(run) / "evaluations").is_dir():
        folders += sorted(p for p in (Path(run) / "evaluations").iterdir() if p.is_dir())
    asked = [Path(e) for e in extra]
    for p in asked:
        if not (p / "summary.json").is_file():
            raise FileNotFoundError(f"{p}: no summary.json (is it the --out folder of an `xrayforge evaluate` command?)")
        folders.append(p)
    found = {}
    for p in folders:
        s = p / "summary.json"
        if s.is_file():
            kind = read_json(s, "an evaluation summary").get("evaluation")
            if kind in EVALUATIONS:
                # one section per kind: another of the kind is never left out without a word
                if kind in found and found[kind].resolve() != p.resolve():
                    log.warning("%s and %s are both %s evaluations; the report shows the latter (--evaluations "
                                "DIR chooses)", found[kind], p, kind)
                found[kind] = p
            elif p in asked:  # asked for by name: never left out without a word
                raise UserError(f"{s}: not the summary of an `xrayforge evaluate` command (it names "
                                f"{f'the evaluation {kind!r}, which the report does not know' if kind else 'no evaluation'}"
                                f"; a sample folder's or a run's summary?)")
    return found


def _training_section(run: Path) -> list[str]:
    lines = ["## Training"]
    log = run / "log.jsonl"
    if log.is_file():
        ticks, torn = read_jsonl(log)  # a last line torn by a kill is left out
        ticks = [t for t in ticks if {"images", "resolution", "alpha"} <= set(t)]
        if torn:
            lines.append(f"(The last line of {log} was cut short, by a crash or a kill; it is left out.)")
        if ticks:
            last = ticks[-1]
            # a stop within a tick logs its part, and the resumed run the rest, under the same number
            n_ticks = len({t.get("tick", -i) for i, t in enumerate(ticks)})
            seconds = last.get("total_seconds", last.get("seconds"))  # "seconds": this session's (a resume restarts it)
            lines.append(f"{_count(last['images'])} images seen in {number(seconds, 0)} s over {n_ticks} ticks; "
                         f"last resolution {last['resolution']} px (fade-in α {number(last['alpha'], 2)}); final losses "
                         f"D {number(last.get('d_loss'))}, G {number(last.get('g_loss'))}, "
                         f"gradient penalty {number(last.get('gp'))}.")
            measured = [t for t in ticks if "fid" in t or "precision" in t]
            if measured:
                m = measured[-1]
                got = ", ".join(f"{k} {number(m[k])}" for k in ("fid", "precision", "recall", "density", "coverage")
                                if k in m)
                lines.append(f"Measured during training ({m.get('metrics_images', '?')} G_ema samples against as many "
                             f"real images, features {m.get('metrics_features', 'inception')}), at "
                             f"{_count(m['images'])} images: {got}.")
            best = run / "checkpoints" / "best.json"
            try:
                b = read_json(best, "the best checkpoint's record") if best.is_file() else None
                if b is not None and not is_best_record(b):  # valid JSON, but not the record (a hand edit)
                    raise UserError(f"{best}: not a best checkpoint's record")
            except UserError as exc:  # damaged by hand or a disk fault: said, and the rest of the report stands
                lines.append(f"({exc}; `train --resume` writes it again.)")
                b = None
            if b is not None:
                name = str(b.get("checkpoint"))
                # a run killed and not resumed since may name one damaged, renamed or removed by hand
                gone = "" if names_a_checkpoint(best.parent, name) else (
                    f" It is no longer in {best.parent} (damaged, renamed or removed); `train --resume` brings "
                    f"best.json in line.")
                lines.append(f"Best checkpoint: {name} (tick {b.get('tick')}, {b.get('images', 0):,} "
                             f"images; " + ", ".join(f"{k} {number(b[k])}" for k in ("fid", "precision", "recall",
                                                                                 "density", "coverage") if k in b)
                             + ")." + gone)
            if "realism" in last:
                lines.append(f"G_ema's samples at the last tick: realism ratio {number(last['realism'], 2)} (median distance "
                             f"to the nearest real image over the real images' own; 1 = as close to the data as the "
                             f"data is to itself), diversity ratio {number(last.get('diversity'), 2)} (the same among the "
                             f"samples; well below 1 = mode collapse).")
    else:
        lines.append(f"No training log ({log}).")
    for name, title in (("loss.png", "training curves"), ("grid-latest.png", "samples at the end of training")):
        if (run / name).is_file():
            lines += ["", f"![{title}]({run / name})"]
    return lines


def _count(v) -> str:
    """An image count with thousands separators; 'n/a' where a log line (edited, damaged) holds no number."""
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else number(v, 0)


def _generator_of(summary: dict) -> str | None:
    """The checkpoint whose samples an evaluation measured (None: not known): diversity's summary
    records it; fid-findings', tstr's and memorisation's record their synthetic images, an archive
    whose sample_config.json does when `xrayforge sample` wrote it."""
    ckpt = summary.get("checkpoint")
    if isinstance(ckpt, str):
        return ckpt
    source = summary.get("synthetic_source", summary.get("synthetic"))  # memorisation: "synthetic" is a count
    if not isinstance(source, str) or not (Path(source) / "sample_config.json").is_file():
        return None
    try:
        ckpt = read_json(Path(source) / "sample_config.json", "a sampled archive's settings").get("checkpoint")
    except (UserError, AttributeError):  # unreadable, or not a table: the provenance is not known
        return None
    return ckpt if isinstance(ckpt, str) else None


def _provenance(run: Path | None, summary: dict) -> list[str]:
    """A line under an evaluation's heading: which checkpoint's samples it measured, and, where that is an
    older checkpoint of this run than its newest (and not its best), that it is of an earlier generator
    (training went on after it, or its samples were not made again): the report would show it as current."""
    ckpt = _generator_of(summary)
    if ckpt is None:
        return []
    line = f"Synthetic images: samples of the checkpoint {ckpt}."
    ckpt_dir = Path(run) / "checkpoints" if run is not None else None
    own = ckpt_dir is not None and Path(ckpt).parent.resolve() == ckpt_dir.resolve()
    newest = checkpoint_dirs(ckpt_dir) if own else []
    if newest and Path(ckpt).name != newest[0].name:
        try:
            best = read_json(ckpt_dir / "best.json", "the best checkpoint's record") \
                if (ckpt_dir / "best.json").is_file() else None
        except UserError:
            best = None
        if not (is_best_record(best) and best["checkpoint"] == Path(ckpt).name):  # the best one: chosen, not stale
            log.warning("%s: an evaluation of %s, and the run's newest checkpoint is %s", run, Path(ckpt).name,
                        newest[0].name)
            line += (f" **The run has trained on since: its newest checkpoint is {newest[0].name}, so this is an "
                     f"evaluation of an earlier generator** (sample it again and rerun the evaluation to measure "
                     f"the newest).")
    return [line, ""]


def _section(kind: str, folder: Path, s: dict | None = None) -> list[str]:
    """The Markdown of one evaluation, from its folder and its summary ``s`` (read here if not given)."""
    if s is None:
        s = read_json(folder / "summary.json", "an evaluation summary")
    if kind == "diversity-grids":
        lines = ["## Samples per finding",
                 "The unconditional samples the classifier most confidently calls positive for each finding."]
        for finding, rel in s.get("grids", {}).items():
            lines += ["", f"### {finding}", f"![{finding}]({folder / rel})"]
        return lines
    if kind == "fid-findings":
        return ["## FID", (folder / "fid_findings.md").read_text(), f"![FID per finding]({folder / 'fid_findings.png'})"]
    if kind == "tstr":
        return ["## Train on synthetic, test on real", (folder / "tstr.md").read_text(),
                f"![TSTR AUROC]({folder / 'tstr.png'})"]
    if kind == "diversity":
        return ["## Disease diversity", (folder / "diversity.md").read_text(),
                f"![finding co-occurrence]({folder / 'cooccurrence.png'})"]
    if kind == "memorisation":
        from .memorisation import chance_sentence, space_title
        return ["## Memorisation audit",
                f"{s['flagged']} of {s['synthetic']} synthetic images ({number(100 * s['flagged_fraction'], 2)}%) are closer "
                f"to a real image than {s['percentile']}% of real images are to their nearest "
                f"{'real image of another patient' if s.get('threshold_excludes') == 'same patient' else 'other real image'}"
                f" ({space_title(s)}: {s['inception']}). {chance_sentence(s)}", "",
                "| distance to the nearest real image (median) | synthetic | real-to-real |", "|---|---|---|",
                f"| {space_title(s)} | {number(s['median_synthetic_to_real_inception'], None)} | "
                f"{number(s['median_real_to_real_inception'], None)} |",
                f"| pixels (32×32) | {number(s['median_synthetic_to_real_pixels'], None)} | "
                f"{number(s['median_real_to_real_pixels'], None)} |",
                "", f"![distance distributions]({folder / 'distances.png'})", "",
                "Closest pairs (synthetic left, nearest real right; the flagged ones first, beside the real "
                "image they were flagged against):", "",
                f"![closest pairs]({folder / 'closest_pairs.png'})"]
    if kind == "reader-study":
        from .reader_study import format_markdown
        return ["## Reader study", f"{len(s['result']['readers'])} readers, {s['result']['images']} images "
                f"(half real, half synthetic).", "", format_markdown(s["result"])]
    raise ValueError(f"unknown evaluation {kind!r}")


def build_markdown(run: str | os.PathLike | None, evaluations: dict[str, Path], title: str,
                   preamble: str = "") -> str:
    """The report as Markdown: the training section, ``preamble`` (the caller's own sections),
    then every evaluation found."""
    lines = [f"# {title}", ""]
    if run is not None:
        lines += _training_section(Path(run)) + [""]
    if preamble.strip():
        lines += [preamble.strip(), ""]
    sections = dict(evaluations)
    if "diversity" in sections and read_json(sections["diversity"] / "summary.json").get("grids"):
        sections["diversity-grids"] = sections["diversity"]
    for kind in SECTION_ORDER:
        if kind in sections:
            try:
                summary = read_json(sections[kind] / "summary.json", "an evaluation summary")
                part = _section(kind, sections[kind], summary)
                if kind != "diversity-grids":  # said once, in the diversity section
                    part[1:1] = _provenance(Path(run) if run is not None else None, summary)
                lines += part + [""]
            except (UserError, UnicodeDecodeError):  # said already (a damaged file, named)
                raise
            except KeyError as exc:  # a summary from another version, or edited: say which, never a traceback
                raise UserError(f"{sections[kind] / 'summary.json'}: no {exc} in it; not a complete {kind} summary "
                                f"(run `xrayforge evaluate {kind}` again into that folder)") from None
            except FileNotFoundError as exc:  # its table (tstr.md, ...) gone: removed, or the folder copied in part
                raise UserError(f"{exc.filename}: missing; the {kind.replace('-grids', '')} evaluation in "
                                f"{sections[kind]} is incomplete (run `xrayforge evaluate "
                                f"{kind.replace('-grids', '')}` again into that folder)") from None
            except (TypeError, AttributeError, ValueError) as exc:  # a value of another type (null, text, a list)
                raise UserError(f"{sections[kind] / 'summary.json'}: a value of the wrong type in it ({exc}); not a "
                                f"valid {kind.replace('-grids', '')} summary (edited or damaged? run `xrayforge "
                                f"evaluate {kind.replace('-grids', '')}` again into that folder)") from exc  # --debug: where
    missing = [k for k in EVALUATIONS if k not in sections]
    if missing:
        lines += ["## Not evaluated", "No results found for: " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def _inline(text: str) -> str:
    out = html.escape(text)
    parts = out.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _relative_images(markdown: str, base: Path) -> str:
    """Image paths relative to ``base`` (the folder the Markdown file goes to)."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("![") and line.endswith(")") and "](" in line:
            src = line[line.index("](") + 2:-1]
            line = line[:line.index("](") + 2] + os.path.relpath(Path(src).resolve(), base.resolve()) + ")"
        out.append(line)
    return "\n".join(out) + "\n"


def _is_png(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def markdown_to_html(markdown: str, title: str, base: str | os.PathLike = ".") -> str:
    """The report's Markdown subset (headings, paragraphs, tables, images) as one HTML page with
    the images embedded; image paths are relative to ``base``."""
    body, table, items = [], False, False
    for line in markdown.splitlines():
        if table and not line.startswith("|"):
            body.append("</table>")
            table = False
        if items and not line.startswith("- "):
            body.append("</ul>")
            items = False
        if line.startswith("- "):
            if not items:
                body.append("<ul>")
                items = True
            body.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if line == REPORT_MARK:  # the report's mark stays a comment (nothing else passes unescaped)
            body.append(line)
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("![") and line.endswith(")") and "](" in line:
            alt, src = line[2:line.index("](")], Path(base) / line[line.index("](") + 2:-1]
            # every image of a report is a PNG; a line of an evaluation's text (a reader's name, an edited
            # .md or summary) could name any file, which the mailed page must not carry
            if src.is_file() and _is_png(src):
                body.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,'
                            f'{base64.b64encode(src.read_bytes()).decode()}" style="max-width:100%"></p>')
            else:
                body.append(f"<p>({'not a PNG image, left out' if src.is_file() else 'missing image'}: "
                            f"{html.escape(str(src))})</p>")
        elif line.startswith("|"):
            cells = split_row(line)
            if all(set(c) <= {"-", ":"} for c in cells):
                continue
            tag = "th" if not table else "td"
            if not table:
                body.append("<table>")
                table = True
            body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    body += ["</table>"] if table else []
    body += ["</ul>"] if items else []
    style = ("body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
             "font-size:90%}th{background:#eee}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


REPORT_MARK = "<!-- written by xrayforge evaluate report -->"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LEGACY_STYLE = "body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}"


_LEGACY_SECTIONS = ("\n## Training\n", "\n## Not evaluated\n", "\n## FID\n", "\n## Memorisation audit\n",
                    "\n## Reader study\n", "\n## Disease diversity\n", "\n## Train on synthetic, test on real\n")


def _is_report(path: Path, html_path: Path) -> bool:
    """Whether ``path`` is a report (HTML or its Markdown copy) that write_report wrote, so that it
    may be replaced. The mark is on the first line of the Markdown and the HTML's first lines;
    reports from before it are known by their style sheet, and their Markdown copies by the HTML
    beside them and a section heading of a report."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    if REPORT_MARK in head:
        return True
    if path.suffix.lower() == ".md":
        if not (head.startswith("# ") and html_path.is_file() and _is_report(html_path, html_path)):
            return False
        text = path.read_text(errors="replace")
        return any(section in text for section in _LEGACY_SECTIONS)
    return _LEGACY_STYLE in head


def write_report(out: str | os.PathLike, run: str | os.PathLike | None = None, evaluations=(),
                 title: str = "xrayforge report", preamble: str = "") -> dict:
    """Write ``out`` (HTML) and the same report as Markdown beside it; returns what went in."""
    if run is not None and not Path(run).is_dir():
        raise FileNotFoundError(f"{run}: no such training run folder")
    if run is not None and not any((Path(run) / n).exists() for n in ("log.jsonl", "checkpoints", "evaluations")):
        # another folder (the demo's --out, an archive): a report of nothing, every evaluation "not evaluated"
        inner = [p.parent for p in sorted(Path(run).glob("*/log.jsonl"))]
        raise UserError(f"{run}: not a training run folder (no log.jsonl, checkpoints/ or evaluations/ in it)"
                        + (f"; the run in it is {inner[0]}" if inner else ""))
    found = find_evaluations(run, evaluations)
    md = build_markdown(run, found, title, preamble)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out is the HTML file to write (e.g. {out / 'report.html'})")
    if out.suffix.lower() not in (".html", ".htm"):  # it and a .md beside it are replaced: never another file
        raise UserError(f"{out}: --out is the report's HTML file and must end in .html (a Markdown copy goes "
                        f"beside it as {out.with_suffix('.md').name})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{out.parent}: is a file, not a folder (for --out {out})") from None
    md_path = out.with_suffix(".md")
    others = [p for p in (out, md_path) if p.exists() and not _is_report(p, out)]
    if others:
        raise UserError(f"{others[0]}: exists and is not a report this command wrote; the report and its "
                        f"Markdown copy ({out.name}, {md_path.name}) would replace it. Choose another --out")
    md = REPORT_MARK + "\n" + _relative_images(md, out.parent)
    for path, text in ((md_path, md), (out, markdown_to_html(md, title, out.parent))):
        write_text_atomic(path, text)
    return {"html": str(out), "markdown": str(out.with_suffix(".md")), "evaluations": {k: str(v) for k, v in found.items()}}
