"""Hostile YAML (issue 23, item 2): every YAML file cxrtool reads goes through one bounded
reader (cxrtool.io.yamlfile) that refuses alias bombs, oversized files and text that is not
UTF-8 with one short line naming the file, before any study is touched."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cxrtool
from cxrtool.cli import app
from cxrtool.io.yamlfile import ALIAS_BUDGET, MAX_BYTES, YamlFileError, read_yaml
from cxrtool.models.sources.bundle import BundleError, read_bundle

LETTERS = "abcdefghij"


def bomb(depth: int, field: str = "name") -> str:
    """The billion laughs: nine "x" at the bottom, each level nine aliases of the one below,
    ``field`` an alias of the top (9 ** depth strings once expanded)."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for below, level in zip(LETTERS, LETTERS[1:depth], strict=False):
        lines.append(f"{level}: &{level} [" + ",".join([f"*{below}"] * 9) + "]")
    lines.append(f"{field}: *{LETTERS[depth - 1]}")
    return "\n".join(lines) + "\n"


def bomb_bundle(depth: int, field: str) -> str:
    """A bundle whose ``field`` is the bomb: its levels are anchored inside the bundle's
    description (a key a bundle may have), the bundle otherwise whole."""
    levels = ['&a ["x","x","x","x","x","x","x","x","x"]']
    for below, level in zip(LETTERS, LETTERS[1:depth], strict=False):
        levels.append(f"&{level} [" + ",".join([f"*{below}"] * 9) + "]")
    return (f"description: [{', '.join(levels)}]\n{field}: *{LETTERS[depth - 1]}\n"
            "members: {pa: pa.safetensors}\n")


@pytest.fixture()
def folder(make_checkpoint, tmp_path, monkeypatch):
    """A member checkpoint and a study (a PNG) in their own folders; the working folder empty."""
    (tmp_path / "pa.safetensors").symlink_to(make_checkpoint(("Effusion", "Nodule"), name="pa"))
    study = tmp_path / "study"
    study.mkdir()
    from conftest import write_png

    write_png(study / "x.png")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def one_short_line(output: str, limit: int = 2_000) -> str:
    text = output.strip()
    assert len(output) < limit, f"{len(output)} characters of output"
    assert "\n" not in text, text[:500]
    return text


def test_the_bomb_is_a_few_hundred_bytes_of_valid_yaml():
    import yaml

    assert len(bomb_bundle(6, "name").encode()) < 500
    assert yaml.compose(bomb_bundle(6, "name")) is not None  # valid YAML: its size only comes when expanded


@pytest.mark.parametrize("field", ["name", "merge"])
def test_predict_refuses_a_six_deep_alias_bomb_in_a_bundle(folder, field):
    bundle = folder / "bomb.yaml"
    bundle.write_text(bomb_bundle(6, field))
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["predict", str(folder / "study"), "-m", str(bundle), "-j", "0"])
    assert result.exit_code == 2, result.output[:2000]
    line = one_short_line(result.output)
    assert str(bundle) in line and "aliases would repeat more than 100,000" in line
    assert time.perf_counter() - started < 30
    # Nothing written: no table, no sidecar, no listing, beside the study or in the working folder.
    assert sorted(p.name for p in (folder / "study").iterdir()) == ["x.png"]
    assert not list(Path.cwd().iterdir())


def test_an_eight_deep_bomb_is_refused_at_once(folder):
    bundle = folder / "bomb8.yaml"
    bundle.write_text(bomb_bundle(8, "name"))
    started = time.perf_counter()
    with pytest.raises(BundleError, match="aliases would repeat") as caught:
        read_bundle(bundle)
    assert time.perf_counter() - started < 3
    assert len(str(caught.value)) < 300
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["predict", str(folder / "study"), "-m", str(bundle), "-j", "0"])
    assert result.exit_code == 2 and "aliases would repeat" in one_short_line(result.output)
    assert time.perf_counter() - started < 30  # (the CLI's own start-up included)


def test_radiomics_refuses_a_bomb_as_its_params(folder):
    params = folder / "params.yaml"
    params.write_text(bomb(6, "levels") + "imageType: {Original: {}}\nfeatureClass: {firstorder: *f}\n")
    result = CliRunner().invoke(app, ["radiomics", str(folder / "study"), "--params", str(params)])
    assert result.exit_code == 2, result.output[:2000]
    line = one_short_line(result.output)
    assert str(params) in line and "aliases would repeat" in line
    assert sorted(p.name for p in (folder / "study").iterdir()) == ["x.png"]


# Every reader of a YAML file in the package, each with its own error type (its message
# starts with the file's name).
def _bundle(path):
    return read_bundle(path)


def _params(path):
    from cxrtool.radiomics.features import load_params

    return load_params(path)


def _config(path):
    from cxrtool.train.config import load_config

    return load_config(path)


def _prompts(path):
    from cxrtool.models.text import read_prompts

    return read_prompts(path)


def _descriptions(path):
    from cxrtool.models.text import read_descriptions

    return read_descriptions(path)


def _errors():
    from cxrtool.radiomics.features import ParamsError

    return {_bundle: BundleError, _params: ParamsError, _config: ValueError, _prompts: ValueError,
            _descriptions: ValueError}


READERS = [_bundle, _params, _config, _prompts, _descriptions]


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.__name__.strip("_"))
def test_every_reader_refuses_a_bomb_an_oversized_file_and_cp1252(reader, tmp_path):
    error = _errors()[reader]
    cases = {
        "bomb.yaml": (bomb(8, "name").encode(), "aliases would repeat more than 100,000 values and characters"),
        "big.yaml": (b"name: '" + b"x" * MAX_BYTES + b"'\n", "too large for .* the limit is 1,000,000 bytes"),
        "cp1252.yaml": ("name: \u201cquoted\u201d caf\u00e9\n".encode("cp1252"),
                        "not UTF-8 text \\(byte 0x93 at offset 6 .*save .* as UTF-8"),
        "recursive.yaml": (b"name: &n [1, *n]\n", "holds an alias of itself"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        started = time.perf_counter()
        with pytest.raises(error, match=message) as caught:
            reader(path)
        assert time.perf_counter() - started < 3, name
        text = str(caught.value)
        assert str(path) in text and "\n" not in text and len(text) < 300, text[:400]


def test_the_reader_refuses_with_one_error_type_and_reason(tmp_path):
    cases = {
        "nul.yaml": (b"a: \x00\n", "character #x0000 at character 3 is not allowed"),
        "digits.yaml": (b"a: " + b"1" * 5000 + b"\n", "not valid YAML \\(a value cannot be read: Exceeds the limit"),
        "date.yaml": (b"a: 2024-13-45\n", "a value cannot be read: month must be in 1..12"),
        "deep.yaml": (b"[" * 3000 + b"]" * 3000, "nested too deeply to be a test file"),
        "two.yaml": (b"a: 1\n---\nb: 2\n", "not valid YAML at line 2"),
        "python.yaml": (b"a: !!python/object/apply:os.system [echo hi]\n", "not valid YAML at line 1"),
        "long.yaml": (b"a: &a " + b"y" * 60_000 + b"\nb: [*a, *a]\n", "aliases would repeat"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(YamlFileError, match=message) as caught:
            read_yaml(path, what="a test file")
        assert str(caught.value).startswith(f"{path}: ") and len(str(caught.value)) < 300
    with pytest.raises(YamlFileError, match="cannot be read \\(No such file"):
        read_yaml(tmp_path / "missing.yaml", what="a test file")
    small = tmp_path / "small.yaml"
    small.write_text("a: 1234567890\n")
    with pytest.raises(YamlFileError, match="too large for a test file \\(14 bytes; the limit is 10 bytes\\)"):
        read_yaml(small, what="a test file", max_bytes=10)


def test_modest_aliases_merge_keys_and_a_bom_still_read(tmp_path):
    path = tmp_path / "shared.yaml"
    path.write_text("\ufeffbase: &base {binWidth: 25, label: 1}\none: *base\ntwo: {<<: *base, label: 2}\n"
                    "many: [" + ", ".join(["*base"] * 1000) + "]\n", encoding="utf-8")
    values = read_yaml(path, what="a test file")
    assert values["one"] == {"binWidth": 25, "label": 1} and values["two"] == {"binWidth": 25, "label": 2}
    assert len(values["many"]) == 1000
    assert ALIAS_BUDGET >= 10_000
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml", what="a test file") is None


def test_a_normal_bundle_with_an_anchor_still_works(folder, make_checkpoint):
    (folder / "pa2.safetensors").symlink_to(make_checkpoint(("Effusion", "Nodule"), name="pa2", seed=1))
    path = folder / "anchored.yaml"
    path.write_text("name: anchored\nmerge: mean\nmembers: {pa: pa.safetensors, pa2: pa2.safetensors}\n"
                    "routes: {PA: &both [pa, pa2], default: *both}\n")
    bundle = read_bundle(path)
    assert bundle.name == "anchored" and bundle.routes == {"PA": ("pa", "pa2"), "default": ("pa", "pa2")}
    result = CliRunner().invoke(app, ["predict", str(folder / "study"), "-m", str(path), "-j", "0"])
    assert result.exit_code == 0, result.output
    from cxrtool.io.outputs import FOLDER_CSV

    assert (folder / "study" / FOLDER_CSV).is_file()


@pytest.mark.parametrize(("text", "message"), [
    ("name: [a, b]\n", "name must be text \\(quote it"),
    ("name: 2024\n", "name must be text"),
    ("name: '" + "n" * 300 + "'\n", "name must be one line of 1 to 200 printable characters, not 'nnnn"),
    ("name: \"two\\nlines\"\n", "name must be one line"),
    ("merge: [mean]\n", "unknown merge \\['mean'\\]; choose one of mean, weighted, rank"),
    ("merge: '" + "m" * 5000 + "'\n", "unknown merge 'mmmm[m]*\\.\\.\\.; choose one of"),
    ("description: {a: 1}\n", "description must be text"),
    ("? '" + "k" * 5000 + "'\n: 1\n", "unknown key 'kkkk[k]*\\.\\.\\.; a bundle has"),
    ("routes: {PA: [pa], default: ['" + "r" * 5000 + "']}\n", "route default names 'rrr[r]*\\.\\.\\., which is not"),
    ("routes: {PA: {" + ", ".join(f"k{i}: {i}" for i in range(500)) + "}, default: [pa]}\n",
     "route PA must name members, .* not \\{'k0': 0, .*\\.\\.\\."),
], ids=["name-list", "name-number", "name-long", "name-lines", "merge-list", "merge-long", "description-mapping",
        "key-long", "route-name-long", "route-mapping"])
def test_a_bundles_fields_are_checked_and_shown_short(folder, text, message):
    path = folder / "fields.yaml"
    if "members:" not in text:
        text += "members: {pa: pa.safetensors}\n"
    path.write_text(text)
    with pytest.raises(BundleError, match=message) as caught:
        read_bundle(path)
    shown = str(caught.value)
    assert shown.startswith(str(path)) and "\n" not in shown and len(shown) < len(str(path)) + 300, shown[:400]


def test_radiomics_params_must_be_a_mapping_and_reasons_are_short(tmp_path):
    from cxrtool.radiomics.features import ParamsError, load_params

    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping of imageType / featureClass / setting, not \\['a', 'b'\\]"):
        load_params(listed)
    odd = tmp_path / "odd.yaml"
    odd.write_text("setting: {" + ", ".join(f"wrong{i}: {i}" for i in range(2000)) + "}\n")
    with pytest.raises(ParamsError) as caught:
        load_params(odd)
    assert len(str(caught.value)) < len(str(odd)) + 320


def test_a_config_reads_types_it_can_use(tmp_path):
    from cxrtool.train.config import load_config

    for text, message in [("findings: {a: 1}\n", "findings expects a list of names"),
                          ("preset: [x]\n", "preset expects str"),
                          ("1: 2\nepochs: 3\n", "unknown setting 1"),
                          ("task: '" + "t" * 5000 + "'\n", None)]:
        path = tmp_path / "config.yaml"
        path.write_text(text)
        if message is None:
            config = load_config(path, {"labels": "x.csv"})
            with pytest.raises(ValueError, match="task must be one of .*got 'ttt[t]*\\.\\.\\.$") as caught:
                config.validate()
        else:
            with pytest.raises(ValueError, match=message) as caught:
                load_config(path)
        assert len(str(caught.value)) < 1000


def test_every_yaml_read_goes_through_the_reader():
    """One definition: no module but cxrtool/io/yamlfile.py parses YAML itself."""
    package = Path(cxrtool.__file__).parent
    parsing = re.compile(r"\byaml\.(safe_load|load|full_load|unsafe_load|load_all|safe_load_all|compose|parse|YAML)\b"
                         r"|\bSafeLoader\b|\bruamel\b")
    found = [f"{path.relative_to(package)}:{n}" for path in package.rglob("*.py") if path.name != "yamlfile.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if parsing.search(line)]
    assert not found, found
