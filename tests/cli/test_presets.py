"""Presets compose: ``--trainer.callbacks=callbacks/PRESET.yaml`` after any example config gives each callback the
preset's arguments and the class defaults for the rest, never the example's earlier callback arguments."""

import inspect
from pathlib import Path

import pytest
import yaml

from lightning_sparse.cli import main
from lightning_sparse.cli.fit import replace_callbacks_whole
from lightning_sparse.imports import import_object

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if "trainer" in yaml.safe_load(p.read_text()))


def _printed_callbacks(capsys, *args: str) -> list[dict]:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]


def _expected(preset: Path) -> list[dict]:
    """Each of the preset's callbacks with its ``init_args``: the preset's values over the class defaults."""
    expected = []
    for entry in yaml.safe_load(preset.read_text()):
        signature = inspect.signature(import_object(entry["class_path"]).__init__)
        defaults = {name: p.default for name, p in signature.parameters.items() if name != "self"}
        expected.append({"class_path": entry["class_path"], "init_args": {**defaults, **entry.get("init_args", {})}})
    return expected


def test_every_example_config_is_a_fit_config():
    assert {p.name for p in EXAMPLES} >= {"digits_gmp.yaml", "digits_rigl.yaml", "digits_lc.yaml"}
    assert len(PRESETS) >= 7


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_preset_after_the_demo_config_has_its_own_arguments_and_the_defaults(capsys, preset):
    callbacks = _printed_callbacks(capsys, "--config", str(ROOT / "examples" / "digits_gmp.yaml"),
                                   f"--trainer.callbacks={preset}")  # fmt: skip
    assert callbacks == _expected(preset)


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_with_every_example_config(capsys, example, preset):
    callbacks = _printed_callbacks(capsys, "--config", str(example), f"--trainer.callbacks={preset}")
    assert callbacks == _expected(preset)


def test_rigl_preset_after_gmp_does_not_inherit_gmp_start(capsys):
    """The reported leak: the demo's GMP ``start: 0.1`` became RigL's start (RigL's default is 0)."""
    (rigl,) = _printed_callbacks(capsys, "--config", str(ROOT / "examples" / "digits_gmp.yaml"),
                                 f"--trainer.callbacks={ROOT / 'callbacks' / 'rigl.yaml'}")  # fmt: skip
    assert rigl["class_path"] == "lightning_sparse.RigL"
    assert rigl["init_args"]["start"] == 0 and rigl["init_args"]["frequency"] == 100


def test_an_argument_after_a_preset_still_overrides_it(capsys):
    (gmp,) = _printed_callbacks(capsys, "--config", str(ROOT / "examples" / "digits_rigl.yaml"),
                                f"--trainer.callbacks={ROOT / 'callbacks' / 'gmp.yaml'}",
                                "--trainer.callbacks.sparsity=0.95")  # fmt: skip
    assert gmp["init_args"]["sparsity"] == 0.95 and gmp["init_args"]["start"] == 0.1


def test_set_accepts_a_per_layer_sparsity_mapping_on_the_command_line(capsys):
    (set_,) = _printed_callbacks(capsys, "--config", str(ROOT / "examples" / "digits_rigl.yaml"),
                                 "--trainer.callbacks=lightning_sparse.SET",
                                 '--trainer.callbacks.sparsity={"net.1.weight": 0.8, "net.3.weight": 0.5}')  # fmt: skip
    assert set_["class_path"] == "lightning_sparse.SET"
    assert set_["init_args"]["sparsity"] == {"net.1.weight": 0.8, "net.3.weight": 0.5}


def test_only_a_whole_list_replacement_resets_the_callbacks():
    args = ["--config", "c.yaml", "--trainer.callbacks=p.yaml", "--trainer.callbacks.sparsity=0.9",
            "--trainer.callbacks+=lightning_sparse.RigL", "--trainer.callbacks", "q.yaml"]  # fmt: skip
    assert replace_callbacks_whole(args) == [
        "--config", "c.yaml", "--trainer.callbacks=[]", "--trainer.callbacks=p.yaml", "--trainer.callbacks.sparsity=0.9",
        "--trainer.callbacks+=lightning_sparse.RigL", "--trainer.callbacks=[]", "--trainer.callbacks", "q.yaml",
    ]  # fmt: skip


def test_set_takes_a_per_layer_sparsity_mapping_from_the_command_line(capsys, tmp_path):
    """``SET.sparsity`` used to be annotated ``float``, so the CLI refused the mapping RigL and Python accept."""
    preset = tmp_path / "set.yaml"
    preset.write_text(yaml.safe_dump([{"class_path": "lightning_sparse.SET",
                                       "init_args": {"sparsity": {"net.1.weight": 0.8, "net.3.weight": 0.5}}}]))  # fmt: skip
    (callback,) = _printed_callbacks(capsys, "--config", str(ROOT / "examples" / "digits_gmp.yaml"), f"--trainer.callbacks={preset}")
    assert callback["class_path"] == "lightning_sparse.SET"
    assert callback["init_args"]["sparsity"] == {"net.1.weight": 0.8, "net.3.weight": 0.5}
