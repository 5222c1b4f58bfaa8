"""The compressed export: bit-exact round trips, size on a pruned + quantized LeNet-300-100, safe failures."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from support import digits_model, make_trainer
from lightning_sparse.cli import main
from lightning_sparse.core.masks import MaskSet
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.export import FORMAT_VERSION, iter_compressed, load_compressed, save_compressed

CLI = str(Path(sys.executable).with_name("lightning-sparse"))
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so -0.0 differs from 0.0 and NaN payloads compare equal to themselves."""
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if tensor.dtype == torch.bool else flat.view(_INT[tensor.element_size()])


def assert_bitwise_equal(loaded: dict, original: dict) -> None:
    assert list(loaded) == list(original)
    for name, tensor in original.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(bits(loaded[name]), bits(tensor)), name


def prune_and_quantize_(model: nn.Module, sparsity: float = 0.9, levels: int = 16) -> None:
    """Zero the smallest ``sparsity`` of each weight by magnitude, snap the rest to ``levels`` values."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("weight"):
                threshold = weight.abs().flatten().kthvalue(int(sparsity * weight.numel())).values
                weight.masked_fill_(weight.abs() <= threshold, 0.0)
                kept = weight[weight != 0]
                codebook = torch.quantile(kept, torch.linspace(0, 1, levels))
                snapped = codebook[(weight.unsqueeze(-1) - codebook).abs().argmin(dim=-1)]
                weight.copy_(torch.where(weight != 0, snapped, weight))


def logits_on_test_set(model: nn.Module, datamodule: DigitsDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        batches = [(model(x), y) for x, y in datamodule.test_dataloader()]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """LeNet-300-100 trained for 4 epochs on real digits, its trainer (for checkpoints) and data."""
    pl.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64)
    model = digits_model()
    trainer = make_trainer(tmp_path_factory.mktemp("train"))
    trainer.fit(model, datamodule=datamodule)
    datamodule.setup("test")
    return model, trainer, datamodule


@pytest.fixture(scope="module")
def compressed_model(trained):
    model = copy.deepcopy(trained[0])
    prune_and_quantize_(model)
    return model


def test_pruned_quantized_lenet_round_trips_bitwise(compressed_model, tmp_path):
    path = tmp_path / "lenet.lsp"
    report = save_compressed(compressed_model, path, verbose=False)
    assert_bitwise_equal(load_compressed(path), compressed_model.state_dict())
    encodings = {layer.name: layer.encoding for layer in report.layers}
    assert encodings["net.1.weight"] == encodings["net.3.weight"] == "sparse-codebook"
    assert {layer.distinct for layer in report.layers if layer.name.endswith("weight")} == {16}


def test_loaded_model_reproduces_logits_and_accuracy(digits_model, trained, compressed_model, tmp_path):
    path = tmp_path / "lenet.lsp"
    save_compressed(compressed_model, path, verbose=False)
    loaded = digits_model()
    loaded.load_state_dict(load_compressed(path))
    expected, labels = logits_on_test_set(compressed_model, trained[2])
    actual, _ = logits_on_test_set(loaded, trained[2])
    assert torch.equal(actual, expected)
    accuracy = (actual.argmax(1) == labels).float().mean().item()
    assert accuracy == (expected.argmax(1) == labels).float().mean().item()
    assert accuracy > 0.85  # a working classifier, not a degenerate one (measured 0.914)


def test_ratio_for_90_percent_sparse_4_bit_lenet(compressed_model, tmp_path, capsys):
    path = tmp_path / "lenet.lsp"
    report = save_compressed(compressed_model, path)
    assert report.file_bytes == path.stat().st_size
    assert report.fp32_bytes == 4 * sum(t.numel() for t in compressed_model.state_dict().values())
    assert report.ratio == report.fp32_bytes / report.file_bytes
    assert report.ratio >= 18.0  # measured 21.9× (weights ≈ 18×, biases stay raw)
    printed = capsys.readouterr().out
    for text in ("net.3.weight", "sparse-codebook", "90.00%", "whole file", f"{report.ratio:.1f}×"):
        assert text in printed
    assert "no compressed layers" not in printed


def test_pruned_weights_are_positive_zeros_and_negative_zeros_still_round_trip(trained, tmp_path):
    model = copy.deepcopy(trained[0])
    weights = {name: p for name, p in model.named_parameters() if name.endswith("weight")}
    masks = MaskSet(weights)
    for name, weight in weights.items():
        masks.set(name, weight.detach().abs() > weight.detach().abs().median())
    masks.apply_()
    assert not any(bool((bits(w) == torch.iinfo(torch.int32).min).any()) for w in weights.values())  # +0.0 only
    with torch.no_grad():  # a product by a 0/1 mask (as other tools do) leaves -0.0 where weights were negative
        weights["net.3.weight"].mul_((weights["net.3.weight"].abs() > 0.02).float())
        weights["net.3.weight"].mul_((torch.arange(weights["net.3.weight"].numel()) % 3 != 0).float().view_as(weights["net.3.weight"]))
    negative_zeros = bits(weights["net.3.weight"]) == torch.iinfo(torch.int32).min
    assert 0 < int(negative_zeros.sum()) < weights["net.3.weight"].numel()
    report = save_compressed(model, tmp_path / "masked.lsp", verbose=False)
    assert_bitwise_equal(load_compressed(tmp_path / "masked.lsp"), model.state_dict())
    assert all(layer.encoding != "raw" for layer in report.layers if layer.name.endswith("weight"))


def test_batchnorm_buffers_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup("fit")
    for x, _ in list(datamodule.train_dataloader())[:3]:
        model(x)  # train mode: running statistics and num_batches_tracked move
    state = model.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64 and int(state["1.num_batches_tracked"]) == 3
    report = save_compressed(model, tmp_path / "bn.lsp", verbose=False)
    assert_bitwise_equal(load_compressed(tmp_path / "bn.lsp"), state)
    assert {layer.name: layer.encoding for layer in report.layers}["1.num_batches_tracked"] == "raw"


def test_dense_model_is_stored_raw_and_says_so(trained, tmp_path, capsys):
    state = trained[0].state_dict()
    report = save_compressed(state, tmp_path / "dense.lsp")
    assert_bitwise_equal(load_compressed(tmp_path / "dense.lsp"), state)
    assert [layer.encoding for layer in report.layers] == ["raw"] * len(state)
    assert report.compressed_layers == []
    assert 0.95 < report.ratio < 1.0  # the header is the only overhead
    assert "The model has no compressed layers" in capsys.readouterr().out


def test_half_precision_and_special_values_round_trip(compressed_model, tmp_path):
    weight = compressed_model.state_dict()["net.3.weight"]
    special = weight.clone()
    flat = special.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, -float("nan")])
    bits(special)[6] = 0x7FC00001  # a NaN with another payload
    state = {
        "fp16": weight.half(),
        "bf16": weight.bfloat16(),
        "fp64": weight.double(),
        "special": special,
        "special_fp16": special.half(),
        "special_bf16": special.bfloat16(),
    }
    report = save_compressed(state, tmp_path / "mixed.lsp", verbose=False)
    assert_bitwise_equal(load_compressed(tmp_path / "mixed.lsp"), state)
    encodings = {layer.name: layer.encoding for layer in report.layers}
    assert encodings["fp16"] == encodings["bf16"] == encodings["fp64"] == "sparse-codebook"
    # whichever encoding measured smallest, the special values went through a compressed one: here both kinds
    assert {encodings[name] for name in ("special", "special_fp16", "special_bf16")} == {"sparse", "sparse-codebook"}


def test_empty_and_zero_dim_tensors_round_trip(tmp_path):
    state = {
        "empty": torch.empty(0, 4),
        "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.25),
        "negative_zero": torch.tensor(-0.0),
        "count": torch.tensor(7),
        "flags": torch.tensor([True, False, True]),
    }
    report = save_compressed(state, tmp_path / "odd.lsp", verbose=False)
    assert_bitwise_equal(load_compressed(tmp_path / "odd.lsp"), state)
    assert {layer.encoding for layer in report.layers} == {"raw"}


def payload_start(report) -> int:
    """Where the first layer's bytes begin: payloads fill the end of the file, back to back, in order."""
    return report.file_bytes - sum(layer.stored_bytes for layer in report.layers)


def test_iter_compressed_reads_one_layer_at_a_time(compressed_model, tmp_path):
    path = tmp_path / "lenet.lsp"
    report = save_compressed(compressed_model, path, verbose=False)
    first, second = report.layers[:2]
    path.write_bytes(path.read_bytes()[: payload_start(report) + first.stored_bytes])
    layers = iter_compressed(path)
    name, tensor = next(layers)
    assert name == first.name and torch.equal(bits(tensor), bits(compressed_model.state_dict()[first.name]))
    with pytest.raises(ValueError, match=rf"layer '{second.name}' is missing bytes"):
        next(layers)


def test_corrupted_byte_names_the_layer(compressed_model, tmp_path):
    path = tmp_path / "lenet.lsp"
    report = save_compressed(compressed_model, path, verbose=False)
    data = bytearray(path.read_bytes())
    victim = report.layers[2]  # net.3.weight
    victim_start = payload_start(report) + sum(layer.stored_bytes for layer in report.layers[:2])
    data[victim_start + victim.stored_bytes // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"layer '{victim.name}' is corrupt"):
        load_compressed(path)


def test_truncated_file_names_the_missing_layer(compressed_model, tmp_path):
    path = tmp_path / "lenet.lsp"
    report = save_compressed(compressed_model, path, verbose=False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=rf"layer '{report.layers[-1].name}' is missing bytes: the file is truncated"):
        load_compressed(path)


def test_a_checkpoint_is_not_a_compressed_file(trained, tmp_path):
    trained[1].save_checkpoint(tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="is not a lightning_sparse compressed file"):
        load_compressed(tmp_path / "model.ckpt")


def test_newer_format_version_is_refused(compressed_model, tmp_path):
    path = tmp_path / "lenet.lsp"
    save_compressed(compressed_model, path, verbose=False)
    data = bytearray(path.read_bytes())
    data[8:10] = (FORMAT_VERSION + 1).to_bytes(2, "little")  # the version follows the 8-byte magic
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"format version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}"):
        load_compressed(path)


def test_corrupt_header_is_refused(compressed_model, tmp_path):
    path = tmp_path / "lenet.lsp"
    save_compressed(compressed_model, path, verbose=False)
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="header is corrupt"):
        load_compressed(path)


def test_save_from_a_lightning_checkpoint(trained, tmp_path):
    model, trainer, _ = trained
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    save_compressed(tmp_path / "model.ckpt", tmp_path / "model.lsp", verbose=False)
    assert_bitwise_equal(load_compressed(str(tmp_path / "model.lsp")), model.state_dict())


def test_failed_save_keeps_the_previous_file(compressed_model, tmp_path):
    path = tmp_path / "lenet.lsp"
    save_compressed(compressed_model, path, verbose=False)
    before = path.read_bytes()
    state = dict(compressed_model.state_dict())
    state["net.3.extra"] = "not a tensor"  # after some layers have been encoded
    with pytest.raises(TypeError, match="layer 'net.3.extra': expected a tensor, got str"):
        save_compressed(state, path, verbose=False)
    with pytest.raises(TypeError, match="layer 'sparse'"):
        save_compressed({"ok": torch.ones(3), "sparse": torch.eye(3).to_sparse()}, path, verbose=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.lsp"]  # no temporary file left behind


def test_cli_export_prints_the_table_and_writes_a_loadable_file(trained, tmp_path):
    model, trainer, _ = trained
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    command = [CLI, "export", str(tmp_path / "model.ckpt"), str(tmp_path / "model.lsp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "net.1.weight" in result.stdout and "whole file" in result.stdout and "fp32 bytes" in result.stdout
    assert_bitwise_equal(load_compressed(tmp_path / "model.lsp"), model.state_dict())



def test_cli_export_of_a_missing_checkpoint_fails_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # in-process: the same argparse path, without a second start-up
        main(["export", str(tmp_path / "nope.ckpt"), str(tmp_path / "out.lsp")])
    assert exit_info.value.code != 0
    assert "nope.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "out.lsp").exists()
