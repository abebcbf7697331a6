"""Command line: `dustin info | models | generate | bench | eval | profile-heads | tune`."""
from __future__ import annotations

import argparse
import importlib.util
import sys

from rich.console import Console
from rich.table import Table

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
        t.add_column(col)
    for name, a in SHAPES.items():
        t.add_row(name, f"{a.n_params() / 1e9:.2f} B", str(a.n_layers), f"{a.n_heads}/{a.n_kv_heads}",
                  str(a.head_dim), _gib(a.n_params() * 2), f"{a.kv_bytes_per_token(2) * 1024 / 2**20:.1f} MiB")
    console.print(t)
    d = Table(title="default pair")
    for col in ("source", "model", "chunk packages", "converted cache"):
        d.add_column(col)
    for role, spec in defaults.DEFAULTS.items():
        n = len(spec.parts)
        have = sum(importlib.util.find_spec(f"{spec.module}{i}") is not None for i in range(1, n + 1))
        cached = str(defaults.converted_dir(spec)) if defaults.is_converted(spec) else "not yet"
        d.add_row(f"default:{role}", spec.description, f"{have}/{n} installed", cached)
    console.print(d)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dustin", description="Long-context batched speculative decoding with "
                                "draft-augmented sparse verification.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="architecture, parameter count and memory of a model source")
    s.add_argument("source", help="checkpoint directory, .gguf file, default:draft|target or random:<shape>")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("models", help="named shapes and the state of the default pair")
    s.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DustinError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
