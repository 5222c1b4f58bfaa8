"""Channel pruning that reaches the model's output layer (a classifier's classes) is said, with the fix."""

import pytest
import pytorch_lightning as pl

from lightning_sparse import GradualMagnitudePruning


@pytest.mark.parametrize("arch", ["lenet300", "cnn"])
def test_channel_pruning_of_the_output_layer_warns_and_names_it(arch, digits_model, make_trainer, tmp_path, digits):
    pl.seed_everything(0)
    model = digits_model(arch)
    output = [name for name, p in model.named_parameters() if p.dim() > 1][-1]
    pruning = GradualMagnitudePruning(sparsity=0.5, granularity="channel", verbose=False)
    with pytest.warns(UserWarning, match=rf"reaches the model's output layer \({output}\).*exclude=\['{output}'\]"):
        make_trainer(tmp_path, [pruning], max_steps=2).fit(model, digits)


def test_no_warning_once_the_output_layer_is_excluded(digits_model, make_trainer, tmp_path, digits, recwarn):
    model = digits_model("lenet300")
    pruning = GradualMagnitudePruning(sparsity=0.5, granularity="channel", exclude=["net.5.weight"], verbose=False)
    make_trainer(tmp_path, [pruning], max_steps=2).fit(model, digits)
    assert not [w for w in recwarn if "reaches the model's output" in str(w.message)]
