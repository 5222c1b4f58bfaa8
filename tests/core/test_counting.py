"""One zero counter (``core.counting.count_zeros``): every global sparsity in the package is its ``zeros / total``,
a tied tensor counted once; and GMP logs its schedule's target under ``gmp/``."""

import csv
import io
from pathlib import Path

import pytest
import torch
from pytorch_lightning.loggers import CSVLogger
from rich.console import Console

from lightning_sparse import GradualMagnitudePruning, report
from lightning_sparse.core import count_zeros, global_sparsity, zero_fraction
from lightning_sparse.core.schedules import sparsity_at
from lightning_sparse.core.targets import model_sparsity, weight_matrices
from lightning_sparse.models import GPT
from lightning_sparse.sweep.metrics import measure


def tied_gpt() -> GPT:
    """nanoGPT's decoder, whose head and token embedding are one tensor, with a known share of exact zeros."""
    torch.manual_seed(0)
    model = GPT(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0, bias=False)
    with torch.no_grad():
        for param in model.parameters():
            param[torch.rand(param.shape) < 0.5] = 0
    return model


def by_hand(tensors) -> tuple[int, int]:
    return sum(int((t == 0).sum()) for t in tensors), sum(t.numel() for t in tensors)


def test_a_tied_tensor_is_counted_once_however_many_names_reach_it():
    model = tied_gpt()
    every_name = dict(model.named_parameters(remove_duplicate=False))
    assert every_name["lm_head.weight"] is every_name["transformer.wte.weight"]
    distinct = list(model.parameters())  # one entry per tensor
    assert count_zeros(every_name) == by_hand(distinct) != by_hand(every_name.values())
    assert count_zeros([p.detach() for p in every_name.values()]) == by_hand(distinct)  # detach views the same memory
    halves = [model.lm_head.weight[:8], model.lm_head.weight[8:]]  # different views of one tensor are different
    assert count_zeros(halves) == by_hand(halves)
    assert global_sparsity([]) == 0.0


def test_global_sparsity_is_zeros_over_entries_of_the_distinct_tensors_from_a_mapping_or_an_iterable():
    model = tied_gpt()
    every_name = dict(model.named_parameters(remove_duplicate=False))
    zeros, total = by_hand(list(model.parameters()))
    assert global_sparsity(every_name) == global_sparsity(every_name.values()) == pytest.approx(zeros / total)
    assert global_sparsity(p for p in every_name.values()) == pytest.approx(zeros / total)  # a generator is read once
    assert global_sparsity([torch.zeros(3), torch.ones(1)]) == 0.75


def test_zero_fraction_is_the_ratio_and_refuses_impossible_counts():
    assert zero_fraction(3, 4) == 0.75 and zero_fraction(0, 0) == 0.0
    for zeros, total in ((5, 4), (-1, 4), (True, 4)):
        with pytest.raises(ValueError, match="`zeros` and `total` must be ints with 0 <= zeros <= total"):
            zero_fraction(zeros, total)


def test_the_reports_global_row_is_core_global_sparsity(tmp_path):
    model = tied_gpt()
    matrices = {n: p for n, p in model.named_parameters(remove_duplicate=False) if p.ndim >= 2}
    console = Console(file=io.StringIO(), width=200)
    console.print(report.sparsity_table(report.stats_from_tensors(matrices)))
    global_row = [cell for cell in next(line for line in console.file.getvalue().splitlines() if "global" in line).split() if cell != "│"]
    zeros, total = count_zeros(matrices)  # the tied head is not counted twice
    assert global_row[-3:] == [f"{total:,}", f"{total - zeros:,}", f"{global_sparsity(matrices):.2%}"]


def test_count_zeros_refuses_what_is_not_a_tensor():
    with pytest.raises(TypeError, match="count_zeros takes tensors, got list"):
        count_zeros([[0.0, 1.0]])


def test_report_of_a_saved_state_dict_counts_the_tied_tensor_once(tmp_path):
    model = tied_gpt()
    torch.save(model.state_dict(), tmp_path / "state.pt")  # both names saved, one storage
    stats = report.checkpoint_stats(tmp_path / "state.pt")
    rows = {s.name: s for s in stats}
    assert rows["lm_head.weight"].tied_to == "transformer.wte.weight" and rows["transformer.wte.weight"].tied_to is None
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    zeros, total = by_hand(matrices)
    assert zero_fraction(*report.global_counts(stats)) == pytest.approx(zeros / total)
    assert model_sparsity(weight_matrices(model)) == pytest.approx(zeros / total)


def test_sweep_report_and_engine_agree_on_a_pruned_digits_model(digits_model, make_trainer, tmp_path, digits):
    model = digits_model()
    callback = GradualMagnitudePruning(sparsity=0.7, start=0, end=0.5, frequency=5, verbose=False)
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, digits)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    weights = [p for n, p in model.named_parameters() if n in callback.masks]
    zeros, total = by_hand(weights)
    assert zeros / total == pytest.approx(0.7, abs=0.01)
    assert measure(model)["sparsity"] == pytest.approx(zeros / total)
    assert zero_fraction(*report.global_counts(report.checkpoint_stats(tmp_path / "state.pt"))) == pytest.approx(zeros / total)
    assert callback.masks.sparsity() == pytest.approx(zeros / total)


def _rows(log_dir: Path, column: str) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get(column)]


def test_gmp_logs_the_schedules_target_under_gmp_and_keeps_the_sparsity_names(digits_model, make_trainer, tmp_path, digits):
    callback = GradualMagnitudePruning(sparsity=0.8, start=0, end=0.5, frequency=5, verbose=False)
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [callback], logger=logger, max_epochs=1)
    trainer.fit(digits_model(), digits)
    rows = _rows(Path(logger.log_dir), "gmp/target_sparsity")
    end = callback.pruner.schedule.end_step
    assert [int(r["step"]) for r in rows] == sorted({*range(0, end, 5), end})  # every 5 steps, and at `end`
    for row in rows:
        expected = sparsity_at(int(row["step"]), 0, end, 0.0, 0.8, "cubic", 3.0)
        assert float(row["gmp/target_sparsity"]) == pytest.approx(expected)
        assert float(row["sparsity/global"]) == pytest.approx(expected, abs=0.01)  # the masks follow the target
        assert row["sparsity/model"] and all(row[f"sparsity/{name}"] for name in callback.masks)
    assert float(rows[-1]["gmp/target_sparsity"]) == pytest.approx(0.8)


def test_gmp_with_per_layer_targets_logs_each_layers_target(digits_model, make_trainer, tmp_path, digits):
    callback = GradualMagnitudePruning(sparsity={"net.1.*": 0.9, "net.3.*": 0.5}, start=0, end=0.5, frequency=5, verbose=False)
    logger = CSVLogger(tmp_path)
    make_trainer(tmp_path, [callback], logger=logger, max_epochs=1).fit(digits_model(), digits)
    last = _rows(Path(logger.log_dir), "gmp/target_sparsity")[-1]
    assert float(last["gmp/target_sparsity/net.1.weight"]) == pytest.approx(0.9)
    assert float(last["gmp/target_sparsity/net.3.weight"]) == pytest.approx(0.5)
    sizes = {n: callback.masks.numel(n) for n in ("net.1.weight", "net.3.weight")}
    mean = (0.9 * sizes["net.1.weight"] + 0.5 * sizes["net.3.weight"]) / sum(sizes.values())
    assert float(last["gmp/target_sparsity"]) == pytest.approx(mean)
