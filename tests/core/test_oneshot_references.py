"""One-shot criteria against faithful ports of the references (kept here, small shapes, fp32):

- Wanda: ``locuslab/wanda`` ``lib/layerwrapper.py`` (``WrappedGPT.add_batch``) and ``lib/prune.py`` (``prune_wanda``);
- SparseGPT: ``IST-DASLab/sparsegpt`` ``sparsegpt.py`` (``SparseGPT.add_batch``, ``fasterprune``), the mask recorded;
- OWL: ``luuyin/OWL`` ``lib/prune_all.py`` (``check_outlier_mean``, the ``all_layer_ratio`` lines of ``prune_wanda_outlier``);
- the sequential capture: the references' ``Catcher`` on the first decoder layer, then each layer run on the cached
  inputs, pruned, and run again to give the next layer's inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_sparse.core import MaskSet, select_targets
from lightning_sparse.core.calibration import Layer, calibrate_sequentially, find_blocks, find_layers, ordered_blocks
from lightning_sparse.core.oneshot import outlier_ratio, owl_sparsities, prune_one_shot, sparsegpt_prune, wanda_mask
from lightning_sparse.core.structured import Granularity


# ----------------------------------------------------------------------------- reference ports (verbatim logic)
class WrappedGPT:  # locuslab/wanda lib/layerwrapper.py
    def __init__(self, layer):
        self.layer = layer
        self.rows, self.columns = layer.weight.data.shape
        self.scaler_row = torch.zeros((self.columns))
        self.nsamples = 0

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def reference_wanda_mask(W, scaler_row, sparsity_ratio, prune_n=0, prune_m=0):  # lib/prune.py prune_wanda; True = pruned
    W_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    W_mask = torch.zeros_like(W_metric) == 1
    if prune_n != 0:
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii : (ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        indices = sort_res[1][:, : int(W_metric.shape[1] * sparsity_ratio)]
        W_mask.scatter_(1, indices, True)
    return W_mask


class SparseGPT:  # IST-DASLab/sparsegpt sparsegpt.py (nn.Linear path, no quantizer), pruned mask recorded
    def __init__(self, layer):
        self.layer = layer
        W = layer.weight.data.clone()
        self.rows, self.columns = W.shape
        self.H = torch.zeros((self.columns, self.columns))
        self.nsamples = 0

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
        W = self.layer.weight.data.clone().float()
        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H
        mask = None
        pruned = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prunen == 0:
                if mask is not None:
                    mask1 = mask[:, i1:i2]
                else:
                    tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                    mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            pruned[:, i1:i2] = mask1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)
        return pruned


def check_outlier_mean(mask, threshold):  # luuyin/OWL lib/prune_all.py
    W = mask
    max_shred = torch.mean(W) * threshold
    count = (W > max_shred).sum().item()
    return float(count) / W.numel() * 100


def reference_owl(all_layer_ratio, sparsity_ratio, Lamda):  # prune_wanda_outlier's adjustment
    all_layer_ratio = np.array(all_layer_ratio)
    all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) * (1 / (all_layer_ratio.max() - all_layer_ratio.min()) * Lamda * 2)
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity_ratio)
    return 1 - all_layer_ratio  # each layer's `layer_sparsity_ratio`


# ----------------------------------------------------------------------------- a small decoder-like model
class Decoder(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        return x + self.down(torch.relu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 20, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Decoder(width) for _ in range(depth))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def calibration(n: int = 6, seq: int = 12, vocab: int = 20):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, seq), generator=gen) for _ in range(n)]


def reference_sequential(model: TinyLM, samples, method: str, sparsity: float, prune_n=0, prune_m=0):
    """The references' loop over ``model.layers`` (prune_wanda / prune_sparsegpt), recording each sublayer's inputs."""
    inps = []

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps.append(inp)
            raise ValueError

    model.layers[0] = Catcher(model.layers[0])
    for batch in samples:
        try:
            model(batch)
        except ValueError:
            pass
    model.layers[0] = model.layers[0].module
    inps = torch.cat(inps)
    outs = torch.zeros_like(inps)
    seen = {}
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            subset = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
            wrapped = {name: (WrappedGPT if method == "wanda" else SparseGPT)(subset[name]) for name in subset}

            def add_batch(name):
                def tmp(_, inp, out):
                    wrapped[name].add_batch(inp[0].data, out.data)
                    seen.setdefault(f"layers.{i}.{name}.weight", []).append(inp[0].data.clone())
                return tmp

            handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped]
            for j in range(len(inps)):
                outs[j] = layer(inps[j].unsqueeze(0))[0]
            for h in handles:
                h.remove()
            for name in subset:
                if method == "wanda":
                    W_mask = reference_wanda_mask(subset[name].weight.data, wrapped[name].scaler_row, sparsity, prune_n, prune_m)
                    subset[name].weight.data[W_mask] = 0
                else:
                    wrapped[name].fasterprune(sparsity, prune_n, prune_m)
            for j in range(len(inps)):
                outs[j] = layer(inps[j].unsqueeze(0))[0]
            inps, outs = outs, inps
    return seen


# ----------------------------------------------------------------------------- Wanda
def _inputs(rows: int, columns: int, samples: int = 5, seq: int = 7):
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(columns, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, columns, generator=gen))
    scale = torch.rand(columns, generator=gen) * 3  # uneven input norms, so Wanda differs from magnitude
    return layer, [torch.randn(1, seq, columns, generator=gen) * scale for _ in range(samples)]


@pytest.mark.parametrize("sparsity, nm", [(0.5, None), (0.75, None), (0.5, (2, 4)), (0.25, (3, 4)), (0.5, (4, 8))])
def test_wanda_mask_equals_the_reference(sparsity, nm):
    layer, xs = _inputs(12, 32)
    wrapper = WrappedGPT(layer)
    sums = torch.zeros(32)
    for x in xs:
        wrapper.add_batch(x, None)
        sums += x.reshape(-1, 32).pow(2).sum(0)
    n, m = nm or (0, 0)
    reference = reference_wanda_mask(layer.weight.data, wrapper.scaler_row, sparsity, m - n if nm else 0, m)
    ours = wanda_mask(layer.weight.data, sums, sparsity, n, m)
    assert torch.equal(ours, ~reference)
    # Wanda is not magnitude here: the input norms changed the ranking
    assert not torch.equal(ours, wanda_mask(layer.weight.data, torch.ones(32), sparsity, n, m))


# ----------------------------------------------------------------------------- SparseGPT
@pytest.mark.parametrize("sparsity, nm, dead", [(0.5, None, False), (0.6, None, True), (0.5, (2, 4), False), (0.75, (1, 4), True)])
def test_sparsegpt_masks_and_weights_equal_fasterprune(sparsity, nm, dead):
    rows, columns = 10, 256  # two column blocks of 128
    layer, xs = _inputs(rows, columns, samples=8, seq=40)
    if dead:
        xs = [x.index_fill(-1, torch.tensor([3, 200]), 0.0) for x in xs]  # inputs that are always 0: H_jj = 0
    reference = SparseGPT(layer)
    for x in xs:
        reference.add_batch(x, None)
    H = reference.H.clone()
    W = layer.weight.data.clone()
    n, m = nm or (0, 0)
    if nm:
        pruned = reference.fasterprune(sparsity, m - n, m)
    else:
        # the reference prunes every score <= the one at index int(s * numel) of the block, i.e. one more than that
        # index; asking it for (k - 0.5) / numel makes it prune exactly the k = round(s * numel) we prune
        k = round(sparsity * rows * 128)
        pruned = reference.fasterprune((k - 0.5) / (rows * 128))
    updated, mask = sparsegpt_prune(W, H, sparsity, n, m)
    assert torch.equal(mask, ~pruned)
    assert torch.allclose(updated, layer.weight.data, atol=1e-5, rtol=0)
    assert not torch.allclose(updated, W * mask)  # the kept weights were updated, not just masked
    assert (updated[~mask] == 0).all()
    assert int((~mask).sum()) == round(sparsity * rows * columns)


def test_sparsegpt_refuses_a_singular_hessian_naming_the_layer():
    x = torch.tensor([[2.0, 1.0], [-2.0, -1.0]])  # input 1 is half of input 0 in every token: XᵀX is singular
    H = x.t() @ x  # exactly [[8, 4], [4, 2]]
    with pytest.raises(ValueError, match=r"'blocks\.0\.up\.weight'.*not positive definite.*dampening"):
        sparsegpt_prune(torch.randn(3, 2), H, 0.5, dampening=0.0, name="blocks.0.up.weight")
    updated, _ = sparsegpt_prune(torch.randn(3, 2), H, 0.5, dampening=0.01)  # damping makes it definite
    assert torch.isfinite(updated).all()


def test_nm_that_does_not_divide_the_inputs_is_refused_naming_the_layer():
    with pytest.raises(ValueError, match=r"'fc\.weight'.*M=4.*10 inputs"):
        wanda_mask(torch.randn(3, 10), torch.ones(10), 0.5, 2, 4, name="fc.weight")
    with pytest.raises(ValueError, match=r"'fc\.weight'.*M=4.*10 inputs"):
        sparsegpt_prune(torch.randn(3, 10), torch.eye(10), 0.5, 2, 4, name="fc.weight")


# ----------------------------------------------------------------------------- OWL
def test_owl_sparsities_equal_the_papers_formula():
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        ratios = (torch.rand(8, generator=gen) * 10).tolist()
        ours = owl_sparsities(ratios, 0.7, 0.08)
        assert np.allclose(ours, reference_owl(ratios, 0.7, 0.08), atol=1e-12)
        assert abs(np.mean(ours) - 0.7) < 1e-12 and max(ours) - min(ours) == pytest.approx(0.16)
    assert owl_sparsities([2.0, 2.0, 2.0], 0.5) == [0.5, 0.5, 0.5]  # no spread: uniform


def test_outlier_ratio_equals_the_reference():
    gen = torch.Generator().manual_seed(2)
    scores = [torch.rand(8, 16, generator=gen) ** 6, torch.rand(4, 8, generator=gen) ** 6]
    flat = torch.cat([s.flatten() for s in scores])
    assert outlier_ratio(scores, 5.0) == pytest.approx(check_outlier_mean(flat, 5.0) / 100, abs=1e-9)
    assert outlier_ratio(scores, 5.0) > 0


# ----------------------------------------------------------------------------- sequential capture
def _twin_models():
    torch.manual_seed(0)
    ours = TinyLM()
    reference = TinyLM()
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def test_blocks_are_the_module_list_entries_and_the_head_its_own():
    model = TinyLM()
    targets = select_targets(model)
    blocks = find_blocks(model, find_layers(model, targets))
    assert list(blocks)[:3] == ["layers.0", "layers.1", "layers.2"]
    assert blocks["layers.1"] == ["layers.1.mix.weight", "layers.1.up.weight", "layers.1.down.weight"]
    assert blocks["head.weight"] == ["head.weight"]


def test_sequential_capture_equals_the_references_layer_inputs():
    ours, reference = _twin_models()
    samples = calibration()
    seen = reference_sequential(reference, samples, "wanda", 0.5)
    targets = select_targets(ours, exclude="head.weight")
    masks = MaskSet(targets)
    layers = find_layers(ours, targets)
    order = ordered_blocks(ours, layers, ours, samples[0])
    assert list(order.blocks) == ["layers.0", "layers.1", "layers.2"]
    compared = []

    def prune_block(block, stats):
        for name in order.blocks[block]:
            x = torch.cat(seen[name]).reshape(-1, layers[name].inputs())
            assert torch.allclose(stats[name].hessian, 2 * x.t() @ x / x.shape[0], atol=1e-5), name
            compared.append(name)
            masks.set(name, wanda_mask(masks.weight(name), stats[name].squared_norms, 0.5))

    with torch.no_grad():
        calibrate_sequentially(order, layers, "hessian", samples, ours, prune_block)
    assert compared == list(targets)  # every layer, each after the blocks before it were pruned
    for name in targets:
        assert torch.equal(ours.get_parameter(name) == 0, reference.get_parameter(name) == 0), name


@pytest.mark.parametrize("method, nm", [("wanda", None), ("wanda", (2, 4)), ("sparsegpt", None), ("sparsegpt", (2, 4))])
def test_prune_one_shot_equals_the_references_sequential_pruning(method, nm):
    ours, reference = _twin_models()
    samples = calibration()
    n, m = nm or (0, 0)
    # the reference's `<=` threshold prunes one more per block than int(s·numel): ask it for just under our count
    sparsity = 0.5 if method == "wanda" or nm else 0.5 - 1 / 1024  # blocks of 256 and 512 weights
    reference_sequential(reference, samples, method, sparsity, m - n if nm else 0, m)
    targets = select_targets(ours, exclude="head.weight")
    masks = MaskSet(targets)
    granularity = {name: Granularity("nm", n, m) for name in targets} if nm else {}
    prune_one_shot(ours, masks, samples, ours, method, 0.5, granularity)
    for name in targets:
        w_ours, w_ref = ours.get_parameter(name), reference.get_parameter(name)
        assert torch.equal(w_ours == 0, w_ref == 0), name
        assert torch.allclose(w_ours, w_ref, atol=1e-5), name
        assert masks.sparsity(name) == pytest.approx(0.5)


def test_a_layer_the_forward_never_calls_is_named():
    model = TinyLM()
    model.unused = nn.Linear(16, 16)
    targets = select_targets(model)
    with pytest.raises(ValueError, match=r"never calls.*'unused\.weight'"):
        prune_one_shot(model, MaskSet(targets), calibration(2), model, "wanda", 0.5)


def test_method_zeros_keeps_exactly_the_zeros_the_weights_hold():
    model = TinyLM()
    with torch.no_grad():
        model.layers[0].up.weight[:, ::3] = 0
    targets = select_targets(model)
    masks = MaskSet(targets)
    prune_one_shot(model, masks, [], model, "zeros")
    assert torch.equal(masks.mask("layers.0.up.weight"), model.layers[0].up.weight != 0)
    assert masks.sparsity("layers.1.up.weight") == 0.0


def test_owl_with_magnitude_gives_blocks_with_more_outliers_less_sparsity():
    model = TinyLM()
    with torch.no_grad():
        model.layers[1].up.weight[0, :4] *= 40  # outliers in block 1
    targets = select_targets(model, exclude="head.weight")
    per_layer = prune_one_shot(model, MaskSet(targets), calibration(3), model, "magnitude", 0.5, distribution="owl", owl_spread=0.1)
    block = [per_layer[f"layers.{i}.up.weight"] for i in range(3)]
    assert block[1] == min(block) < 0.5 and max(block) - min(block) <= 0.2 + 1e-9
    assert per_layer["layers.1.mix.weight"] == block[1]  # one sparsity per block
    assert np.mean([per_layer[f"layers.{i}.up.weight"] for i in range(3)]) == pytest.approx(0.5)
    assert isinstance(find_layers(model, targets)["layers.0.up.weight"], Layer)


def reference_owl_wanda(model: TinyLM, samples, sparsity_ratio: float, Lamda: float, Hyper_m: float):
    """``prune_wanda_outlier`` (``luuyin/OWL`` ``lib/prune_all.py``), ported on ``model.layers``: pass 1 runs the dense
    blocks in sequence (nothing pruned), each block's Wanda metrics of all its Linear layers concatenated give its
    ``check_outlier_mean`` ratio; the adjustment gives ``all_layer_ratio``; pass 2 is Wanda's sequential loop with
    ``layer_sparsity_ratio = 1 - all_layer_ratio[i]`` for every Linear of block ``i``. Returns the per-block sparsities."""
    inps = []

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps.append(inp)
            raise ValueError

    model.layers[0] = Catcher(model.layers[0])
    for batch in samples:
        try:
            model(batch)
        except ValueError:
            pass
    model.layers[0] = model.layers[0].module
    first = torch.cat(inps)

    def add_batch(wrapped, name):
        def tmp(_, inp, out):
            wrapped[name].add_batch(inp[0].data, out.data)

        return tmp

    all_layer_ratio = []
    with torch.no_grad():
        inps, outs = first.clone(), torch.zeros_like(first)
        for layer in model.layers:  # pass 1: outlier ratios of the dense model
            subset = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
            wrapped = {name: WrappedGPT(subset[name]) for name in subset}
            handles = [subset[name].register_forward_hook(add_batch(wrapped, name)) for name in wrapped]
            for j in range(len(inps)):
                outs[j] = layer(inps[j].unsqueeze(0))[0]
            for h in handles:
                h.remove()
            layer_wmetric = [torch.abs(subset[n].weight.data) * torch.sqrt(wrapped[n].scaler_row.reshape((1, -1))) for n in subset]
            for j in range(len(inps)):
                outs[j] = layer(inps[j].unsqueeze(0))[0]
            inps, outs = outs, inps
            layer_wmetric = torch.cat([torch.flatten(x.cpu()) for x in layer_wmetric])
            all_layer_ratio.append(check_outlier_mean(layer_wmetric, Hyper_m))
        all_layer_ratio = np.array(all_layer_ratio)
        all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) * (1 / (all_layer_ratio.max() - all_layer_ratio.min()) * Lamda * 2)
        all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity_ratio)
        inps, outs = first.clone(), torch.zeros_like(first)
        for i, layer in enumerate(model.layers):  # pass 2: Wanda, block i at 1 - all_layer_ratio[i]
            subset = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
            wrapped = {name: WrappedGPT(subset[name]) for name in subset}
            handles = [subset[name].register_forward_hook(add_batch(wrapped, name)) for name in wrapped]
            for j in range(len(inps)):
                outs[j] = layer(inps[j].unsqueeze(0))[0]
            for h in handles:
                h.remove()
            for name in subset:
                layer_sparsity_ratio = 1 - all_layer_ratio[i]
                if layer_sparsity_ratio <= 0:
                    layer_sparsity_ratio = 0.01
                W_mask = reference_wanda_mask(subset[name].weight.data, wrapped[name].scaler_row, layer_sparsity_ratio)
                subset[name].weight.data[W_mask] = 0
            for j in range(len(inps)):
                outs[j] = layer(inps[j].unsqueeze(0))[0]
            inps, outs = outs, inps
    return [float(1 - r) for r in all_layer_ratio]


@pytest.mark.parametrize(
    "sparsity, spread, threshold, same_counts",
    [(0.7, 0.08, 5.0, False), (0.5, 0.2, 2.0, False), (0.51, 0.125, 3.0, True), (0.76, 0.0625, 3.0, True)],
)
def test_owl_wanda_equals_the_references_prune_wanda_outlier(sparsity, spread, threshold, same_counts):
    """Whole model: our OWL + Wanda gives the reference's per-block sparsities (outlier ratio per block over all its
    layers' scores, from the dense model's block inputs; every layer of a block at the block's sparsity) and its masks.
    The one difference: the reference prunes ``int(s · columns)`` weights per row, we ``round(s · columns)``, so the
    masks are compared directly where the two agree (``same_counts``: block sparsities whose counts floor and round
    alike), and in every case with our per-layer sparsities given as the reference's counts."""
    ours, reference = _twin_models()
    with torch.no_grad():  # outliers of different strength per block, so the blocks' ratios differ
        for i, layer in enumerate(ours.layers):
            layer.up.weight[: 2 + 3 * i, :3] *= 8
            layer.down.weight[i, :5] *= 6
        reference.load_state_dict(ours.state_dict())
    counted = TinyLM()
    counted.load_state_dict(ours.state_dict())
    samples = calibration()
    expected = reference_owl_wanda(reference, samples, sparsity, spread, threshold)
    assert max(expected) - min(expected) == pytest.approx(2 * spread)  # the ratios differ: a real allocation
    targets = select_targets(ours, exclude="head.weight")
    per_layer = prune_one_shot(ours, MaskSet(targets), samples, ours, "wanda", sparsity, distribution="owl",
                               owl_spread=spread, owl_threshold=threshold)  # fmt: skip
    columns = {name: ours.get_parameter(name).shape[1] for name in targets}
    for name in targets:
        assert per_layer[name] == pytest.approx(expected[int(name.split(".")[1])], abs=1e-12), name
    floors = {name: int(columns[name] * per_layer[name]) for name in targets}
    assert same_counts == all(floors[n] == math.floor(columns[n] * per_layer[n] + 0.5) for n in targets)
    if same_counts:
        for name in targets:
            assert torch.equal(ours.get_parameter(name) == 0, reference.get_parameter(name) == 0), name
    counted_targets = select_targets(counted, exclude="head.weight")
    prune_one_shot(counted, MaskSet(counted_targets), samples, counted, "wanda", {n: floors[n] / columns[n] for n in targets})
    for name in targets:
        assert torch.equal(counted.get_parameter(name) == 0, reference.get_parameter(name) == 0), name
