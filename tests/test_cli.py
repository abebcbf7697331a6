"""The `dustin` command: exit codes, messages without tracebacks, and a real generation."""
import json

import pytest
import torch

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


@pytest.mark.parametrize("argv,match", [
    (["info", "/tmp/[/x]"], "[/x]"),  # user text in a message is never read as markup
    (["generate", "--device", "nosuch", "--prompt", "x"], "unknown --device 'nosuch'"),
    (["generate", "--device", "meta", "--prompt", "x"], "runs on cpu or cuda"),
    (["eval", "ppl", "--budgets", "0,0.5"], "fractions of the context in (0, 1]"),
    (["eval", "ppl", "--budgets", "nan"], "fractions of the context in (0, 1]"),
    (["tune", "--budget", "20", "--out", "x.json"], "leaves no entries to choose"),
])
def test_bad_arguments_are_refused_before_any_work(capsys, argv, match):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert match in " ".join(captured.out.split()) and "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize("argv", [["generate", "--batch", "0"], ["generate", "--prompt-tokens", "-1"],
                                  ["generate", "--temperature", "nan"], ["eval", "ppl", "--limit", "0"],
                                  ["eval", "ppl", "--context", "0"], ["tune", "--heads", "0", "--out", "x"],
                                  ["tune", "--n-recent", "0", "--out", "x"], ["tune", "--gamma", "0", "--out", "x"]])
def test_out_of_range_numbers_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "must be" in capsys.readouterr().err


def test_tune_refuses_more_heads_per_layer_than_a_model_has(monkeypatch, capsys, tmp_path):
    """The target has 4 query heads per layer and the draft 2: --heads 3 fits the target, not the draft."""
    from dustin import loading
    from dustin.config import ModelArgs

    def tiny(heads):
        args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=heads, n_kv_heads=2, intermediate_size=64)
        return loading.random_model(args, device=torch.device("cpu"), dtype=torch.float32)

    models = {"default:target": tiny(4), "default:draft": tiny(2)}
    monkeypatch.setattr(loading, "load_model", lambda source, **kw: models[source])
    argv = ["tune", "--heads", "3", "--target-profile", "t.json", "--draft-profile", "d.json",
            "--out", str(tmp_path / "x.json")]
    assert main(argv) == 2
    assert "--heads 3 is more than the draft's 2 query heads per layer; give at most 2" in \
        " ".join(capsys.readouterr().out.split())


def test_outputs_are_checked_before_the_work_that_fills_them(tmp_path, capsys):
    """A folder where a file should go, a missing folder, or a file where a folder should go: refused at
    once, not after a generation or an evaluation."""
    cases = [(["generate", "--prompt", "x", "--stats-json", str(tmp_path)], "is a directory"),
             (["generate", "--prompt", "x", "--stats-json", str(tmp_path / "no" / "s.json")], "does not exist"),
             (["profile-heads", "--model", "random:qwen2.5-0.5b", "--out", str(tmp_path)], "is a directory"),
             (["tune", "--out", str(tmp_path)], "is a directory")]
    (tmp_path / "file").write_text("")
    cases.append((["eval", "ppl", "--out-dir", str(tmp_path / "file")], "is a file; give a folder"))
    for argv, match in cases:
        assert main(argv) == 2, argv
        assert " ".join(match.split()) in " ".join(capsys.readouterr().out.split())


def test_unexpected_errors_are_one_line_unless_asked(monkeypatch, capsys):
    from dustin import cli

    def boom(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "cmd_models", boom)  # main builds its parser afresh: it dispatches to boom
    assert main(["models"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "unexpected RuntimeError: disk on fire" in out and "DUSTIN_TRACEBACK=1" in out
    monkeypatch.setenv("DUSTIN_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["models"])


@pytest.mark.parametrize("e2e,acceptance,match", [
    ({"results": []}, None, "not a `dustin bench e2e` result"),
    ({"command": "x"}, None, "not a `dustin bench e2e` result"),
    (None, [1, 2], "not a `dustin eval acceptance` result"),
    (None, {"settings": {"context": 0}, "runs": {"dustin@32": {}}}, "not a `dustin eval acceptance` result"),
    (None, {"settings": {"context": 2048}, "runs": {"dustin@abc": {}}}, "not a `dustin eval acceptance` result"),
    ({"command": "c", "git_revision": "r", "results": [{"budget": 512, "context": 32768, "method": "ar"}]}, None,
     "not a `dustin bench e2e` result"),
])
def test_rescore_refuses_files_of_the_wrong_kind(tmp_path, capsys, e2e, acceptance, match):
    good_e2e = {"command": "c", "git_revision": "r", "results": [{"budget": 512, "context": 32768}]}
    (tmp_path / "e2e.json").write_text(json.dumps(e2e if e2e is not None else good_e2e))
    (tmp_path / "acc.json").write_text(json.dumps(acceptance if acceptance is not None else
                                                  {"settings": {"context": 2048},
                                                   "runs": {"dustin@32": {"mean_tokens_per_step": 2.5}}}))
    assert main(["bench", "e2e", "--rescore", str(tmp_path / "e2e.json"), "--acceptance-json",
                 str(tmp_path / "acc.json"), "--out-dir", str(tmp_path / "out")]) == 2
    assert " ".join(match.split()) in " ".join(capsys.readouterr().out.split())
    assert not list((tmp_path / "out").glob("*"))  # nothing half-written


def test_flags_a_method_does_not_use_are_named(capsys):
    main(["generate", "--method", "sd", "--policy", "history", "--budget", "64", "--target", "random:qwen2.5-0.5b",
          "--prompt", "x"])
    assert "--policy, --budget take(s) no part in --method sd" in " ".join(capsys.readouterr().err.split())
