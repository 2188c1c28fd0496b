"""Edge cases of the reader study's scoring: its statistics against their definitions, and answer
files and keys as a spreadsheet or a hand edit leaves them."""
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from xrayforge.errors import UserError
from xrayforge.evaluate.reader_study import binomial_two_sided, fleiss_kappa, format_markdown, score
from xrayforge.utils.files import json_safe


@pytest.fixture
def study(tmp_path):
    pack = tmp_path / "pack"
    (pack / "images").mkdir(parents=True)
    (pack / "index.html").write_text("<html></html>")
    truth = {"a": "real", "b": "real", "c": "synthetic", "d": "synthetic"}
    for name in truth:
        (pack / "images" / name).write_bytes(b"")
    key = tmp_path / "key.csv"
    key.write_text("image,truth\n" + "".join(f"{k},{v}\n" for k, v in truth.items()))
    return pack, key


def answers(path, text):
    path.write_text(text)
    return path


def _binomial_by_definition(k, n):
    """Two-sided exact binomial p (p = 1/2) in exact fractions: outcomes no likelier than k."""
    pmf = [Fraction(math.comb(n, i), 2 ** n) for i in range(n + 1)]
    return float(sum(q for q in pmf if q <= pmf[k]))


def test_binomial_matches_its_definition_and_refuses_k_outside_0_to_n():
    for n in (0, 1, 2, 3, 7, 20, 51):
        for k in range(n + 1):
            assert binomial_two_sided(k, n) == pytest.approx(_binomial_by_definition(k, n), rel=1e-9)
    for k, n in ((-1, 10), (11, 10), (1, 0)):
        with pytest.raises(ValueError, match="k must be 0 .. n"):  # k = -1 gave k = n's p (logs[-1])
            binomial_two_sided(k, n)


def test_fleiss_kappa_of_degenerate_tables():
    assert math.isnan(fleiss_kappa(np.array([])))           # no item rated by all (was numpy's AxisError)
    assert math.isnan(fleiss_kappa(np.zeros((0, 2))))
    assert math.isnan(fleiss_kappa([[3, 0], [3, 0]]))       # one category only: chance agreement is 1
    assert math.isnan(fleiss_kappa([[1, 0], [0, 1]]))       # one rater
    assert fleiss_kappa([[2, 0], [0, 2]]) == pytest.approx(1.0)
    # Fleiss (1971)'s textbook formula, by hand: items (2,1), (0,3), (3,0), (1,2) of 3 raters
    t = np.array([[2, 1], [0, 3], [3, 0], [1, 2]], float)
    p_i = ((t ** 2).sum(1) - 3) / 6
    p_j = t.sum(0) / 12
    assert fleiss_kappa(t) == pytest.approx((p_i.mean() - (p_j ** 2).sum()) / (1 - (p_j ** 2).sum()))


def test_readers_who_answered_no_image_in_common_are_scored(study, tmp_path):
    """Two readers who split the pack between them (or one whose name differs in case in two files):
    no image answered by every reader, and score failed in numpy (AxisError) instead of saying so."""
    pack, key = study
    a = answers(tmp_path / "a.csv", "reader,image,answer\nA,a,real\nA,c,synthetic\n")
    b = answers(tmp_path / "b.csv", "reader,image,answer\nB,b,real\nB,d,real\n")
    res = score(pack, key, [a, b], permutations=50)
    assert res["kappa_images"] == 0 and math.isnan(res["fleiss_kappa"])
    assert res["readers"]["A"]["accuracy"] == 1.0 and res["readers"]["B"]["accuracy"] == 0.5
    text = format_markdown(res)
    assert "Fleiss' kappa n/a: no image was answered by every reader." in text
    # saved as JSON (NaN as null) and formatted again for the report: said, not dropped
    saved = json.loads(json.dumps(json_safe(res), allow_nan=False))
    assert saved["fleiss_kappa"] is None
    assert "Fleiss' kappa n/a: no image was answered by every reader." in format_markdown(saved)


def test_a_kappa_undefined_because_every_answer_is_alike_is_said(study, tmp_path):
    pack, key = study
    files = [answers(tmp_path / f"{r}.csv", "reader,image,answer\n" + "".join(f"{r},{i},real\n" for i in "abcd"))
             for r in ("A", "B")]
    res = score(pack, key, files, permutations=50)
    assert math.isnan(res["fleiss_kappa"]) and res["kappa_images"] == 4
    for r in (res, json.loads(json.dumps(json_safe(res)))):  # it left the saved result's report silently
        assert "Fleiss' kappa n/a over 4 images: every answer about them was the same" in format_markdown(r)
    one = score(pack, key, files[:1], permutations=50)  # one reader: no kappa, and no line about it
    assert one["fleiss_kappa"] is None and "kappa" not in format_markdown(one)


def test_errors_name_the_files_line_past_blank_lines(study, tmp_path):
    """A spreadsheet's blank rows (or bare commas) are skipped, but the line an error named was
    counted from the rows kept: it pointed at the wrong line."""
    pack, key = study
    f = answers(tmp_path / "r.csv", "reader,image,answer\n\nA,a,real\n,,\nA,b,maybe\n")
    with pytest.raises(UserError, match=r"r\.csv, line 5: answer must be 'real' or 'synthetic', got 'maybe'"):
        score(pack, key, [f])
    f = answers(tmp_path / "q.csv", 'reader,image,answer\n"A\nSmith",a,real\n"A\nSmith",a,real\n')
    with pytest.raises(UserError, match=r"q\.csv, line 4: a second answer for a \(the first is on line 2\)"):
        score(pack, key, [f])
    edited = tmp_path / "edited.key.csv"
    edited.write_text("image,truth\r\na,real\r\n\r\nb,real\r\n,\r\nb,synthetic\r\n")
    with pytest.raises(UserError, match=r"edited\.key\.csv, line 6: a second row for b \(the first is on line 4\)"):
        score(pack, edited, [f])


def test_a_space_an_edit_left_in_the_key_is_not_another_image(study, tmp_path):
    pack, key = study
    key.write_text("image,truth,note\na ,real,x\nb,real,\n c,synthetic,\nd,synthetic,\n")  # an extra column too
    f = answers(tmp_path / "r.csv", "reader,image,answer\nA,a,real\nA, c ,fake\n")
    assert score(pack, key, [f], permutations=10)["readers"]["A"]["accuracy"] == 1.0
    key.write_text("image,truth\na,real\nb,real\nc,synthetic\n")  # a row deleted: the missing image is named
    with pytest.raises(UserError, match=r"not the key of the pack .* are not in the key: e\.g\. the pack's 'd'\)"):
        score(pack, key, [f])


def test_a_named_and_an_unnamed_file_of_one_name_are_refused_in_either_order(study, tmp_path):
    """An unnamed Bob.csv beside a file whose reader is Bob: refused when given second, but counted
    as a second reader (named by its path) when given first."""
    pack, key = study
    named = answers(tmp_path / "named.csv", "reader,image,answer\nBob,a,real\n")
    (tmp_path / "u").mkdir()
    unnamed = answers(tmp_path / "u" / "Bob.csv", "reader,image,answer\n,b,real\n")
    for files in ([named, unnamed], [unnamed, named]):
        with pytest.raises(UserError, match="reader 'Bob' also answered in .*named by its file"):
            score(pack, key, files, permutations=10)
    # two unnamed files called alike are still two readers (answers-reader.csv from two folders)
    other = answers(tmp_path / "Bob.csv", "reader,image,answer\n,c,fake\n")
    assert len(score(pack, key, [unnamed, other], permutations=10)["readers"]) == 2


def test_a_reader_name_with_a_line_break_stays_on_its_row(study, tmp_path):
    pack, key = study
    f = answers(tmp_path / "r.csv", 'reader,image,answer\n"Dr\n# Heading\tX",a,real\n"Dr # Heading X",b,real\n')
    res = score(pack, key, [f], permutations=10)
    assert list(res["readers"]) == ["Dr # Heading X"]  # one reader, one line
    assert not any(line.startswith("#") for line in format_markdown(res).splitlines())


def test_the_permutation_p_is_seeded_and_does_not_depend_on_the_files_order(study, tmp_path):
    pack, key = study
    a = answers(tmp_path / "a.csv", "reader,image,answer\nA,a,real\nA,b,real\nA,c,fake\nA,d,fake\n")
    b = answers(tmp_path / "b.csv", "reader,image,answer\nB,a,real\nB,b,fake\nB,c,fake\nB,d,real\n")
    one, two = score(pack, key, [a, b], 300, seed=5), score(pack, key, [b, a], 300, seed=5)
    assert one == two
    # A is right about all 4 images: 2 of the 6 balanced keys are as far from chance (all right, all wrong)
    assert one["readers"]["A"]["permutation_p"] == pytest.approx(1 / 3, abs=0.1)
    assert one["readers"]["A"]["permutation_p"] >= 1 / 301  # never 0: (b + 1) / (rounds + 1)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        score(pack, key, [a], permutations=0)
