"""Command line: `dustin info | models | generate | bench | eval | profile-heads | tune`."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .cliargs import at_least, finite, output_dir, output_file, parse_device
from .config import FEW_ROW_WEIGHTS, LINEAR_BACKENDS
from .errors import DustinError

console = Console()


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def cmd_info(args) -> None:
    from .loading import load_args

    a = load_args(args.source)
    t = Table(title=args.source, show_header=False)
    rope = f"theta {a.rope_theta:g}" + (f", llama3 scaling x{a.rope_scaling.factor:g}" if a.rope_scaling else "")
    rows = [
        ("architecture", a.architecture),
        ("layers", str(a.n_layers)),
        ("hidden / intermediate", f"{a.dim} / {a.intermediate_size}"),
        ("query / KV heads, head dim", f"{a.n_heads} / {a.n_kv_heads}, {a.head_dim}"),
        ("vocabulary", str(a.vocab_size)),
        ("positions", str(a.max_position_embeddings)),
        ("RoPE", rope),
        ("qkv bias / tied embeddings", f"{a.qkv_bias} / {a.tie_word_embeddings}"),
        ("parameters", f"{a.n_params() / 1e9:.3f} B"),
        ("weights (bf16)", _gib(a.n_params() * 2)),
        ("KV cache per 1k tokens (bf16)", f"{a.kv_bytes_per_token(2) * 1024 / 2**20:.1f} MiB per sequence"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def cmd_models(args) -> None:
    from . import defaults
    from .shapes import SHAPES

    t = Table(title="named shapes (use as random:<name>)")
    for col in ("name", "params", "layers", "q/kv heads", "head dim", "weights bf16", "KV/1k tok bf16"):
        t.add_column(col, no_wrap=col == "name")
    for name, a in SHAPES.items():
        t.add_row(name, f"{a.n_params() / 1e9:.2f} B", str(a.n_layers), f"{a.n_heads}/{a.n_kv_heads}",
                  str(a.head_dim), _gib(a.n_params() * 2), f"{a.kv_bytes_per_token(2) * 1024 / 2**20:.1f} MiB")
    console.print(t)
    d = Table(title="default pair")
    for col in ("source", "model", "chunk packages", "converted cache"):
        d.add_column(col, no_wrap=col == "source")
    for role, spec in defaults.DEFAULTS.items():
        n = len(spec.parts)
        have = sum(importlib.util.find_spec(f"{spec.module}{i}") is not None for i in range(1, n + 1))
        cached = str(defaults.converted_dir(spec)) if defaults.is_converted(spec) else "not yet"
        d.add_row(f"default:{role}", spec.description, f"{have}/{n} installed", cached)
    console.print(d)


def _read_prompts(args, tokenizer) -> list[list[int]]:
    texts = list(args.prompt or [])
    for f in args.prompt_file or []:
        try:
            texts.append(Path(f).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise DustinError(f"cannot read prompt file {f} ({e.strerror})") from None
    if not texts:
        raise DustinError("give a prompt with --prompt TEXT or --prompt-file FILE")
    prompts = []
    for text in texts:
        if args.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise DustinError(f"--chat, but the tokenizer of {args.target} has no chat template; drop --chat")
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = tokenizer.encode(text)
        if args.prompt_tokens:
            ids = ids[: args.prompt_tokens]
        prompts.append(ids)
    return [prompts[i % len(prompts)] for i in range(max(args.batch, len(prompts)))]


def _stats_table(stats) -> Table:
    t = Table(title=f"{stats.method}: {stats.batch} sequence(s)", show_header=False)
    t.add_row("new tokens", str(stats.new_tokens))
    t.add_row("verification steps", str(stats.steps))
    if stats.gamma:
        hist = " ".join(f"{k}:{stats.per_step[k]}" for k in sorted(stats.per_step))
        t.add_row("tokens per step (mean)", f"{stats.mean_tokens_per_step:.2f}")
        t.add_row("tokens per step (histogram)", hist)
        t.add_row("draft acceptance rate", f"{stats.acceptance_rate:.1%}")
    phases = {k: v for k, v in stats.time.items() if v > 0}
    t.add_row("time: " + " / ".join(phases), " / ".join(f"{v:.2f} s" for v in phases.values()))
    t.add_row("decode tokens per second", f"{stats.tokens_per_second:.2f}")
    return t


def _selection(args, target, draft):
    """The selection config for `--method dustin`: a tuned config, with command-line overrides."""
    from .selection.tuning import TunedConfig

    path = args.selection_config
    if path is None and args.target == "default:target" and args.draft == "default:draft":
        path = _packaged("config", "default")
    if path is None:
        raise DustinError("--method dustin needs a tuned config for this pair; make one with `dustin tune` and "
                          "pass --selection-config")
    overrides = {"policy": args.policy}
    if args.adaptive:
        overrides["adaptive"] = True
    if args.guard is not None:
        overrides["guard"] = args.guard
    return TunedConfig.load(path).selection_config(target, draft, budget=args.budget, **overrides)


def cmd_generate(args) -> None:
    import json

    import torch
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from .config import SpecConfig
    from .loading import load_model, load_tokenizer
    from .speculative import Generator

    output_file(args.stats_json, "--stats-json")
    device = parse_device(args.device)
    err = Console(stderr=True)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    cfg = SpecConfig(method=args.method, gamma=args.gamma, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed, max_new_tokens=args.max_new_tokens, draft_budget=args.draft_budget,
                     draft_linear=args.draft_linear, draft_weights=args.draft_weights)
    cfg.validate()
    not_dustin = args.method != "dustin"
    unused = [flag for flag, given in (("--draft", args.method == "ar" and args.draft != "default:draft"),
                                       ("--policy", not_dustin and args.policy != "dustin"),
                                       ("--selection-config", not_dustin and args.selection_config is not None),
                                       ("--budget", not_dustin and args.budget is not None),
                                       ("--adaptive", not_dustin and args.adaptive),
                                       ("--guard", not_dustin and args.guard is not None)) if given]
    if unused:
        err.print(f"note: {', '.join(unused)} take(s) no part in --method {args.method}")
    with err.status("loading models ..."):
        tokenizer = load_tokenizer(args.target)
        target = load_model(args.target, device=device, dtype=dtype)
        draft = None
        if args.method != "ar":
            draft = load_model(args.draft, device=device, dtype=dtype)
    prompts = _read_prompts(args, tokenizer)
    if args.budget is not None:
        # a budget past everything a sequence can hold reads the whole cache, as the longest one does
        args.budget = min(args.budget, max(64, max(map(len, prompts)) + args.max_new_tokens + args.gamma + 1))
    policy = None
    if args.method == "dustin":
        from .selection import make_policy

        policy = make_policy(_selection(args, target, draft))
    err.print(f"{len(prompts)} prompt(s) of {', '.join(str(len(p)) for p in prompts[:4])}"
              f"{'...' if len(prompts) > 4 else ''} tokens; method {args.method}, gamma {args.gamma}")
    gen = Generator(target, draft, cfg, tokenizer=tokenizer, policy=policy)
    streamed: list[list[int]] = [[] for _ in prompts]
    live_view = err.is_terminal

    def view():
        text = tokenizer.decode(streamed[0], skip_special_tokens=True)
        done = sum(len(s) for s in streamed)
        total = args.max_new_tokens * len(prompts)
        return Group(Text(text[-2000:]), Text(f"\n[{done}/{total} tokens]", style="dim"))

    if live_view:
        with Live(view(), console=err, refresh_per_second=8) as live:
            def on_tokens(row, toks):
                streamed[row].extend(toks)
                live.update(view())
            result = gen.generate(prompts, on_tokens=on_tokens)
    else:
        printed = [0]

        def on_tokens(row, toks):
            streamed[row].extend(toks)
            if row == 0:
                text = tokenizer.decode(streamed[0], skip_special_tokens=True)
                sys.stdout.write(text[printed[0]:])
                sys.stdout.flush()
                printed[0] = len(text)
        result = gen.generate(prompts, on_tokens=on_tokens)
        sys.stdout.write("\n")
    if live_view or len(prompts) > 1:
        for i, text in enumerate(result.texts):
            console.rule(f"sequence {i} ({result.finish_reasons[i]})")
            console.print(text, markup=False, highlight=False)
    err.print(_stats_table(result.stats))
    if args.stats_json:
        record = {"config": vars(cfg), "target": args.target, "draft": args.draft,
                  "prompt_tokens": [len(p) for p in prompts], "stats": result.stats.to_dict()}
        with open(args.stats_json, "w") as f:
            json.dump(record, f, indent=2, default=str)


def cmd_profile_heads(args) -> None:
    from .eval.haystack import load_texts
    from .loading import load_model, load_tokenizer
    from .selection.heads import profile_heads

    output_file(args.out, "--out")
    device = parse_device(args.device)
    texts = load_texts(args.data)
    with console.status(f"loading {args.model} ..."):
        model = load_model(args.model, device=device)
        tokenizer = load_tokenizer(args.model)

    def progress(done, total, ok, answer):
        console.print(f"[{done}/{total}] retrieved {ok}: {answer.strip()[:60]!r}", highlight=False)

    prof = profile_heads(model, tokenizer, texts, samples=args.samples, context=args.context, seed=args.seed,
                         progress=progress)
    prof.settings["source"] = args.model
    prof.save(args.out)
    console.print(f"{prof.successful}/{prof.samples} runs retrieved the needle; {prof.seconds:.0f} s; wrote {args.out}")
    for layer, heads in prof.top_heads().items():
        console.print(f"layer {layer:2d}: heads {heads}  score {max(prof.scores[layer]):.3f}", highlight=False)


def _packaged(kind: str, source: str) -> str | None:
    """The profile or tuned config shipped for a default model, if `source` is one."""
    from importlib.resources import files

    names = {"default:draft": "qwen2.5-coder-0.5b-instruct", "default:target": "qwen2.5-coder-1.5b-instruct"}
    name = names.get(source) if kind == "profile" else ("default-pair" if source == "default" else None)
    if name is None:
        return None
    path = files("dustin") / "data" / ("profiles" if kind == "profile" else "configs") / f"{name}.json"
    return str(path) if path.is_file() else None


def trace_prompts(tokenizer, texts: dict[str, str], *, n: int, context: int, seed: int) -> list[list[int]]:
    """Half book continuations, half needle questions, of about `context` tokens."""
    import random

    from .eval import haystack

    rng = random.Random(seed)
    names = sorted(texts)
    prompts = []
    for i in range(n):
        text = texts[names[i % len(names)]]
        if i % 2 == 0:
            prompts.append(haystack.cut(tokenizer, text, context, rng))
        else:
            needle, question = haystack.passkey_needle(rng)
            prompts.append(haystack.build(tokenizer, text, n_tokens=context, needles=[needle],
                                          depths=[rng.random()], question=question, rng=rng).ids)
    return prompts


def cmd_tune(args) -> None:
    import time

    from .config import SpecConfig
    from .eval.haystack import load_texts
    from .loading import load_model, load_tokenizer
    from .selection.heads import HeadProfile
    from .selection.tuning import TraceRecorder, make_tuned, search
    from .speculative import Generator

    output_file(args.out, "--out")
    device = parse_device(args.device)
    if args.budget <= args.n_sink + args.n_recent:
        raise DustinError(f"--budget {args.budget} leaves no entries to choose after {args.n_sink} sinks and "
                          f"{args.n_recent} recent tokens; raise it or lower --n-sink / --n-recent")
    t_prof = args.target_profile or _packaged("profile", args.target)
    d_prof = args.draft_profile or _packaged("profile", args.draft)
    if not t_prof or not d_prof:
        raise DustinError("tune needs head profiles of both models; make them with `dustin profile-heads` and "
                          "pass --target-profile and --draft-profile")
    texts = load_texts(args.data)
    with console.status("loading models ..."):
        target, draft = load_model(args.target, device=device), load_model(args.draft, device=device)
        for name, model in (("target", target), ("draft", draft)):
            if args.heads > model.args.n_heads:
                raise DustinError(f"--heads {args.heads} is more than the {name}'s {model.args.n_heads} query heads "
                                  f"per layer; give at most {min(target.args.n_heads, draft.args.n_heads)}")
        tokenizer = load_tokenizer(args.target)
    t_heads = HeadProfile.load(t_prof, target).top_heads(args.heads)
    d_heads = HeadProfile.load(d_prof, draft).top_heads(args.heads)
    prompts = trace_prompts(tokenizer, texts, n=args.prompts, context=args.context, seed=args.seed)
    start = time.perf_counter()
    recorder = TraceRecorder(t_heads, d_heads)
    gen = Generator(target, draft, SpecConfig(method="dustin", gamma=args.gamma, max_new_tokens=args.new_tokens),
                    tokenizer=tokenizer, policy=recorder)
    for i, p in enumerate(prompts):
        gen.generate([p])
        console.print(f"[{i + 1}/{len(prompts)}] traced {len(recorder.rows)} steps so far "
                      f"({time.perf_counter() - start:.0f} s)")
    traced = time.perf_counter() - start
    result = search(recorder.traces(), budget=args.budget, n_sink=args.n_sink, n_recent=args.n_recent,
                    trials=args.trials, seed=args.seed)
    seconds = time.perf_counter() - start
    settings = {"trace_seconds": traced, "search_seconds": seconds - traced, "prompts": args.prompts,
                "context": args.context, "new_tokens": args.new_tokens, "gamma": args.gamma, "heads_per_layer": args.heads,
                "target_source": args.target, "draft_source": args.draft}
    tuned = make_tuned(target, draft, t_heads, d_heads, result, budget=args.budget, n_sink=args.n_sink,
                       n_recent=args.n_recent, seconds=seconds, settings=settings)
    tuned.save(args.out)
    console.print(f"target layer {result['target_layer']}, draft layers {result['draft_layers']}, m {result['m']} of "
                  f"{args.budget - args.n_sink - args.n_recent}: recovery {result['recovery']:.3f} (history only "
                  f"{result['recovery_history_only']:.3f}); {seconds / 60:.1f} min; wrote {args.out}")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise DustinError(f"expected comma-separated integers, got {text!r}") from None


def cmd_bench(args) -> None:
    import torch

    from .bench import common

    command = "dustin " + " ".join(_ARGV)
    if args.rescore:
        return _rescore(args, output_dir(args.out_dir, "--out-dir"), command)
    if not torch.cuda.is_available():
        raise DustinError("the speed benchmarks time CUDA graphs and need an NVIDIA GPU")
    out = output_dir(args.out_dir, "--out-dir")
    info = common.device_info(torch.device("cuda"))
    if args.what == "kernels":
        from .bench import kernels as bench

        record = bench.run(shapes=(args.shapes or ",".join(bench.PAPER_SHAPES)).split(","),
                           contexts=_ints(args.contexts), batches=_ints(args.batches), gamma=args.gamma,
                           budget=args.budget, sdpa=not args.no_sdpa)
    elif args.what == "reads":
        from .bench import reads as bench

        record = bench.run()
    elif args.what == "linear":
        from .bench import linear as bench

        record = bench.run(shapes=(args.shapes or ",".join(bench.DRAFT_SHAPES)).split(","), rows=_ints(args.batches),
                           context=max(_ints(args.contexts)), budget=args.budget + 16)
    else:
        from .bench import e2e as bench

        measured = None
        if args.acceptance_json:
            measured = bench.load_measured(args.acceptance_json, budget_fraction=args.budget / 32768)
        record = bench.run(pairs=args.pairs.split(","), contexts=_ints(args.contexts), batches=_ints(args.batches),
                           methods=args.methods.split(","), gamma=args.gamma, budget=args.budget,
                           draft_budget=args.draft_budget, measured=measured, replays=args.replays,
                           profile=args.profile)
    record["device"] = info
    common.write_record(out / f"{args.what}.json", command, record)
    (out / f"{args.what}.md").write_text(f"`{command}`\n\n" + bench.table(record) + "\n")
    bench.plot(record, out / f"{args.what}.png")
    console.print(bench.table(record), markup=False, highlight=False)


def _rescore(args, out, command) -> None:
    """Recompute e2e throughput from recorded GPU step times with acceptance measured on the real pair."""
    import json

    from .bench import common
    from .bench import e2e as bench

    if args.what != "e2e" or not args.acceptance_json:
        raise DustinError("--rescore takes an e2e result and needs --acceptance-json")
    try:
        record = json.loads(Path(args.rescore).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DustinError(f"cannot read {args.rescore} ({e})") from None
    try:  # everything the outputs need, before any of them is written
        fraction = record["results"][0]["budget"] / max(r["context"] for r in record["results"])
        record["accept_measured"] = bench.load_measured(args.acceptance_json, budget_fraction=fraction)
        bench.add_throughput(record, record["accept_measured"])
        record["rescored"] = {"from": args.rescore, "command": command,
                              "note": "step times from the GPU run above; tokens per step measured on the CPU"}
        command_then, revision_then = record.pop("command"), record.pop("git_revision")
        if "gpu_command" not in record:  # a record rescored before keeps the GPU run it came from
            record["gpu_command"], record["gpu_git_revision"] = command_then, revision_then
        md = bench.table(record)
        bench.plot(record, out / "e2e.png")
    except DustinError:  # the acceptance file's own message
        raise
    except (KeyError, TypeError, IndexError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise DustinError(f"{args.rescore} is not a `dustin bench e2e` result ({type(e).__name__}: {e})") from None
    common.write_record(out / "e2e.json", command, record)
    (out / "e2e.md").write_text(f"`{record['gpu_command']}` then `{command}`\n\n" + md + "\n")
    console.print(md, markup=False, highlight=False)


_ARGV: list[str] = []


def cmd_eval(args) -> None:
    import json

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .bench.common import git_revision
    from .eval import report
    from .eval.runner import RUNNERS, EvalConfig, make_context, run_task

    tasks = args.task.split(",")
    unknown = [t for t in tasks if t not in RUNNERS]
    if unknown:
        raise DustinError(f"unknown task(s) {unknown}; choose from {', '.join(RUNNERS)}")
    try:
        budgets = tuple(float(x) for x in args.budgets.split(","))
    except ValueError:
        raise DustinError(f"--budgets takes comma-separated fractions, got {args.budgets!r}") from None
    if not all(0 < b <= 1 for b in budgets):  # NaN fails too
        raise DustinError(f"--budgets are fractions of the context in (0, 1], got {args.budgets!r}")
    device = parse_device(args.device)
    out = output_dir(args.out_dir, "--out-dir")
    results = {}
    models = None
    for task in tasks:
        cfg = EvalConfig(task=task, context=args.context, budgets=budgets, policies=tuple(args.policies.split(",")),
                         limit=args.limit, gamma=args.gamma, new_tokens=args.new_tokens, continuation=args.continuation,
                         seed=args.seed, dtype=args.dtype, target=args.target, draft=args.draft, data=args.data,
                         selection_config=args.selection_config, guard=args.guard, draft_weights=args.draft_weights)
        if models is None:
            with console.status("loading models ..."):
                ctx = make_context(cfg, device=device)
            models = (ctx.target, ctx.draft, ctx.tokenizer, ctx.tuned)
        else:
            ctx = make_context(cfg, models=models)
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            job = bar.add_task(task, total=cfg.limit)
            from .eval.runner import Store, build_samples

            done = len([s for s in build_samples(ctx) if s.id in Store(out / f"{RUNNERS[task]}.jsonl").records])
            bar.update(job, completed=done)
            result = run_task(ctx, out, progress=lambda sid, sec: bar.advance(job))
        record = {"command": "dustin " + " ".join(_ARGV), "git_revision": git_revision(), "task": task,
                  "settings": ctx.settings, "models": {"target": args.target, "draft": args.draft,
                  "note": "Qwen2.5-Coder-Instruct GGUF quantised to 4-5 bits, dequantised"}, **result}
        (out / f"{task}.json").write_text(json.dumps(record, indent=1))
        md = report.table(task, result, args.context)
        (out / f"{task}.md").write_text(f"`{record['command']}`\n\n{md}\n")
        console.print(md, markup=False, highlight=False)
        results[task] = result
    report.plot(results, args.context, out / f"{'-'.join(tasks)}.png")


def _pair_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--target", default="default:target", help="target model source (default: %(default)s)")
    s.add_argument("--draft", default="default:draft", help="draft model source (default: %(default)s)")


def _run_args(s: argparse.ArgumentParser, *, data_help: str) -> None:
    s.add_argument("--data", help=data_help)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dustin", description="Long-context batched speculative decoding with "
                                "draft-augmented sparse verification.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="architecture, parameter count and memory of a model source")
    s.add_argument("source", help="checkpoint directory, .gguf file, default:draft|target or random:<shape>")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("models", help="named shapes and the state of the default pair")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("generate", help="speculative generation, streamed, with statistics at the end")
    _pair_args(s)
    s.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    s.add_argument("--prompt-file", action="append", help="file whose text is a prompt (repeatable)")
    s.add_argument("--prompt-tokens", type=at_least(0), default=0, help="keep only the first N tokens of each prompt")
    s.add_argument("--batch", type=at_least(1), default=1, help="repeat the prompts to fill a batch of this size")
    s.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    s.add_argument("--method", default="sd", choices=["ar", "sd", "magicdec", "dustin"])
    s.add_argument("--gamma", type=int, default=4, help="draft tokens per step")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=finite, default=0.0, help="0 is greedy")
    s.add_argument("--top-p", type=finite, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--draft-budget", type=int, default=512, help="magicdec: KV entries the draft reads")
    s.add_argument("--draft-linear", default="auto", choices=list(LINEAR_BACKENDS),
                   help="the draft's linear layers: cuBLAS (torch), cuBLAS but the down projection in the fused "
                        "few-row Triton kernel (down), all in the fused kernels (triton), or the faster of the "
                        "last two for the draft's size (auto)")
    s.add_argument("--draft-weights", default="native", choices=list(FEW_ROW_WEIGHTS),
                   help="what the draft's fused few-row kernels read: its native weights, or fp8 copies with "
                        "per-channel scales (half the weight memory, but slower steps on an H200; proposals may "
                        "change, what is accepted is still the target's choice)")
    s.add_argument("--selection-config", help="dustin: tuned config JSON (default: the shipped one for the default pair)")
    s.add_argument("--policy", default="dustin", help="dustin: selection policy (dustin, history, lookahead, "
                   "oracle, streaming, snapkv, quest, full)")
    s.add_argument("--budget", type=int, help="dustin: KV entries verification reads (default: the tuned budget)")
    s.add_argument("--adaptive", action="store_true", help="dustin: adapt the split m per sequence")
    s.add_argument("--guard", type=finite, help="dustin: re-verify in full below this estimated recovery")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--stats-json", help="write the configuration and statistics to this JSON file")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("profile-heads", help="find retrieval heads (CompressKV procedure) and write a JSON profile")
    s.add_argument("--model", required=True, help="model source")
    _run_args(s, data_help="text file or folder of .txt files for haystacks (default: the books)")
    s.add_argument("--samples", type=at_least(1), default=8, help="needle prompts")
    s.add_argument("--context", type=at_least(1), default=2048, help="tokens per prompt")
    s.add_argument("--out", required=True, help="JSON file to write")
    s.set_defaults(func=cmd_profile_heads)

    s = sub.add_parser("tune", help="choose target/draft scoring layers and the split m from verification traces")
    _pair_args(s)
    _run_args(s, data_help="text file or folder for the trace prompts (default: the books)")
    s.add_argument("--target-profile", help="head profile JSON of the target (default: the shipped one)")
    s.add_argument("--draft-profile", help="head profile JSON of the draft (default: the shipped one)")
    s.add_argument("--heads", type=at_least(1), default=4, help="retrieval heads per layer")
    s.add_argument("--prompts", type=at_least(1), default=6)
    s.add_argument("--context", type=at_least(1), default=2048, help="tokens per trace prompt")
    s.add_argument("--new-tokens", type=at_least(1), default=48, help="tokens generated per trace prompt")
    s.add_argument("--gamma", type=at_least(1), default=4)
    s.add_argument("--budget", type=at_least(1), default=64, help="budget the split is tuned at")
    s.add_argument("--n-sink", type=at_least(0), default=4)
    s.add_argument("--n-recent", type=at_least(1), default=16)
    s.add_argument("--trials", type=at_least(1), default=40, help="Optuna trials for m")
    s.add_argument("--out", required=True, help="JSON file to write")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("eval", help="accuracy on the real pair: ppl, retrieval, agreement, acceptance, recovery")
    s.add_argument("task", help="one or more of ppl, recovery, retrieval, agreement, acceptance (comma-separated)")
    _pair_args(s)
    _run_args(s, data_help="text file or folder of .txt files (default: the books)")
    s.add_argument("--selection-config", help="tuned config JSON (default: the shipped one for the default pair)")
    s.add_argument("--context", type=at_least(1), default=2048, help="tokens of context per sample")
    s.add_argument("--budgets", default="0.016,0.03,0.06", help="budgets as fractions of the context")
    s.add_argument("--policies", default="full,dustin,dustin-adaptive,dustin-guard,history,lookahead,oracle,"
                   "streaming,snapkv,quest")
    s.add_argument("--limit", type=at_least(1), default=4, help="samples")
    s.add_argument("--gamma", type=int, default=4)
    s.add_argument("--new-tokens", type=at_least(1), default=48, help="agreement: tokens generated per method")
    s.add_argument("--continuation", type=at_least(1), default=160, help="ppl: tokens scored after the context")
    s.add_argument("--guard", type=finite, default=0.6, help="recovery threshold of the dustin-guard policy")
    s.add_argument("--draft-weights", default="native", choices=list(FEW_ROW_WEIGHTS),
                   help="agreement, acceptance: what the draft's few-row passes read (see generate)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    s.add_argument("--out-dir", default="benchmarks/eval")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("bench", help="GPU speed benchmarks: attention kernels, the draft's linear layers, whole "
                       "decoding steps, or what one launch of N bytes reads")
    s.add_argument("what", choices=["kernels", "linear", "e2e", "reads"])
    s.add_argument("--shapes", default=None, help="kernels, linear: model shapes (default: the paper's targets "
                   "for kernels, the drafts for linear)")
    s.add_argument("--pairs", default="qwen2.5-7b,llama-3.1-8b", help="e2e: target shapes (each with its draft)")
    s.add_argument("--methods", default="ar,sd,magicdec,dustin,dustin+draft-selected,"
                   "dustin-adaptive+draft-selected")
    s.add_argument("--contexts", default="8192,16384,32768")
    s.add_argument("--batches", default="8,16", help="kernels, e2e: batch sizes; linear: rows (batch x tokens)")
    s.add_argument("--gamma", type=int, default=4)
    s.add_argument("--budget", type=int, default=512)
    s.add_argument("--draft-budget", type=int, default=512, help="e2e: magicdec's draft KV entries")
    s.add_argument("--replays", type=at_least(1), default=20, help="e2e: timed steps per method")
    s.add_argument("--no-sdpa", action="store_true", help="kernels: skip the slow SDPA baseline")
    s.add_argument("--profile", action="store_true", help="e2e: record the kernels each step spends its time in")
    s.add_argument("--acceptance-json", help="e2e: `dustin eval acceptance` result, for throughput at measured "
                   "acceptance")
    s.add_argument("--rescore", help="e2e: recompute throughput of this recorded result (no GPU needed)")
    s.add_argument("--out-dir", default="benchmarks")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _ARGV[:] = argv
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DustinError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
    except OSError as e:  # what no check foresaw: a full disk, a file removed meanwhile, permissions
        _error(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        return 2
    except Exception as e:
        if os.environ.get("DUSTIN_TRACEBACK") == "1":
            raise
        _error(f"unexpected {type(e).__name__}: {e}. This input is not checked yet, or dustin has a bug: rerun "
               "with DUSTIN_TRACEBACK=1 for the traceback, and please report it")
        return 1
    return 0


def _error(message: str) -> None:
    # the message may quote user input: never read it as markup
    console.print(Text.assemble(("error:", "red"), " ", message), highlight=False)


if __name__ == "__main__":
    sys.exit(main())
