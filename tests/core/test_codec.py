"""``core/codec.py`` directly: every tensor comes back bit for bit, and the encoding chosen is the smallest of those
the format defines (checked against each candidate's own size), on weights of a model trained on real digits."""

import math

import pytest
import torch

from lightning_sparse.core import codec
from lightning_sparse.core.allocation import round_half_up

INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _round_trip(tensor: torch.Tensor) -> tuple[codec.Encoded, torch.Tensor]:
    encoded = codec.encode(tensor)
    entry = encoded.entry()
    back = codec.decode(encoded.payload, tensor.dtype, tensor.shape, entry["encoding"], entry["params"], entry["streams"])
    return encoded, back


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    view = INT_VIEW[a.element_size()]
    return torch.equal(a.reshape(-1).view(view), b.reshape(-1).view(view))


@pytest.fixture(scope="module")
def trained_weight(data):
    """The first Linear weight of a LeNet-300-100 trained for a few hundred steps on digits (real weights)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = data.splits["train"].tensors
    for step in range(200):
        batch = slice(64 * step % (len(x) - 64), 64 * step % (len(x) - 64) + 64)
        loss = torch.nn.functional.cross_entropy(model(x[batch].float()), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model[1].weight.detach().clone()


def _prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = round_half_up(sparsity * weight.numel())
    threshold = weight.abs().reshape(-1).kthvalue(k).values
    return torch.where(weight.abs() > threshold, weight, torch.zeros_like(weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_pruned_and_quantized_weights_round_trip_bit_exact_as_a_codebook(trained_weight, dtype):
    pruned = _prune(trained_weight, 0.9)
    levels = torch.linspace(pruned.min(), pruned.max(), 16)
    quantized = torch.where(pruned == 0, pruned, levels[(pruned.unsqueeze(-1) - levels).abs().argmin(-1)]).to(dtype)
    encoded, back = _round_trip(quantized)
    assert _same_bits(quantized, back)
    distinct = int(torch.unique(quantized[quantized != 0]).numel())
    assert encoded.distinct == distinct and encoded.sparsity == pytest.approx(0.9, abs=1e-3)
    assert len(encoded.payload) < quantized.numel() * quantized.element_size() / 5
    if dtype == torch.float32:  # 4-bit codes beat 4-byte values (in 16-bit dtypes compressed values may win)
        assert encoded.encoding == "sparse-codebook" and encoded.params["bits"] == math.ceil(math.log2(distinct))


def test_pruned_unquantized_weights_store_their_values_beside_the_pattern(trained_weight):
    pruned = _prune(trained_weight, 0.9)
    encoded, back = _round_trip(pruned)
    assert _same_bits(pruned, back)
    assert encoded.encoding == "sparse"
    nonzeros = int((pruned != 0).sum())
    values = next(s for s in encoded.streams if s.name == "values")
    assert values.size == nonzeros * 4  # the non-zero float32 values themselves


def test_a_dense_trained_weight_is_stored_raw(trained_weight):
    encoded, back = _round_trip(trained_weight)
    assert encoded.encoding == "raw" and _same_bits(trained_weight, back)
    assert len(encoded.payload) == trained_weight.numel() * 4


def test_the_chosen_encoding_is_the_cheapest_candidate(trained_weight):
    for sparsity in (0.0, 0.5, 0.9, 0.99):
        tensor = _prune(trained_weight, sparsity) if sparsity else trained_weight
        chosen = codec.encode(tensor)
        bits = tensor.reshape(-1).view(torch.int32)
        nonzero = bits != 0
        values = bits[nonzero]
        codebook, codes = torch.unique(values, return_inverse=True)
        candidates = codec._sparse_candidates(bits, nonzero, values, codebook, codes, codec._negative_zero(tensor.dtype))
        raw = codec.Encoded("raw", [codec._stream("data", codec._bytes_of(tensor), compress=False)])
        assert chosen.cost() == min(c.cost() for c in [raw, *candidates]), sparsity


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor([0.0, -0.0, 1.5, -0.0, float("inf"), float("-inf"), 0.0, 2.0]),
        torch.tensor([float("nan"), 0.0, 0.0, 0.0]).repeat(64),
        torch.tensor([1, 0, 0, 3], dtype=torch.int64).repeat(100),
        torch.tensor(3.25),
        torch.zeros(0, 5),
        torch.zeros(300, 7),
        torch.full((1000,), -0.0),
    ],
    ids=["signed-zeros-inf", "nan", "int64", "0-d", "empty", "all-zero", "all-negative-zero"],
)
def test_special_values_round_trip_bit_exact(tensor):
    _, back = _round_trip(tensor)
    assert _same_bits(tensor, back)


def test_a_nan_payload_comes_back_bit_for_bit():
    bits = torch.tensor([0x7FC00001, 0, 0, 0x7F800002, 0, 0, 0, 0] * 32, dtype=torch.int32)
    tensor = bits.view(torch.float32)
    _, back = _round_trip(tensor)
    assert torch.equal(back.view(torch.int32), bits)


def test_a_truncated_stream_is_refused(trained_weight):
    encoded = codec.encode(_prune(trained_weight, 0.9))
    entry = encoded.entry()
    with pytest.raises(ValueError):
        codec.decode(encoded.payload[:-7], torch.float32, trained_weight.shape, entry["encoding"], entry["params"],
                     [{**s, "length": s["length"] - 7} if i == len(entry["streams"]) - 1 else s
                      for i, s in enumerate(entry["streams"])])  # fmt: skip
