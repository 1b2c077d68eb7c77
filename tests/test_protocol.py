import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cells import expand
from benchmark.errors import BenchmarkError
from benchmark.protocol import load_protocol


def _error(path, catalog=None) -> str:
    with pytest.raises(BenchmarkError) as info:
        protocol = load_protocol(path)
        expand(protocol, catalog)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sedds": [0]}, "sedds: unknown key"),
        ({"image_size": "big"}, "image_size: expected int, got str 'big'"),
        ({"seeds": [0, "one"]}, "seeds[1]: expected a list of int"),
        ({"settings": [{"name": "few_shot", "shots": [3]}]}, "settings[0].shots: K=3 not allowed"),
        ({"settings": [{"name": "fewshot"}]}, "settings[0].name: unknown setting 'fewshot'"),
        ({"settings": [{"name": "few_shot"}]}, "settings[0].shots: missing required key"),
        ({"threshold": {"mode": "test"}}, "threshold.mode: expected 'fixed' or 'validation'"),
        ({"threshold": {"value": 1.5}}, "threshold.value: expected a number in [0, 1]"),
        ({"backbone": {"model": "tiny-vit"}}, "backbone.weights: missing required key"),
        ({"version": 7}, "version: unsupported protocol version 7"),
        ({"methods": {"winclp": {}}}, "methods.winclp: unknown method 'winclp'; did you mean 'winclip'?"),
        ({"datasets": ["SynthBrian"]}, "datasets[0]: unknown dataset 'SynthBrian'; did you mean 'SynthBrain'?"),
        ({"methods": {"winclip": {"scale": [2]}}}, "methods.winclip.scale: unknown parameter of 'winclip'"),
        ({"methods": {"winclip": {"temperature": "hot"}}}, "methods.winclip.temperature: expected float"),
        ({"methods": {"winclip": {"image_size": "big"}}}, "methods.winclip.image_size: expected an integer from 32"),
        ({"methods": {"winclip": {"image_size": 7}}}, "methods.winclip.image_size: expected an integer from 32 to"),
        ({"methods": {"winclip": {"image_size": 100000}}}, "methods.winclip.image_size: expected an integer from"),
        ({"image_size": 100000}, "image_size: expected an integer from 32 to 4096 (pixels per side), got 100000"),
        ({"methods": {"mvfa": {"epochs": -1}}}, "methods.mvfa.epochs: expected a number >= 1, got -1"),
        ({"methods": {"mvfa": {"lr": float("nan")}}}, "methods.mvfa.lr: expected a finite number, got nan"),
        ({"methods": {"mvfa": {"lr": 0}}}, "methods.mvfa.lr: expected a number > 0, got 0"),
        ({"methods": {"mvfa": {"mode": "offical"}}}, "methods.mvfa.mode: expected one of official, paper"),
        ({"methods": {"winclip": {"scales": [2.5]}}}, "methods.winclip.scales: expected a list of int, got 2.5"),
        ({"methods": {"bgad": {"pos_beta": 1.5}}}, "methods.bgad.pos_beta: expected a number <= 1, got 1.5"),
        ({"threshold": {"value": float("nan")}}, "threshold.value: expected a number in [0, 1]"),
        ({"figure_samples": -1}, "figure_samples: expected 0 or more images"),
        ({"settings": [{"name": "data_fraction", "fractions": [30]}]}, "settings[0].fractions: 30 % not allowed"),
        ({"settings": [{"name": "domain_generalization"}]}, "settings[0].source: missing required key"),
        (
            {"settings": [{"name": "domain_generalization", "source": "BUSI"}]},
            "settings[0].source: source 'BUSI' is not one of the protocol's datasets",
        ),
        ({"prompt_designs": ["poetic"]}, "prompt_designs: unknown prompt design 'poetic'"),
        ({"methods": {"mvfa": {"seeds": [3]}}}, "methods.mvfa.seeds: expected a list of the protocol's seeds [0]"),
        ({"methods": {"aaclip": {"levels": [24, 6]}}}, "methods.aaclip.levels: expected strictly increasing values"),
    ],
)
def test_validation_errors_name_file_and_key(write_protocol, catalog, overrides, expected):
    assert expected in _error(write_protocol(**overrides), catalog)


def test_unsupported_setting_is_rejected(write_protocol, catalog):
    from benchmark.method import METHODS, Method

    @METHODS.register("normal_only_plugin")
    class NormalOnly(Method):
        name = "normal_only_plugin"
        settings = frozenset({"full_normal"})

    path = write_protocol(methods={"normal_only_plugin": {}})
    assert "method 'normal_only_plugin' supports none of few_normal" in _error(path, catalog)
    both = load_protocol(
        write_protocol(
            methods={"normal_only_plugin": {}, "winclip": {}},
            settings=["full_normal", {"name": "few_normal", "shots": [1]}],
        )
    )
    cells = expand(both, catalog)
    assert {(c.method, c.setting) for c in cells} == {
        ("normal_only_plugin", "full_normal"),
        ("winclip", "full_normal"),
        ("winclip", "few_normal"),
    }
    from benchmark.cells import skipped_pairs

    assert skipped_pairs(both, catalog) == [("normal_only_plugin", "few_normal")]


def test_mask_trained_methods_skip_image_label_datasets(catalog):
    from pathlib import Path

    from benchmark.cells import skipped_pairs

    protocol = load_protocol(Path(__file__).resolve().parents[1] / "protocols" / "fewshot_k4.yaml")
    cells = expand(protocol, catalog)
    assert {c.dataset for c in cells if c.method == "bgad"} == {"BrainMRI", "LiverCT", "RESC"}
    assert {c.dataset for c in cells if c.method == "mvfa"} == set(protocol.datasets)
    assert ("bgad", "HIS") in skipped_pairs(protocol, catalog)


def test_missing_file_and_bad_yaml(tmp_path, catalog):
    assert "protocol file not found" in _error(tmp_path / "nope.yaml", catalog)
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: [unclosed\n")
    assert "not valid YAML" in _error(bad, catalog)


def test_duplicate_keys_are_rejected_but_merge_keys_are_not(write_protocol, catalog):
    path = write_protocol()
    text = path.read_text()
    path.write_text(text + "seeds: [1]\n")  # seeds written twice: YAML would silently keep the last
    assert "line" in _error(path, catalog) and "duplicate key 'seeds'" in _error(path, catalog)
    path.write_text(text.replace("methods:", "base: &b {scales: [2]}\nmethods:", 1))
    assert "base: unknown key" in _error(path, catalog)  # an anchor is read; only unknown keys are errors
    shipped = load_protocol(Path(__file__).resolve().parents[1] / "protocols" / "demo.yaml")
    assert shipped.methods["medsad_no_tpca"]["use_tpca"] is False  # '<<' merges with overrides are fine


def test_valid_protocol_expands_to_cells(write_protocol, catalog):
    protocol = load_protocol(
        write_protocol(seeds=[0, 1], settings=["zero_shot_loo", {"name": "few_normal", "shots": [1, 2]}])
    )
    cells = expand(protocol, catalog)
    assert len(cells) == 2 * (1 + 2 * 2)  # WinCLIP zero-shot is seed-free: once per dataset, not per seed
    loo = [c for c in cells if c.setting == "zero_shot_loo" and c.dataset == "SynthBrain"]
    assert loo[0].loo_sources == ("SynthLiver",)
    assert len({c.config_hash(protocol) for c in cells}) == len(cells)
    assert expand(protocol, catalog, seeds=[1], datasets=["SynthLiver"])[0].seed == 1
    sized = load_protocol(write_protocol(methods={"winclip": {"image_size": 48, "scales": [2]}}))
    assert {c.image_size for c in expand(sized, catalog)} == {48}
    # a method entry may run a subset of the protocol's seeds (a slow method in a quick grid)
    subset = load_protocol(write_protocol(seeds=[0, 1], settings=["zero_shot_loo"], methods={"mvfa": {"seeds": [1]}}))
    assert [c.seed for c in expand(subset, catalog)] == [1, 1]


def test_cli_exits_2_with_one_line(write_protocol):
    path = write_protocol(methods={"winclp": {}})
    proc = subprocess.run([sys.executable, "-m", "benchmark", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "did you mean 'winclip'" in proc.stderr


def test_shipped_protocols_are_valid(catalog):
    from pathlib import Path

    shipped = sorted(Path(__file__).resolve().parents[1].glob("protocols/*.yaml"))
    assert len(shipped) >= 8
    for path in shipped:
        assert expand(load_protocol(path), catalog)


def test_image_size_precedence_entry_then_method_default_then_protocol(tmp_path, catalog):
    """A method entry's image_size wins, else the method's native size, else the protocol's general size."""
    import yaml

    from benchmark.method import METHODS, Method

    @METHODS.register("sizeless_plugin")
    class Sizeless(Method):
        name = "sizeless_plugin"
        settings = frozenset({"few_shot"})

    path = tmp_path / "sizes.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "name": "sizes",
                "datasets": ["BrainMRI"],
                "settings": [{"name": "few_shot", "shots": [2]}],
                "image_size": 320,
                "backbone": {"model": "tiny-vit", "weights": "random-init"},
                "methods": {
                    "winclip": {},
                    "mvfa": {},
                    "bgad": {},
                    "medsad_clip": {},
                    "small_bgad": {"method": "bgad", "image_size": 128},
                    "sizeless_plugin": {},
                },
            }
        )
    )
    sizes = {c.method: c.image_size for c in expand(load_protocol(path), catalog)}
    assert sizes == {"winclip": 240, "mvfa": 240, "bgad": 256, "medsad_clip": 240, "small_bgad": 128,
                     "sizeless_plugin": 320}  # fmt: skip
    mcmiad = load_protocol(Path(__file__).resolve().parents[1] / "protocols" / "full_normal.yaml")
    assert {c.image_size for c in expand(mcmiad, catalog) if c.method == "mcmiad"} == {224}


def test_paper_protocols_run_bgad_with_the_published_command(catalog):
    """The official README's training command: --focal_weighting --pos_beta 0.01 --margin_tau 0.1, at 256 px."""
    shipped = sorted(Path(__file__).resolve().parents[1].glob("protocols/*.yaml"))
    cells = [c for p in shipped if p.stem != "demo" for c in expand(load_protocol(p), catalog) if c.method == "bgad"]
    assert len(cells) > 20
    for cell in cells:
        assert cell.params["pos_beta"] == 0.01 and cell.params["focal_weighting"] is True
        assert cell.params["margin_tau"] == 0.1 and cell.params["anomaly_repeats"] == 5 and cell.image_size == 256
