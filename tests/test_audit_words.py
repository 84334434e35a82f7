"""``audit --thorough``: pictures that share SIFT visual words are checked by the keypoint rule too,
so a rotated copy whose features are far from its original's is found (classify/audit_words.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from classify.audit import run_audit
from classify.audit_keypoints import ImageKeypoints, keypoint_pairs
from classify.audit_words import most_similar, root_sift, word_candidates
from test_audit import write_toy_store
from test_audit_alignment import PALETTES, _save
from test_audit_keypoints import COSINE, FeaturesAt, rotated_shifted_zoomed, speckled, with_label

FAR = 0.2  # a features cosine under every rule's candidate cosine: only visual words bring the pair up


@pytest.fixture(scope="module")
def far_copy(tmp_path_factory):
    """photo0 (train) and its copy turned by 30 degrees, zoomed and shifted (test), whose features
    score only ``FAR``; 12 unrelated textured pictures."""
    base = tmp_path_factory.mktemp("words")
    root, rows = base / "images", []
    photo = speckled(51)
    rows.append((_save(root, "pomme/photo0.jpg", photo), "pomme", "train"))
    rows.append((_save(root, "pomme/copy0.jpg", rotated_shifted_zoomed(photo)), "pomme", "test"))
    rows += [(_save(root, f"{name}/other{k}.jpg", speckled(60 + 10 * c + k, name, framing=3 + 6 * c + k)), name,
              "validation") for c, name in enumerate(PALETTES) for k in range(6)]
    write_toy_store(root, base / "f.h5", rows, features_of=FeaturesAt({"copy0": "photo0"}, FAR), classes=PALETTES)
    return base, root, [r[0] for r in rows]


def _groups(report: dict) -> set[frozenset[str]]:
    return {frozenset(i["path"] for i in g["images"]) for g in report["duplicate_groups"]}


def test_a_copy_whose_features_are_far_is_found_only_by_the_thorough_audit(far_copy):
    base, _, _ = far_copy
    default = run_audit(base / "f.h5", report_dir=base / "default", progress=False)
    thorough = run_audit(base / "f.h5", report_dir=base / "thorough", progress=False, thorough=True)
    assert _groups(default) == set()
    assert _groups(thorough) == {frozenset({"pomme/photo0.jpg", "pomme/copy0.jpg"})}
    assert thorough["duplicate_groups"][0]["evidence"] == ["keypoints"] and thorough["duplicate_groups"][0]["leak"]
    assert thorough["settings"]["visual_words"]["candidates_per_image"] >= 1
    assert default["settings"]["visual_words"] is None


def test_the_copy_is_among_the_pairs_that_share_words(far_copy):
    _, root, paths = far_copy
    pairs = word_candidates(ImageKeypoints(root, paths))
    assert (0, 1) in {(int(i), int(j)) for i, j, _ in pairs}
    assert np.all(pairs[:, 0] < pairs[:, 1]) and len({(i, j) for i, j, _ in pairs}) == len(pairs)


def test_the_most_similar_rows_are_found_block_by_block():
    rng = np.random.default_rng(0)
    dense = rng.random((60, 40)) * (rng.random((60, 40)) < 0.2)
    dense /= np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-12)
    found = most_similar(sparse.csr_matrix(dense), per_row=2, block_rows=7)
    sims = dense @ dense.T
    np.fill_diagonal(sims, 0)
    expected = set()
    for i in range(60):
        for j in np.argsort(-sims[i], kind="stable")[:2]:
            if sims[i, j] > 0:
                expected.add((min(i, int(j)), max(i, int(j))))
    assert {(int(i), int(j)) for i, j, _ in found} == expected
    assert np.allclose(found[:, 2], sims[found[:, 0].astype(int), found[:, 1].astype(int)])


def test_root_sift_is_the_square_root_of_the_l1_normalised_descriptor():
    d = np.array([[4.0, 0.0, 12.0, 0.0]], dtype=np.float32)
    assert np.allclose(root_sift(d), [[0.5, 0.0, np.sqrt(0.75), 0.0]])
    assert np.allclose(np.linalg.norm(root_sift(d), axis=1), 1.0)


def test_more_candidates_never_unlink_a_pair_the_narrower_search_linked(tmp_path):
    """A label on 4 pictures: among all 6 pairs none is distinctive; the one pair the narrower search
    had is still judged among its own candidates and stays linked."""
    label = speckled(7, "pomme").crop((30, 30, 100, 100))
    paths = [_save(tmp_path, f"a/{k}.jpg", with_label(speckled(10 + k, "citron", framing=k), label, (10 + 20 * k, 40)))
             for k in range(4)]
    candidates = np.array([[i, j, COSINE] for i in range(4) for j in range(i + 1, 4)])
    own = np.array([i == 0 and j == 1 for i, j in candidates[:, :2].astype(int)])
    assert len(keypoint_pairs(tmp_path, paths, candidates)) == 0
    assert [tuple(p) for p in keypoint_pairs(tmp_path, paths, candidates, own=own)[:, :2].astype(int)] == [(0, 1)]


def test_cli_audit_thorough(far_copy, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    base, _, _ = far_copy
    result = CliRunner().invoke(cli, ["audit", "--store", str(base / "f.h5"), "--report-dir", str(tmp_path / "r"),
                                      "--thorough", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("14 images: 1 duplicate groups (2 images), 1 across splits")
    assert "--thorough" in CliRunner().invoke(cli, ["audit", "--help"]).output


def test_thorough_without_the_image_files_says_it_could_not_look(far_copy, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    base, _, _ = far_copy
    result = CliRunner().invoke(cli, ["audit", "--store", str(base / "f.h5"), "--report-dir", str(tmp_path / "r"),
                                      "--images", str(tmp_path), "--thorough", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "visual words (--thorough)" in result.stderr and "0 duplicate groups" in result.stdout


def test_the_thorough_audit_keeps_every_pair_the_default_links(tmp_path):
    """One label on 4 pictures; only pictures 0 and 1 are close in the features, so the default audit
    links them (one partner each). The visual words bring up the label's other pairs (3 partners
    each): the thorough audit still links 0 and 1."""
    label = speckled(7, "pomme").crop((30, 30, 100, 100))
    root, rows = tmp_path / "images", []
    for k in range(4):
        picture = with_label(speckled(10 + k, "citron", framing=k), label, (10 + 20 * k, 40))
        rows.append((_save(root, f"citron/label{k}.jpg", picture), "citron", "train" if k % 2 else "test"))
    rows += [(_save(root, f"pomme/other{k}.jpg", speckled(70 + k, "pomme", framing=3 + k)), "pomme", "validation")
             for k in range(8)]
    write_toy_store(root, tmp_path / "f.h5", rows, features_of=FeaturesAt({"label1": "label0"}, COSINE),
                    classes=PALETTES)
    pair = frozenset({"citron/label0.jpg", "citron/label1.jpg"})
    default = run_audit(tmp_path / "f.h5", report_dir=tmp_path / "d", progress=False)
    thorough = run_audit(tmp_path / "f.h5", report_dir=tmp_path / "t", progress=False, thorough=True)
    assert _groups(default) == {pair}
    assert pair in _groups(thorough)
    assert thorough["summary"]["pairs"]["keypoints"] >= default["summary"]["pairs"]["keypoints"]
