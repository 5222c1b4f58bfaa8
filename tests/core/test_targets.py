import pytest
import torch
from torch import nn

from lightning_sparse.core.targets import prunable_names, select_targets


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 8, 3)
        self.norm = nn.BatchNorm1d(8)
        self.conv3 = nn.Conv3d(1, 2, 2)
        self.head = nn.Linear(8, 3)


def test_default_targets_are_linear_and_conv_weights_only():
    assert list(select_targets(Mixed())) == ["conv.weight", "conv3.weight", "head.weight"]


def test_include_can_opt_in_embeddings_and_exclude_removes():
    targets = select_targets(Mixed(), include=["embed.*", "*.weight"], exclude=["norm.*", "conv3.*"])
    assert list(targets) == ["embed.weight", "conv.weight", "head.weight"]


def test_tied_weights_are_pruned_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert prunable_names(model) == ["0.weight"]


def test_include_matching_nothing_lists_prunable_names():
    with pytest.raises(ValueError, match=r"`include` pattern 'decoder\.\*' matches no parameter.*head\.weight"):
        select_targets(Mixed(), include=["decoder.*"])


def test_model_with_nothing_to_prune_is_an_error():
    with pytest.raises(ValueError, match="Nothing to prune in Sequential"):
        select_targets(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))
    with pytest.raises(ValueError, match="Nothing to prune"):
        select_targets(Mixed(), exclude=["*"])


def test_targets_are_the_live_parameters():
    model = Mixed()
    targets = select_targets(model)
    assert targets["head.weight"] is model.head.weight
    assert all(isinstance(p, torch.nn.Parameter) for p in targets.values())


# ----------------------------------------------------------------------------- parameters as they really are
from lightning_sparse.core.masks import MaskSet  # noqa: E402
from lightning_sparse.core.pruning import prune_by_magnitude  # noqa: E402
from lightning_sparse.core.structured import expand_granularity, nm_counts  # noqa: E402
from lightning_sparse.core.targets import (  # noqa: E402
    describe_targets,
    format_targets,
    model_sparsity,
    per_layer,
    weight_matrices,
)


class TinyGPT(nn.Module):
    """The shape of a GPT: token + position embeddings, attention, a norm, an MLP and a head tied to the tokens."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.tok = nn.Embedding(20, 8)
        self.pos = nn.Embedding(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.register_buffer("causal", torch.ones(4, 4).tril())
        if tie:
            self.head.weight = self.tok.weight


def test_tied_head_does_not_break_selection_and_attention_is_targeted():
    # Before: KeyError 'head.weight' (named_parameters() yields the tied tensor once, as tok.weight).
    targets = select_targets(TinyGPT())
    assert list(targets) == ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.weight"]


def test_every_alias_of_a_tied_tensor_selects_the_one_tensor():
    model = TinyGPT()
    for pattern in ("head.weight", "tok.weight", "head.*"):
        targets = select_targets(model, include=[pattern])
        assert list(targets) == ["tok.weight"] and targets["tok.weight"] is model.head.weight
        assert targets.label("tok.weight") == "tok.weight (= head.weight)"
    kept = select_targets(model, include=["*weight"], exclude=["head.weight"])  # excluding one name excludes the tensor
    assert "tok.weight" not in kept and "pos.weight" in kept


def test_tied_tensor_given_two_targets_through_its_names_is_an_error():
    targets = select_targets(TinyGPT(), include=["tok.weight", "mlp.weight"])
    with pytest.raises(ValueError, match=r"`sparsity`: 'tok\.weight' and 'head\.weight' are one tied tensor.*0\.5.*0\.9"):
        per_layer("sparsity", {"tok.weight": 0.5, "head.weight": 0.9}, targets)
    assert per_layer("sparsity", {"head.weight": 0.5, "mlp.*": 0.9}, targets) == {"tok.weight": 0.5, "mlp.weight": 0.9}
    assert per_layer("sparsity", {"tok.weight": 0.5, "head.weight": 0.5}, targets) == {"tok.weight": 0.5}


def test_glob_matching_nothing_lists_the_real_names():
    with pytest.raises(ValueError, match="matches no parameter") as error:
        select_targets(TinyGPT(), include=["decoder.*"])
    message = str(error.value)
    assert "tok.weight = head.weight" in message and "attn.in_proj_weight" in message
    with pytest.raises(ValueError, match=r"`sparsity` pattern 'nope\.\*' matches no selected parameter; selected: \['tok\.weight = head\.weight'\]"):
        per_layer("sparsity", {"nope.*": 0.5}, select_targets(TinyGPT(), include=["head.weight"]))


def test_glob_matching_only_buffers_is_an_error_naming_them():
    with pytest.raises(ValueError, match=r"`include` pattern 'causal' matches only buffers.*\['causal'\]"):
        select_targets(TinyGPT(), include=["causal"])


def test_include_and_exclude_as_one_string_are_one_pattern():
    model = TinyGPT()
    assert list(select_targets(model, exclude="mlp.weight")) == ["attn.in_proj_weight", "attn.out_proj.weight"]
    assert list(select_targets(model, include="mlp.weight")) == ["mlp.weight"]
    from lightning_sparse import GradualMagnitudePruning, QuantizationAwareTraining

    assert GradualMagnitudePruning(exclude="net.5.weight").exclude == ["net.5.weight"]
    assert QuantizationAwareTraining(include="net.*").include == ["net.*"]
    with pytest.raises(ValueError, match="`exclude` must be a glob pattern or a list of them"):
        GradualMagnitudePruning(exclude=[3])


def test_attention_with_separate_q_k_v_projections_is_targeted():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=6, vdim=6))
    assert list(select_targets(model)) == ["0.q_proj_weight", "0.k_proj_weight", "0.v_proj_weight", "0.out_proj.weight"]


def test_summary_names_what_is_compressed_and_what_stays_dense_with_shares():
    model = TinyGPT()
    rows = describe_targets(model, select_targets(model))
    by_kind = {(row.kind, row.compressed): row for row in rows}
    total = sum(p.numel() for p in model.parameters())
    assert by_kind[("MultiheadAttention", True)].numel == 3 * 8 * 8
    assert by_kind[("Linear", True)].tensors == 2  # attn.out_proj and mlp
    assert by_kind[("Embedding (tied)", False)].names == ("tok.weight (= head.weight)",)
    assert by_kind[("Embedding", False)].numel == 4 * 8
    assert by_kind[("bias", False)].tensors == 3 and by_kind[("norm", False)].tensors == 2
    assert sum(row.numel for row in rows) == total and sum(row.share for row in rows) == pytest.approx(1.0)
    text = format_targets(rows, "GradualMagnitudePruning")
    assert text.startswith(f"GradualMagnitudePruning compresses {(3 * 64 + 64 + 64) / total:.1%} of the model's weights")
    assert "left dense: Embedding (tied) ×1 (160 weights" in text and "tok.weight (= head.weight)" in text


def test_model_sparsity_counts_every_weight_matrix_once():
    model = TinyGPT()
    matrices = weight_matrices(model)
    assert sorted(matrices) == ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.weight", "pos.weight", "tok.weight"]
    with torch.no_grad():
        model.mlp.weight.zero_()
    assert model_sparsity(matrices) == pytest.approx(64 / (160 + 32 + 192 + 64 + 64))


def test_embedding_cannot_take_n_m_but_its_tied_head_can():
    untied = TinyGPT(tie=False)
    targets = select_targets(untied, include=["tok.weight"])
    from lightning_sparse.core.structured import check_shape

    granularity = expand_granularity("2:4", targets)["tok.weight"]
    with pytest.raises(ValueError, match=r"`granularity`='2:4' needs a weight with output and input dimensions, but 'tok\.weight'.*embedding table"):
        check_shape("tok.weight", untied.tok.weight.shape, granularity)
    tied = select_targets(TinyGPT(), include=["head.weight"])
    check_shape("tok.weight", tied["tok.weight"].shape, expand_granularity("2:4", tied)["tok.weight"])  # the head's axes


def test_hf_conv1d_is_targeted_and_structured_masks_follow_its_real_axes():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(nf=6, nx=8), nn.Linear(6, 4))  # Conv1D: 8 inputs -> 6 outputs, weight (8, 6)
    targets = select_targets(model)
    assert list(targets) == ["0.weight", "1.weight"] and targets.output_axis == {"0.weight": 1, "1.weight": 0}
    masks = MaskSet(targets)
    prune_by_magnitude(masks, 0.5, granularity=expand_granularity("2:4", targets))
    assert (nm_counts(model[0].weight, 4, axis=1) == 2).all()  # groups of 4 inputs of each output column
    assert (model[0].weight.reshape(2, 4, 6) != 0).sum(1).eq(2).all()
    masks = MaskSet(targets)
    prune_by_magnitude(masks, 0.5, granularity=expand_granularity("channel", targets))
    columns = (model[0].weight != 0).any(0)  # output channels of a Conv1D are its columns
    assert int(columns.sum()) == 3 and (model[0].weight[:, ~columns] == 0).all()
    x = torch.randn(5, 8)
    assert torch.equal(model[0](x)[:, ~columns], model[0].bias.expand(5, 6)[:, ~columns])
