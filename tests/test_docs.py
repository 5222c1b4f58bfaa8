"""The documentation cannot drift: every ```python block of README.md and docs/ runs (small settings), and the site
builds with no warning, formulas set for MathJax and no raw Sphinx roles in the API reference."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning
import torch

from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import Classifier

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

#: Blocks that cannot run on one CPU process, by a string they contain, with the reason and where it is tested.
NOT_RUN = {
    "ModelParallelStrategy(": "needs 8 processes with FSDP2; tests/callbacks/test_fsdp.py runs the same on 2",
}

_REAL_TRAINER = pytorch_lightning.Trainer


def _small_trainer(*args, **kwargs):
    """The snippet's Trainer with small settings: one short epoch on the CPU, quiet."""
    kwargs.update(max_epochs=1, limit_train_batches=5, limit_val_batches=2, accelerator="cpu", devices=1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    return _REAL_TRAINER(*args, **kwargs)


def _blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


class MyAttention(torch.nn.Module):
    """A user's attention module as the structure docs name it (GQA: ``n_heads`` query heads over ``n_kv`` KV heads)."""

    def __init__(self, dim: int = 32, n_heads: int = 4, n_kv: int = 2) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, dim // n_heads
        self.wq = torch.nn.Linear(dim, n_heads * self.head_dim)
        self.wk = torch.nn.Linear(dim, n_kv * self.head_dim)
        self.wv = torch.nn.Linear(dim, n_kv * self.head_dim)
        self.wo = torch.nn.Linear(n_heads * self.head_dim, dim)


class MyMLP(torch.nn.Module):
    """A user's two-layer MLP as the structure docs name it."""

    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.w_in, self.w_out = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)


def _user_namespace() -> dict:
    """What the snippets leave to the reader: their model (also as ``pretrained_model``), data, loader, optimizer
    (digits, a LeNet-300-100) and their own attention and MLP classes."""
    torch.manual_seed(0)
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup()
    model = Classifier(arch="lenet300", input_shape=(1, 8, 8), lr=0.05)
    loader = datamodule.train_dataloader()
    return {
        "pl": pytorch_lightning, "model": model, "datamodule": datamodule, "loader": loader,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05),
        "example_batch": next(iter(datamodule.test_dataloader()))[0], "MyModel": Classifier,
        "pretrained_model": model, "MyAttention": MyAttention, "MyMLP": MyMLP,
    }  # fmt: skip


PAGES_WITH_CODE = [page for page in PAGES if _blocks(page)]


def test_readme_and_docs_hold_python_blocks():
    assert ROOT / "README.md" in PAGES_WITH_CODE and len(PAGES_WITH_CODE) >= 5


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    """A page's blocks run in order in one namespace (a later block may use an earlier one's imports)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pytorch_lightning, "Trainer", _small_trainer)
    namespace = _user_namespace()
    ran, compiled_only = [], []
    for line, code in _blocks(page):
        compiled = compile(code, f"{page.name}:{line}", "exec")
        if any(marker in code for marker in NOT_RUN):
            compiled_only.append(line)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a one-epoch run warns about its own shortness
            exec(compiled, namespace)  # noqa: S102 - the repository's own documentation
        ran.append(line)
    # every block ran to its end, except those NOT_RUN names (compiled only, with the reason there)
    assert sorted(ran + compiled_only) == [line for line, _ in _blocks(page)]
    assert ran or compiled_only, f"{page.name} holds no python block"


@pytest.mark.parametrize("layout", ["lenet300", "cnn", "users_sequential"])
def test_readme_deploy_example_keeps_the_output_layer_whole_for_any_layout(layout, tmp_path, monkeypatch):
    """README's channel-pruning example excludes the output layer by position, so no class is pruned whatever the
    classifier is called (``net.3`` in the CNN, ``net.5`` in LeNet-300-100 and in a user's ``Sequential``)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pytorch_lightning, "Trainer", _small_trainer)
    namespace = _user_namespace()
    if layout == "cnn":
        namespace["model"] = Classifier(arch="cnn", input_shape=(1, 8, 8))
    elif layout == "users_sequential":
        class UserNet(pytorch_lightning.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                               torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))  # fmt: skip

            def forward(self, x):
                return self.net(x)

            def training_step(self, batch, batch_idx):
                return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05)

        namespace["model"] = UserNet()
    (_, code), *_ = [(line, code) for line, code in _blocks(ROOT / "README.md") if "granularity=\"channel\"" in code]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    output = [p for n, p in namespace["model"].named_parameters() if p.dim() > 1][-1]
    assert bool((output.detach().abs().sum(dim=1) > 0).all()), "an output class was pruned"
    assert not [w for w in caught if "reaches the model's output" in str(w.message)]


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    api = (site / "reference" / "callbacks" / "index.html").read_text()
    assert "GradualMagnitudePruning" in api and "sparsity" in api  # the reference is rendered from docstrings
    pages = {path: path.read_text() for path in site.rglob("*.html")}
    roles = {str(p.relative_to(site)): m.group(0) for p, text in pages.items()
             if (m := re.search(r":(mod|class|func|meth|data|attr|exc):", text))}  # fmt: skip
    assert not roles, f"raw Sphinx roles in the rendered pages: {roles}"
    gmp = (site / "methods" / "gmp" / "index.html").read_text()
    assert 'class="arithmatex"' in gmp and "mathjax" in gmp.lower()  # formulas are set by MathJax
