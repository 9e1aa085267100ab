import pytest

from occreid.config import DEFAULTS, load_config, parse_override
from occreid.configs import config_path, list_configs
from occreid.utils.io import OccReIDError


def test_defaults_are_the_official_recipe():
    cfg = load_config()
    assert cfg["solver"]["base_lr"] == 0.008
    assert cfg["solver"]["bias_lr_factor"] == 2.0
    assert cfg["solver"]["momentum"] == 0.9
    assert cfg["solver"]["ims_per_batch"] == 64 and cfg["data"]["num_instances"] == 4
    assert cfg["model"]["neck_feat"] == "before"
    assert cfg["data"]["pixel_mean"] == [0.5, 0.5, 0.5]


def test_yaml_with_base_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("solver:\n  base_lr: 0.1\n  max_epochs: 3\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\nsolver:\n  max_epochs: 7\ndata:\n  name: market1501\n")
    cfg = load_config(child, ["solver.seed=5", "data.size_train=[128, 64]", "data.size_test=[128,64]"])
    assert cfg["solver"]["base_lr"] == 0.1
    assert cfg["solver"]["max_epochs"] == 7
    assert cfg["solver"]["seed"] == 5
    assert cfg["data"]["size_train"] == [128, 64]
    assert cfg["data"]["name"] == "market1501"
    # untouched defaults survive the merge
    assert cfg["solver"]["momentum"] == DEFAULTS["solver"]["momentum"]


def test_typo_in_yaml_names_key_and_suggestion(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("solver:\n  base_lrr: 0.1\n")
    with pytest.raises(OccReIDError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "solver.base_lrr" in msg and "solver.base_lr" in msg and str(p) in msg


def test_typo_in_override_and_section():
    with pytest.raises(OccReIDError, match="Did you mean 'solver.max_epochs'"):
        load_config(None, ["solver.max_epoch=3"])
    with pytest.raises(OccReIDError, match="Did you mean 'solver'"):
        load_config(None, ["solvr.max_epochs=3"])


def test_bad_values_rejected():
    with pytest.raises(OccReIDError, match="solver.amp"):
        load_config(None, ["solver.amp=fp8"])
    with pytest.raises(OccReIDError, match="multiple of"):
        load_config(None, ["solver.ims_per_batch=30"])
    with pytest.raises(OccReIDError, match="must be a mapping"):
        load_config(None, ["solver=3"])
    with pytest.raises(OccReIDError, match="section.key=value"):
        parse_override("solver.max_epochs")


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(OccReIDError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("solver: [unclosed\n")
    with pytest.raises(OccReIDError, match="cannot parse"):
        load_config(p)


def test_free_form_kwargs_accepted():
    cfg = load_config(None, ["model.kwargs={num_parts: 4}"])
    assert cfg["model"]["kwargs"] == {"num_parts": 4}


@pytest.mark.parametrize("name", [n for n in list_configs() if not n.startswith("_")])  # not the base fragments
def test_every_shipped_config_loads(name):
    cfg = load_config(config_path(name))
    assert cfg["model"]["name"] in ("baseline", "fed", "dpm")


def test_config_path_lookup():
    assert config_path("occluded_duke/vit_base").name == "vit_base.yaml"
    assert config_path("configs/occluded_duke/vit_base.yaml").is_file()
    with pytest.raises(OccReIDError, match="not found"):
        config_path("nope/nothing.yaml")


def test_load_config_by_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: only the installed copy can be found
    cfg = load_config("occluded_duke/vit_base.yaml")
    assert cfg["data"]["name"] == "occluded_duke" and cfg["solver"]["max_epochs"] == 120
    assert load_config("occluded_duke/dpm")["model"]["stride"] == 11
