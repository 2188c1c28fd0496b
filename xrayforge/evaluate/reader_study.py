"""Blinded real-vs-synthetic reader study: make a pack, score the readers' answers.

``make``: a balanced random mix of real and synthetic images, all re-encoded as 8-bit PNG at
one size (no metadata survives), with random file names, plus ``index.html`` — a
self-contained page (no server, no network) that shows the images one at a time with
window / level and zoom, records real / synthetic and, if the reader chooses one, a confidence
(1–5) per image, keeps progress in the browser across reloads, and exports the answers as CSV
(a cell a spreadsheet would run as a formula, such as a reader named "=...", with a "'" before it,
taken off again when scored).
A non-square image is padded to square with black, centred, before it is resized: stretched,
its anatomy would be distorted, which a radiologist sees and which would mark its source. The
black bands can mark it too (a generator's images are square): give real images framed as the
generator's training images were (its prepared archive is square) where you can. The answer key
is written outside the pack.

``score``: per reader and pooled accuracy, sensitivity and specificity for "synthetic", two
two-sided tests against chance — an exact binomial test (p = 0.5) and a label-permutation test
(see ``score``; the one to read for the pooled row) — Fleiss' kappa between readers, and the
fraction of synthetic images called real. Each answer file is one reader, named by its
``reader`` column (the file's name when the box was left empty; two such files called alike are
two readers, one called as a named reader is refused); the same reader name in two files, two
answers for one image in a file, an answer in two files with the same time stamp (one reader's
page exported twice), or an answer that names no image of the study, is an error: no answer is
dropped or merged silently.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..utils.files import (read_csv, remove_stale_temporaries, temporary_of, write_bytes_atomic, write_csv,
                           write_text_atomic)
from ._format import cell, is_number, number
from .metrics import label_permutation_p, log_binomial_pmf

log = logging.getLogger(__name__)

SYNTHETIC_WORDS = {"synthetic", "fake", "generated", "s", "f"}
REAL_WORDS = {"real", "r"}

# A cell that starts with one of these is run as a formula by a spreadsheet opening the CSV (OWASP's "CSV
# injection": a reader named "=HYPERLINK(...)", a source file named "@SUM(...).png"); the CSVs written here
# (the key, and the page's export, which does the same in JavaScript) put a "'" before it, which spreadsheets
# show as text, and ``_from_cell`` takes it off again when the file is read back.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _to_cell(text) -> str:
    """``text`` as a CSV cell no spreadsheet runs as a formula: a "'" before a formula's first character."""
    text = str(text)
    return "'" + text if text.startswith(FORMULA_START) else text


def _from_cell(text: str) -> str:
    """A cell written by ``_to_cell`` (or the page's export) as it was given: the "'" before a formula's first
    character taken off. A name typed with that "'" reads as the one without it: one reader, either way."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_START) else text


# --------------------------------------------------------------------------- scoring
def binomial_two_sided(k: int, n: int, p: float = 0.5) -> float:
    """Exact two-sided binomial test: the probability of outcomes no likelier than k."""
    if not 0 <= k <= n:  # logs[-1] would silently be the p of k = n
        raise ValueError(f"binomial_two_sided: k must be 0 .. n = {n}, got {k}")
    if n == 0:
        return 1.0
    logs = [log_binomial_pmf(i, n, p) for i in range(n + 1)]  # in log space: math.comb overflows floats past n ~ 1030
    cut = logs[k] + math.log1p(1e-9)
    return float(min(1.0, sum(math.exp(v) for v in logs if v <= cut)))


def fleiss_kappa(table: np.ndarray) -> float:
    """Fleiss' kappa of an (items, categories) table of rating counts (equal raters per item); NaN
    where it is undefined: no items (an empty table), fewer than two raters, unequal raters per item,
    or every rating in one category (the agreement expected by chance is then 1)."""
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.size == 0:  # [] (no item rated by all) is 1-D: table.sum(1) raised AxisError
        return float("nan")
    n_items, raters = table.shape[0], table.sum(1)
    if n_items == 0 or raters.min() < 2 or raters.min() != raters.max():
        return float("nan")
    r = raters[0]
    p_cat = table.sum(0) / (n_items * r)
    p_item = ((table ** 2).sum(1) - r) / (r * (r - 1))
    p_bar, p_e = p_item.mean(), (p_cat ** 2).sum()
    return float((p_bar - p_e) / (1 - p_e)) if p_e < 1 else float("nan")


def _rates(pairs) -> dict:
    """pairs: (truth_is_synthetic, called_synthetic) booleans."""
    tp = sum(1 for t, c in pairs if t and c)
    fn = sum(1 for t, c in pairs if t and not c)
    tn = sum(1 for t, c in pairs if not t and not c)
    fp = sum(1 for t, c in pairs if not t and c)
    n = tp + fn + tn + fp
    correct = tp + tn
    return {"answers": n, "accuracy": correct / n if n else float("nan"),
            "sensitivity_synthetic": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity_synthetic": tn / (tn + fp) if tn + fp else float("nan"),
            "synthetic_called_real": fn / (tp + fn) if tp + fn else float("nan"),
            "binomial_p": binomial_two_sided(correct, n)}


def read_key(key_path: str | os.PathLike) -> dict[str, bool]:
    key_path = Path(key_path)
    if not key_path.is_file():
        raise FileNotFoundError(f"{key_path}: answer key not found (it is written beside the pack by "
                                "`reader-study make`, never inside it)")
    key, lines = {}, {}
    for i, row in read_csv(key_path, ("image", "truth"), "a reader-study answer key", numbered=True)[0]:
        truth = (row["truth"] or "").strip().lower()
        if truth not in ("real", "synthetic"):
            raise UserError(f"{key_path}, line {i}: truth must be 'real' or 'synthetic', got {row['truth']!r}")
        image = row["image"].strip()  # as an answer's image is read: a space an edit left is not another image
        if image in lines:  # make writes one row per image: a second is an edit, never one to pick from
            raise UserError(f"{key_path}, line {i}: a second row for {image} (the first is on line "
                            f"{lines[image]})")
        lines[image] = i
        key[image] = truth == "synthetic"
    if not key:
        raise UserError(f"{key_path}: the answer key lists no images")
    return key


def _confidence(value, path: Path, line: int) -> int | None:
    """A confidence 1–5, or None where none was given: the page exports an empty cell when the reader
    answered without choosing one (pages made before it did recorded 3, indistinguishable from a 3
    chosen), and a file without the column gives none."""
    text = (value or "").strip()
    if not text:
        return None
    try:
        c = float(text)  # "4.0" from a spreadsheet's round trip
    except ValueError:
        c = float("nan")
    if not (c.is_integer() and 1 <= c <= 5):
        raise UserError(f"{path}, line {line}: confidence must be 1 to 5, or empty where none was given, "
                        f"got {value!r}")
    return int(c)


def _page_stamp(text) -> str:
    """The page's stamp of an answer (ISO 8601 to the millisecond, UTC), else '': a coarser time
    (a date, whole seconds: a file made by hand) could be two readers' alike."""
    text = (text or "").strip()
    return text if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text) else ""


def read_answers(path: str | os.PathLike, key: dict) -> list[dict]:
    """One reader's answers (UTF-8 with or without a byte-order mark). Their reader name is the
    ``reader`` column, or the file's name where that was left empty; one file, one reader. Each
    answer's ``confidence`` is 1–5, or None where the reader chose none (an empty cell)."""
    path = Path(path)
    rows = read_csv(path, ("image", "answer"), "answers exported from the reader-study page", numbered=True)[0]
    # runs of white space (a line break, a tab: a hand edit; the page's box takes one line) as one space: a
    # name with a line break split the Markdown table's row, its second line read as the report's own text
    names = {" ".join(_from_cell(row.get("reader") or "").split()) for _, row in rows} - {""}
    if len(names) > 1:
        raise UserError(f"{path}: answers of several readers ({', '.join(sorted(names))}) in one file; "
                        f"export one file per reader")
    reader = next(iter(names)) if names else path.stem
    out, lines = [], {}
    for i, row in rows:
        image = (row.get("image") or "").strip()
        if image not in key:
            raise UserError(f"{path}, line {i}: answer for an image that is not in the study: {image!r}")
        if image in lines:  # the page exports one answer per image: two are an edit or a merge, never guessed at
            raise UserError(f"{path}, line {i}: a second answer for {image} (the first is on line {lines[image]}); "
                            f"keep one")
        lines[image] = i
        answer = (row.get("answer") or "").strip().lower()
        if answer not in SYNTHETIC_WORDS | REAL_WORDS:
            raise UserError(f"{path}, line {i}: answer must be 'real' or 'synthetic', got {row.get('answer')!r}")
        out.append({"reader": reader, "named": bool(names), "image": image,
                    "synthetic": answer in SYNTHETIC_WORDS, "confidence": _confidence(row.get("confidence"), path, i),
                    "time": _page_stamp(row.get("time"))})
    return out


def score(pack: str | os.PathLike, key_path: str | os.PathLike, answer_files, permutations: int = 10000,
          seed: int = 0) -> dict:
    """Score the readers' answer files against the pack's key: per reader and pooled rates, each with
    two two-sided p-values against chance, and Fleiss' kappa over the images every reader answered.

    ``binomial_p``: the exact binomial test of accuracy against 0.5, which counts every answer as
    independent. For one reader that is fair (their answers are about different images), but the
    pooled answers are not independent: answers about one image are correlated (a blurry real image
    is called synthetic by every reader) and a reader's bias ties their answers together, so the
    pooled binomial p-value is too small, often far too small, when readers cannot tell.
    ``permutation_p``: under the null hypothesis that the answers do not depend on the truth, the
    real / synthetic key is permuted across the pack's images (the same number of each)
    ``permutations`` times, each image's label once for all readers, and the accuracy recomputed:
    per reader over their answers, pooled over all readers' answers together. It keeps the answers'
    correlation, so it holds its level; the pooled row's verdict is its permutation p. Monte Carlo
    (p = (b + 1) / (permutations + 1), never below 1 / (permutations + 1)), seeded by ``seed``: the
    same answers give the same p-values.

    An image a reader left unanswered is not scored for them (``unanswered``: how many, per reader):
    their rates and binomial p are over the images they answered. The permutation still draws the key
    across all the pack's images, the answered ones and the others: under the null hypothesis which
    images a reader answered does not depend on the truth either (a reader who answered "synthetic"
    and only for images that were synthetic is told from chance; drawn over their answered images
    alone, the key could never score them otherwise)."""
    if not Path(pack, "index.html").is_file():
        raise FileNotFoundError(f"{pack}: not a reader-study pack (no index.html)")
    key = read_key(key_path)
    shown = {f.name for f in Path(pack, "images").iterdir() if f.is_file() and not f.name.startswith(".")} \
        if Path(pack, "images").is_dir() else set()  # not a file manager's .DS_Store or ._ files
    if shown != set(key):
        examples = "; ".join(f"{what} {sorted(names)[0]!r}" for what, names in (
            ("e.g. the key's", set(key) - shown), ("e.g. the pack's", shown - set(key))) if names)
        raise UserError(f"{key_path}: not the key of the pack {pack} ({len(set(key) - shown)} of its {len(key)} "
                        f"images are not in the pack, {len(shown - set(key))} of the pack's {len(shown)} are not "
                        f"in the key: {examples})")
    answers, source, given, stamped = [], {}, set(), {}
    for f in answer_files:
        if Path(f).resolve() in given:
            raise UserError(f"{f}: given twice")
        given.add(Path(f).resolve())
        got = read_answers(f, key)
        if not got:
            raise UserError(f"{f}: no answers in it")
        name = got[0]["reader"]
        # two unnamed files called alike (answers-reader.csv from two folders): each its own reader. An unnamed
        # file called as a named reader is refused whichever comes first (it was a second reader when the named
        # file was given first, and refused when it was given second)
        if name in source and not got[0]["named"] and not source[name][1]:
            name = str(f)
        if name in source:
            unnamed = "" if got[0]["named"] and source[name][1] else \
                " (a file without a reader name is named by its file)"
            raise UserError(f"{f}: reader {name!r} also answered in {source[name][0]}{unnamed}; give each reader one "
                            f"file (or correct the reader name)")
        source[name] = (f, got[0]["named"])
        # the page stamps each answer with the moment it was given (to the millisecond): an answer in two files
        # with one stamp is one reader's, exported twice (e.g. answers-reader.csv and answers-reader (1).csv,
        # the name box left empty), never two readers agreeing
        for a in got:
            if a["time"] and (a["image"], a["time"]) in stamped:
                raise UserError(f"{f}: its answer for {a['image']} was given at {a['time']}, as was the one in "
                                f"{stamped[(a['image'], a['time'])]}: one reader's answers exported twice? "
                                f"give each reader one file (their latest)")
        stamped.update({(a["image"], a["time"]): f for a in got if a["time"]})
        answers.extend({**a, "reader": name} for a in got)
    readers = sorted({a["reader"] for a in answers})
    latest = {}
    for a in answers:  # one per reader and image (read_answers refuses a second)
        latest[(a["reader"], a["image"])] = a
    result = {"readers": {}, "images": len(key)}
    for r in readers:
        result["readers"][r] = _rates([(key[a["image"]], a["synthetic"]) for (rd, _), a in latest.items() if rd == r])
        result["readers"][r]["unanswered"] = len(key) - result["readers"][r]["answers"]
    result["pooled"] = _rates([(key[a["image"]], a["synthetic"]) for a in latest.values()])
    images = sorted(key)  # the key file's row order does not change the draws
    row, column = {img: i for i, img in enumerate(images)}, {r: j for j, r in enumerate(readers)}
    synthetic, real = np.zeros((len(images), len(readers) + 1)), np.zeros((len(images), len(readers) + 1))
    for (r, img), a in latest.items():
        (synthetic if a["synthetic"] else real)[row[img], column[r]] = 1
    synthetic[:, -1], real[:, -1] = synthetic[:, :-1].sum(1), real[:, :-1].sum(1)  # pooled: all readers at once
    p = label_permutation_p([key[img] for img in images], synthetic, real, permutations, seed)
    for r in readers:
        result["readers"][r]["permutation_p"] = float(p[column[r]])
    result["pooled"]["permutation_p"] = float(p[-1])
    result["permutations"], result["permutation_seed"] = permutations, seed
    rated_by_all = [img for img in key if all((r, img) in latest for r in readers)]
    table = [[sum(latest[(r, img)]["synthetic"] for r in readers),
              sum(not latest[(r, img)]["synthetic"] for r in readers)] for img in rated_by_all]
    # NaN where undefined: no image answered by every reader (kappa_images 0), or every answer about them alike
    result["fleiss_kappa"] = fleiss_kappa(np.array(table).reshape(-1, 2)) if len(readers) > 1 else None
    result["kappa_images"] = len(rated_by_all)
    return result


def format_markdown(result: dict) -> str:
    """The readers' rates as a table; "n/a" where a rate is undefined (a reader who saw no real or
    no synthetic image: NaN in the result, null once saved as JSON) or, for the permutation p, where
    a result saved before it was computed has none. A note under the table says which p to read
    for the pooled row, and why, and another which readers left images unanswered."""
    lines = ["| reader | answers | accuracy | sensitivity (synthetic) | specificity | synthetic called real | "
             "p (binomial) | p (permutation) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in list(result["readers"].items()) + [("pooled", result["pooled"])]:
        lines.append(f"| {cell(name)} | {r['answers']} | {number(r['accuracy'])} | "
                     f"{number(r['sensitivity_synthetic'])} | {number(r['specificity_synthetic'])} | "
                     f"{number(r['synthetic_called_real'])} | {number(r['binomial_p'], None)} | "
                     f"{number(r.get('permutation_p'), None)} |")
    if "permutation_p" in result["pooled"]:
        lines.append(f"\nPooled over all readers: permutation p = {number(result['pooled']['permutation_p'], None)} "
                     f"(two-sided; the key permuted {result.get('permutations', 'n/a')} times across the images, each "
                     f"image's label once for all readers), the pooled row's test. The binomial p counts every "
                     f"answer as independent, but answers about one image, and one reader's answers, are "
                     f"correlated: pooled, it can be far too small.")
    left = {name: result["images"] - r["answers"] for name, r in result["readers"].items()
            if "images" in result and r["answers"] < result["images"]}
    if left:  # the answers column alone does not say that a reader stopped part-way
        lines.append("\nNot answered, so not scored: " + "; ".join(
            f"{cell(name)} {n} of the {result['images']} images" for name, n in left.items()) + ".")
    # two readers or more: kappa is computed, and where it is undefined (NaN, null once saved) the line says why;
    # it left the report silently before (a saved NaN reads as None, as one reader's "not computed" does)
    if len(result["readers"]) > 1 and "kappa_images" in result:
        n = result["kappa_images"]
        if is_number(result.get("fleiss_kappa")):
            lines.append(f"\nFleiss' kappa {number(result['fleiss_kappa'])} over {n} image{'s' * (n != 1)} (those "
                         f"every reader answered).")
        elif not n:
            lines.append("\nFleiss' kappa n/a: no image was answered by every reader.")
        else:
            lines.append(f"\nFleiss' kappa n/a over {n} image{'s' * (n != 1)}: every answer about them was the same "
                         f"(all real or all synthetic), so agreement beyond chance is undefined.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the pack
def _list_images(spec: str):
    """(name, loader) pairs of a folder of images or an archive; loaders give float [0, 1] arrays."""
    from ..data.archive import Archive
    from ..data.readers import find_images, read_radiograph
    from ..fid.compute import describe
    from .labelled import _manifest, is_sample_folder
    p = Path(spec)
    if describe(str(p)) == "checkpoint":  # its grids and curves are images too, but not radiographs
        raise UserError(f"{spec}: a training run or checkpoint; sample images from it first (`xrayforge sample "
                        f"{spec} --out DIR --n N`) and give DIR")
    if is_sample_folder(p):  # the images the manifest lists, nothing else in the folder
        return [(str(p / r["file"]), (lambda f=p / r["file"]: read_radiograph(f).pixels)) for r in _manifest(p)[0]]
    if (p / "archive.json").is_file():
        arc = Archive(p)
        return [(arc.records[i]["source"], (lambda i=i: arc.as_float(arc.images([i], arc.resolution))[0]))
                for i in range(len(arc))]
    return [(str(f), (lambda f=f: read_radiograph(f).pixels)) for f in find_images(p)]


def _say_enlargement(chosen, size: int) -> str | None:
    """Warn (and return the warning) where images smaller than ``size`` are enlarged on one side
    otherwise than on the other: enlarging blurs, and 256-px synthetic images shown at 1024 beside
    1024-px radiographs are told apart by that alone, whatever the generator."""
    longest = {t: sorted(max(p.shape) for truth, _, p in chosen if truth == t) for t in ("real", "synthetic")}
    # by more than 10% (1000 px shown at 1024 blurs nothing a reader sees)
    small = {t: [m for m in sides if m * 1.1 < size] for t, sides in longest.items()}
    if not (small["real"] or small["synthetic"]) or longest["real"] == longest["synthetic"]:
        return None
    lo = min(longest["real"][0], longest["synthetic"][0])
    said = "; ".join(f"{len(small[t])} of the {len(longest[t])} {t} images" + (
        f" ({small[t][0]}–{small[t][-1]} px on their longer side)" if small[t] else "") for t in longest)
    text = (f"images smaller than --size {size} are enlarged (by more than 10%), more on one side than the other: "
            f"{said}. Enlarging "
            f"blurs, and readers could tell real from synthetic by that alone; --size {lo} shows every image at or "
            f"below its own size")
    log.warning(text)
    return text


def make(real: str, synthetic: str, n: int, out: str | os.PathLike, key_path: str | os.PathLike | None = None,
         size: int = 1024, seed: int = 0) -> dict:
    """Write the blinded pack ``out`` (images/ + index.html) and the key ``key_path``
    (default: ``<out>.key.csv`` beside the pack)."""
    from ..data.prepare import resize, square_image
    from ..data.readers import SkipImage
    from ..utils.images import png_bytes
    out = Path(out)
    beside = out.resolve() if out.name in ("", "..") else out  # `--out .`: the key goes beside that folder
    key_path = Path(key_path) if key_path else beside.with_name(beside.name + ".key.csv")
    if key_path.resolve().is_relative_to(out.resolve()):
        raise UserError(f"the key {key_path} must not be inside the pack {out}")
    if n < 2 or n % 2:
        raise UserError(f"--n must be an even number >= 2 (half real, half synthetic), got {n}")
    if not 1 <= size <= MAX_SIZE:  # --size 100000: 40 GB per image as it is resized, and the system kills the process
        raise UserError(f"--size must be 1 to {MAX_SIZE} px (radiographs are at most about 4,300 px; the default is "
                        f"1024), got {size}")
    if Path(real).resolve() == Path(synthetic).resolve():  # the key would call real images synthetic
        raise UserError(f"{synthetic}: the same images as --real {real}; give the synthetic images")
    unfinished = (out / UNFINISHED).is_file()
    if not unfinished:
        _check_new_pack(out, key_path)
    rng = np.random.default_rng(seed)
    chosen = []
    for truth, spec in (("real", real), ("synthetic", synthetic)):
        items = _list_images(spec)
        if len(items) < n // 2:
            raise UserError(f"{spec}: {len(items)} images, the study needs {n // 2}")
        got, unreadable = 0, []
        for k in rng.permutation(len(items)):
            if got == n // 2:
                break
            name, load = items[k]
            try:
                chosen.append((truth, name, load()))
                got += 1
            except SkipImage as exc:
                unreadable.append(f"{name} ({exc})")
        if got < n // 2:  # never an unbalanced pack
            raise UserError(f"{spec}: only {got} of the {n // 2} {truth} images the study needs could be read; "
                            f"unreadable: {'; '.join(unreadable[:3])}{' ...' if len(unreadable) > 3 else ''}")
    # The order readers see, the file names and the page's storage id come from the seed *and* the chosen
    # images' own pixels: from the seed alone, anyone who guessed it (0 by default) and the folders' sizes
    # could replay the shuffle, the names confirming the guess, and two packs of other images made alike
    # would share names, order of truths and the browser's saved answers. Same inputs and seed: same pack.
    digest, seen = hashlib.sha256(f"xrayforge reader study {seed} {size}".encode()), {}
    for truth, name, pixels in chosen:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        digest.update(f"{truth} {pixels.shape}".encode())
        digest.update(pixels.tobytes())
        # one image chosen as real and as synthetic (a --synthetic folder that holds the real one): the key
        # would call it both, and the readers would see it twice
        same = seen.setdefault(hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).digest(), (truth, name))
        if same[0] != truth:
            raise UserError(f"{name}, chosen as {truth}, is the same image as {same[1]}, chosen as {same[0]}: "
                            f"do --real {real} and --synthetic {synthetic} overlap?")
    enlarged = _say_enlargement(chosen, size)
    rng = np.random.default_rng(int.from_bytes(digest.digest(), "big"))
    rng.shuffle(chosen)
    if unfinished:  # every input read: what the stopped make left goes now, and OUT must then be as new
        _clear_unfinished(out, key_path)
        _check_new_pack(out, key_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / UNFINISHED).write_text(f"{key_path.resolve()}\n")  # until the page is in place
    (out / "images").mkdir()
    key_rows, names, encoded = [], [], []
    for truth, source, pixels in chosen:
        name = f"{rng.integers(0, 2 ** 63):016x}.png"
        # padded to square (black, centred), never stretched: a stretched image's anatomy is distorted, which
        # a radiologist sees, and it would mark images of another aspect ratio (real ones, mostly) as odd
        square = resize(square_image(np.asarray(pixels, dtype=np.float32), "pad"), size)
        encoded.append(png_bytes(np.clip(np.rint(square * 255), 0, 255).astype(np.uint8)))
        key_rows.append({"image": name, "truth": truth, "source": _to_cell(source)})
        names.append(name)
    # every image made first, then all written at once, with one modification time: a file's own times (made,
    # modified) were when its resize and encoding ended, so the gaps between them timed each image's work,
    # which follows its source's size and shape (real ones, mostly, larger or not square) and, with the times
    # kept (a shared folder, `cp -p`, rsync -a), told real from synthetic
    for name, data in zip(names, encoded):
        write_bytes_atomic(out / "images" / name, data)
    stamp = time.time_ns()
    for name in names:
        os.utime(out / "images" / name, ns=(stamp, stamp))
    # the key, then the page: a pack is usable only once index.html is there, and then its key is whole
    write_csv(key_path, ["image", "truth", "source"], key_rows)
    pack_id = f"xrayforge-{rng.integers(0, 2 ** 32):08x}"
    write_text_atomic(out / "index.html", PAGE.replace("__IMAGES__", json.dumps(names)).replace("__PACK__", pack_id))
    (out / UNFINISHED).unlink()
    return {"pack": str(out), "key": str(key_path), "images": len(names), "warnings": [enlarged] if enlarged else []}


# the largest --size: four times a large radiograph's side (an image of it takes 1 GiB as it is resized)
MAX_SIZE = 16384

# written before a pack's first image and removed once its page is in place: only a pack that holds it
# is one that `make` left unfinished (a finished pack whose index.html went missing is not)
UNFINISHED = ".make-unfinished"


def _check_new_pack(out: Path, key_path: Path) -> None:
    from ..utils.files import check_new_file, check_out_dir
    check_out_dir(out, empty=True)
    check_new_file(key_path, "the answer key")
    if key_path.exists():
        raise UserError(f"{key_path}: an answer key is already there (it may belong to a pack readers already "
                        f"have); move it away or give another --key")


def _clear_unfinished(out: Path, key_path: Path) -> None:
    """What a `make` stopped before its last step left (marked by UNFINISHED: images/, perhaps the key of
    exactly those images, a half-written page) is removed, to be made again: no reader can have had that
    pack. A key of other images, or anything `make` does not write, stays and is refused as before."""
    import re
    import shutil
    images = out / "images"
    if (out / "index.html").exists() or \
            any(p.name not in ("images", "index.html.tmp") and not p.name.startswith(".") for p in out.iterdir()):
        return
    # an image, or the temporary file of one a kill stopped (``x.png.tmp.png``, or atomic_write's)
    ours = re.compile(r"[0-9a-f]{16}\.png(\.tmp\.png)?")
    left = {p.name for p in images.iterdir()} if images.is_dir() else set()
    if not all(ours.fullmatch(temporary_of(name) or name) for name in left):
        return  # not only what make writes
    if key_path.exists():
        try:
            keyed = {row["image"] for row in read_csv(key_path, ("image",), "an answer key")[0]}
        except UserError:
            return
        if keyed != left:
            return
        key_path.unlink()
        log.warning("%s: removed the answer key %s of an unfinished pack (no index.html)", out, key_path)
    shutil.rmtree(images, ignore_errors=True)
    (out / "index.html.tmp").unlink(missing_ok=True)
    remove_stale_temporaries(out, recursive=False)  # a killed write of the page
    (out / UNFINISHED).unlink(missing_ok=True)
    log.warning("%s: a reader-study pack left unfinished (no index.html) is made again", out)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Reader study</title>
<style>
body{font-family:sans-serif;margin:0;background:#111;color:#eee}
#bar{padding:8px;display:flex;gap:14px;align-items:center;flex-wrap:wrap;background:#222}
#view{overflow:auto;height:calc(100vh - 110px);text-align:center}
#img{image-rendering:auto;transform-origin:top left}
button{font-size:15px;padding:4px 12px} .on{background:#4a4}
.warn{padding:8px;background:#a22;color:#fff;font-weight:bold}
.note{padding:8px;background:#a60;color:#fff;font-weight:bold}
</style></head><body>
<div id="storage" class="warn" hidden></div>
<div id="missing" class="warn" hidden></div>
<div id="loading" class="note" hidden></div>
<div id="bar">
 <label>Reader <input id="reader" size="10"></label>
 <span id="pos"></span>
 <button id="prev">&larr;</button><button id="next">&rarr;</button>
 <button id="real">Real</button><button id="synthetic">Synthetic</button>
 <span>Confidence <span id="conf"></span></span>
 <label>Window <input id="window" type="range" min="20" max="300" value="100"></label>
 <label>Level <input id="level" type="range" min="20" max="300" value="100"></label>
 <label>Zoom <input id="zoom" type="range" min="100" max="400" value="100"></label>
 <button id="export">Export CSV</button>
</div>
<div id="view"><img id="img" alt="radiograph"></div>
<script>
const IMAGES = __IMAGES__;
const STORE = "__PACK__";
const $ = id => document.getElementById(id);
// answers are kept in this page's memory and copied to the browser's storage after every change; where the
// storage cannot be read or written (full, disabled, a damaged entry), the reader is told so at once and the
// answers in memory still export: a reload would lose them, silently before, and a failed write stopped the
// page between moving to the next image and showing it, so the image shown was not the one then answered
function warnStorage(what, e){
  $("storage").textContent = "Your answers could not be " + what + " by the browser (" + ((e && e.name) || e) +
    "): they are kept on this page only. Do not reload or close it; use Export CSV now, and again when done.";
  $("storage").hidden = false;
}
function fresh(){ return {i: 0, reader: "", answers: {}}; }
let state = fresh();
try {
  const stored = JSON.parse(localStorage.getItem(STORE) || "null");
  if (stored && typeof stored === "object" && stored.answers && typeof stored.answers === "object")
    state = Object.assign(fresh(), stored, {i: Math.min(IMAGES.length - 1, Math.max(0, +stored.i || 0))});
  else if (stored !== null) warnStorage("read back", "a damaged entry");
} catch (e) { warnStorage("read back", e); }
function save(){
  try { localStorage.setItem(STORE, JSON.stringify(state)); $("storage").hidden = true; }
  catch (e) { warnStorage("saved", e); }
}
// this page open in two tabs: each tab's answers reach the other, or the tab saved last would drop the other's
window.addEventListener("storage", e => {
  if (e.key !== STORE || !e.newValue) return;
  let other; try { other = JSON.parse(e.newValue); } catch (err) { return; }
  if (!other || !other.answers || typeof other.answers !== "object") return;
  for (const [img, a] of Object.entries(other.answers)) {
    const mine = state.answers[img];
    if (!mine || (a.changed || 0) >= (mine.changed || 0)) state.answers[img] = a;
  }
  // the storage now holds the other tab's answers alone: where this tab has one it lacks (or a later one: given
  // here before the other tab's write arrived), the merge is saved, or a reload would read the other's only.
  // Nothing to add, nothing saved: the other tab gets no event back, and no two tabs save to each other forever
  const lacking = Object.entries(state.answers).some(([img, a]) => {
    const theirs = other.answers[img];
    return !theirs || (a.changed || 0) > (theirs.changed || 0);
  });
  state.reader = typeof other.reader === "string" ? other.reader : state.reader;
  if (lacking) save();
  show();
});
function shown(){  // the current image is on screen (loaded, not broken): only then can it be answered
  const img = $("img");
  return img.getAttribute("src") === "images/" + IMAGES[state.i] && img.complete && img.naturalWidth > 0;
}
$("img").onload = () => { $("missing").hidden = true; };
$("img").onerror = () => {
  $("loading").hidden = true;  // it will not load: #missing says so
  $("missing").textContent = "Image " + (state.i + 1) + " (" + IMAGES[state.i] + ") could not be shown, so it " +
    "cannot be answered; tell whoever gave you the study.";
  $("missing").hidden = false;
};
function show(){
  const name = IMAGES[state.i], a = state.answers[name] || {};
  if ($("img").getAttribute("src") !== "images/" + name) {  // the same image again: no reload, no load event
    $("missing").hidden = true; $("loading").hidden = true; $("img").src = "images/" + name; }
  $("pos").textContent = (state.i + 1) + " / " + IMAGES.length + "  (" +
    Object.values(state.answers).filter(a => a.answer).length + " answered)";  // a confidence alone is not an answer
  $("real").className = a.answer === "real" ? "on" : "";
  $("synthetic").className = a.answer === "synthetic" ? "on" : "";
  document.querySelectorAll("#conf button").forEach(b => b.className = (+b.dataset.c === a.confidence) ? "on" : "");
  $("reader").value = state.reader;
  style();
}
function style(){
  $("img").style.filter = "contrast(" + $("window").value + "%) brightness(" + $("level").value + "%)";
  $("img").style.transform = "scale(" + $("zoom").value / 100 + ")";
}
// an answer given before its image is shown is not recorded: the reader is told (the image may come up a moment
// later, and nothing else would show that the answer was dropped); the note stays until the next answer or image
function notLoaded(){
  if ($("img").complete) return;  // a broken image: #missing already says it cannot be answered
  $("loading").textContent = "Image " + (state.i + 1) + " was still loading: your answer was not recorded. " +
    "Answer again once it is shown.";
  $("loading").hidden = false;
}
function answer(kind){
  if (!shown()) { notLoaded(); return; }  // an image still loading (the last one still on screen) or a broken one
  $("loading").hidden = true;
  const name = IMAGES[state.i];
  // a confidence the reader did not choose stays unset (exported empty): a default would pass for a choice
  state.answers[name] = Object.assign(state.answers[name] || {},
                                      {answer: kind, time: new Date().toISOString(), changed: Date.now()});
  save(); show();
}
for (let c = 1; c <= 5; c++) {
  const b = document.createElement("button"); b.textContent = c; b.dataset.c = c;
  b.onclick = () => { const name = IMAGES[state.i];
    state.answers[name] = Object.assign(state.answers[name] || {}, {confidence: c, changed: Date.now()});
    save(); show(); };
  $("conf").appendChild(b);
}
// a clicked button keeps no focus: Space or Enter pressed later (after an arrow key moved on, say) clicked it
// again, answering an image the reader had not answered, or moving past one unseen; keyboard answers are R / S
$("bar").addEventListener("click", e => { if (e.target.tagName === "BUTTON") e.target.blur(); });
$("real").onclick = () => answer("real");
$("synthetic").onclick = () => answer("synthetic");
$("prev").onclick = () => { state.i = Math.max(0, state.i - 1); save(); show(); };
$("next").onclick = () => { state.i = Math.min(IMAGES.length - 1, state.i + 1); save(); show(); };
$("reader").oninput = e => { state.reader = e.target.value; save(); };
["window", "level", "zoom"].forEach(id => $(id).oninput = style);
function csv(){
  const rows = [["reader", "image", "answer", "confidence", "time"]];
  for (const [img, a] of Object.entries(state.answers)) if (a.answer)
    rows.push([state.reader, img, a.answer, a.confidence || "", a.time || ""]);
  // a cell a spreadsheet would run as a formula (a reader named "=HYPERLINK(...)") gets a "'" before it, shown
  // as text; scoring takes it off again (reader_study.FORMULA_START, _from_cell)
  const cell = v => (/^[=+\\-@\\t\\r]/.test(String(v)) ? "'" : "") + String(v);
  return rows.map(r => r.map(v => '"' + cell(v).replace(/"/g, '""') + '"').join(",")).join("\\n") + "\\n";
}
$("export").onclick = () => {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([csv()], {type: "text/csv"}));
  a.download = "answers-" + (state.reader || "reader") + ".csv"; a.click();
};
document.addEventListener("keydown", e => {
  // keys typed into the reader's name or moving a slider, and browser shortcuts (Ctrl+R), are not answers
  if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "ArrowRight") $("next").click();
  if (e.key === "ArrowLeft") $("prev").click();
  const key = e.key.toLowerCase();  // R and S with Shift or Caps Lock too
  if (e.repeat) return;  // a key held down: one answer, not one per repeat
  if (key === "r") answer("real"); if (key === "s") answer("synthetic"); });
show();
</script></body></html>
"""
