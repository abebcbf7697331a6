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


def test_bench_rescore_combines_step_times_with_measured_acceptance(tmp_path, capsys):
    """Throughput at measured acceptance is computed from recorded GPU step times, without a GPU."""
    steps = {"ar": 0.010, "sd": 0.020, "dustin": 0.008}
    record = {"command": "dustin bench e2e", "git_revision": "abc", "accept_paper": 2.2, "copy_bandwidth_Bps": 4e12,
              "results": [{"pair": "p", "method": m, "context": 32768, "batch": 16, "budget": 512, "gamma": 4,
                           "step_s": t, "floor_s": t / 2, "roofline_frac": 0.5, "peak_memory_gib": 1.0,
                           "verify_s": t, "verify_attention_s": t / 4} for m, t in steps.items()]}
    (tmp_path / "e2e.json").write_text(json.dumps(record))
    acceptance = {"settings": {"context": 2048}, "runs": {"full": {"mean_tokens_per_step": 3.0},
                  "dustin@32": {"mean_tokens_per_step": 2.5}, "dustin@128": {"mean_tokens_per_step": 2.9}}}
    (tmp_path / "acc.json").write_text(json.dumps(acceptance))
    out = tmp_path / "out"
    assert main(["bench", "e2e", "--rescore", str(tmp_path / "e2e.json"), "--acceptance-json",
                 str(tmp_path / "acc.json"), "--out-dir", str(out)]) == 0
    res = {r["method"]: r for r in json.loads((out / "e2e.json").read_text())["results"]}
    measured = res["dustin"]["throughput"]["measured on the real pair"]
    assert measured["accept"] == 2.5  # the budget nearest 512/32k of the context: 32 of 2048
    assert measured["speedup_vs_ar"] == pytest.approx(2.5 / 0.008 / (1 / 0.010))
    assert res["sd"]["throughput"]["measured on the real pair"]["accept"] == 3.0
    first = json.loads((out / "e2e.json").read_text())
    assert (first["gpu_command"], first["gpu_git_revision"]) == ("dustin bench e2e", "abc")
    # rescoring a rescored record keeps the GPU run it came from
    assert main(["bench", "e2e", "--rescore", str(out / "e2e.json"), "--acceptance-json",
                 str(tmp_path / "acc.json"), "--out-dir", str(out)]) == 0
    again = json.loads((out / "e2e.json").read_text())
    assert (again["gpu_command"], again["gpu_git_revision"]) == ("dustin bench e2e", "abc")
    assert (out / "e2e.md").read_text().startswith("`dustin bench e2e` then `dustin bench e2e --rescore")
