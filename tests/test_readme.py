"""The README's Python examples run as written (docs stay true)."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_code_fences_are_balanced():
    # a stray fence turns the rest of the page into one code block
    fences = [line for line in README.read_text().splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0
    assert all(f != "```" for f in fences[0::2]), "a block opens without a language"


def test_readme_example_runs(capsys):
    block = python_blocks()[0]
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "torch.Size([2, 10]) True"


def test_readme_lora_example_runs(capsys, tmp_path, monkeypatch):
    [block] = [b for b in python_blocks() if "lora_model" in b]
    monkeypatch.chdir(tmp_path)  # the example writes its adapters to the working directory
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("trainable params: 16,384 ||")
    assert out[-1] == "RecBaseForCausalLM"
    assert (tmp_path / "my-adapters" / "adapter_model.safetensors").is_file()


def test_readme_zero_shot_example_runs(capsys):
    [block] = [b for b in python_blocks() if "choose_fusion" in b]
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == ["generative (1, 5)", "dense (1, 5)", "hybrid (1, 5)"]


def test_readme_serving_example_runs(capsys, tmp_path, monkeypatch):
    [block] = [b for b in python_blocks() if "recommend_frame" in b]
    monkeypatch.chdir(tmp_path)  # the example writes its bundle to the working directory
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.splitlines()[-1] == "(6, 4)"
    assert (tmp_path / "my-bundle" / "bundle.json").is_file()


def test_readme_tasks_example_runs(capsys):
    [block] = [b for b in python_blocks() if "predict_rating" in b]
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.splitlines()[-2:] == ["(1,) True", "[3, 9, 12] True"]
