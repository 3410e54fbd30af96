import pytest

from bitlm_core.components import resolve_spec
from bitlm_core.errors import ResolutionError, SpecError
from bitlm_core.spec import apply_overrides, load_spec, parse_yaml, quickstart_dict, validate_spec


def test_quickstart_spec_validates_and_resolves():
    spec = load_spec(None)
    assert spec.name == "quickstart"
    resolved = resolve_spec(spec)
    assert resolved["data.encoder"].record.name == "parity9"


def test_example_spec_shows_every_section_and_validates():
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "examples" / "full.yaml"
    raw = yaml.safe_load(path.read_text())
    assert set(raw) >= {"data", "model", "attention", "objective", "train", "compression",
                        "telemetry", "safety", "scaling", "sample", "distributed", "output"}
    resolve_spec(load_spec(path))


def test_the_example_spec_holds_every_default():
    from pathlib import Path

    from bitlm_core.spec import RunSpec

    path = Path(__file__).resolve().parents[1] / "examples" / "full.yaml"
    example = load_spec(path).to_dict()
    assert example.pop("name") == "full-example"
    defaults = RunSpec().to_dict()
    defaults.pop("name")
    assert example == defaults  # the README says it shows the defaults: it must


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line \d+, column \d+"):
        load_spec(path)


def test_top_level_must_be_a_mapping():
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        parse_yaml("- a\n- b\n")


def test_unknown_section_suggests_the_close_one():
    with pytest.raises(SpecError, match=r"trian: unknown key; did you mean 'train'\?"):
        validate_spec({"trian": {"steps": 3}})


def test_unknown_nested_key_suggests_with_its_path():
    with pytest.raises(SpecError, match=r"train\.stpes: unknown key; did you mean "
                                        r"'train\.steps'\?"):
        validate_spec({"train": {"stpes": 3}})


def test_unknown_key_in_component_slot():
    with pytest.raises(SpecError, match=r"data\.encoder\.option: unknown key; did you mean "
                                        r"'data\.encoder\.options'"):
        validate_spec({"data": {"encoder": {"name": "raw8", "option": {}}}})


def test_wrong_type_names_the_path_and_value():
    with pytest.raises(SpecError, match=r"train\.lr: .*number.*got 'fast'"):
        validate_spec({"train": {"lr": "fast"}})


def test_model_heads_must_divide_width():
    with pytest.raises(SpecError, match="divisible by n_heads"):
        validate_spec({"model": {"d_model": 30, "n_heads": 4}})


def test_overrides_parse_yaml_values_and_create_sections():
    raw = apply_overrides({"train": {"steps": 5}}, ["train.steps=200", "train.lr=1e-3",
                                                    "sample.prompt=Hello there",
                                                    "data.corpus.options.path=x.txt"])
    assert raw["train"] == {"steps": 200, "lr": 1e-3}
    assert raw["sample"]["prompt"] == "Hello there"
    assert raw["data"]["corpus"]["options"]["path"] == "x.txt"


@pytest.mark.parametrize("item, message", [("train.steps", "key.path=value"),
                                           ("train..steps=3", "empty key path"),
                                           ("train.steps.x=3", "is a value, not a section")])
def test_bad_overrides(item, message):
    with pytest.raises(SpecError, match=message):
        apply_overrides({"train": {"steps": 5}}, [item])


def test_override_is_validated_like_the_file():
    with pytest.raises(SpecError, match=r"train\.steps"):
        load_spec(None, ["train.steps=-1"])


def test_unknown_component_name_lists_what_exists():
    spec = validate_spec(apply_overrides(quickstart_dict(), ["attention.name=refrence"]))
    with pytest.raises(ResolutionError) as info:
        resolve_spec(spec)
    text = str(info.value)
    assert "unknown attention 'refrence' at attention.name" in text
    assert "did you mean: reference" in text
    assert "available attention backends:" in text and "bitlm plugins list" in text


def test_options_a_component_does_not_accept():
    spec = validate_spec(apply_overrides(quickstart_dict(),
                                         ["sample.sampler.options={temprature: 0.5}"]))
    with pytest.raises(ResolutionError, match=r"does not accept option 'temprature'.*\n.*"
                                              r"did you mean: temperature"):
        resolve_spec(spec)


def test_option_of_the_wrong_type():
    spec = validate_spec(apply_overrides(quickstart_dict(),
                                         ["sample.sampler.options={temperature: hot}"]))
    with pytest.raises(ResolutionError, match="temperature should be float, got str 'hot'"):
        resolve_spec(spec)


def test_missing_required_option():
    spec = validate_spec({"data": {"corpus": {"name": "file"}}})
    with pytest.raises(ResolutionError, match="missing required option.*path"):
        resolve_spec(spec)


def test_spec_is_data_nothing_is_evaluated(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)
