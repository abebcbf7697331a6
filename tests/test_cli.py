"""The `dustin` command: exit codes, messages without tracebacks, and a real generation."""
import json

import pytest

from dustin.cli import main


def test_info_and_models(capsys):
    assert main(["info", "random:qwen2.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "Qwen2ForCausalLM" in out and "7.616 B" in out and "56.0 MiB" in out
    assert main(["models"]) == 0
    assert "llama-3.3-70b" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["info", "/no/such/model"], "no such model source"),
    (["generate", "--target", "random:qwen2.5-0.5b", "--method", "ar"], "no tokenizer"),
    (["generate", "--gamma", "0", "--prompt", "x"], "gamma must be >= 1"),
])
def test_errors_are_one_line_messages(capsys, argv, match):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert match in captured.out.replace("\n", " ") and "Traceback" not in captured.out + captured.err


@pytest.mark.real
def test_generate_real_pair(tmp_path, capsys):
    stats = tmp_path / "stats.json"
    argv = ["generate", "--prompt", "def add(a, b):", "--max-new-tokens", "12", "--stats-json", str(stats)]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "return" in out.out
    record = json.loads(stats.read_text())
    assert record["stats"]["new_tokens"] == 12 and record["stats"]["method"] == "sd"
