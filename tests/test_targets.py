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
