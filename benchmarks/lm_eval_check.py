"""EleutherAI's lm-evaluation-harness (``lm_eval``, a client nobody here wrote) against ``dualpath serve --http``.

Runs two local tasks (no dataset download) through lm-eval's ``local-completions`` model against a real
``dualpath serve --http --inprocess`` with the embedded SmolLM2: a multiple-choice task (loglikelihood requests:
token-id prompts, ``echo``, ``logprobs``, ``max_tokens: 0/1``) and a ``generate_until`` task with HumanEval's five
stop sequences. Then recomputes every loglikelihood lm-eval logged with transformers on the same checkpoint and
prints the largest difference.

lm-eval is not a dependency of dualpath: install it into the environment first (``pip install "lm_eval[api]"``).

    python3 benchmarks/lm_eval_check.py [--lm-eval PATH_TO_lm_eval_EXECUTABLE]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _inprocess_server import inprocess_server  # noqa: E402

MC = [{"q": "The capital of France is", "choices": ["Paris", "London", "Berlin"], "gold": 0},
      {"q": "Two plus two equals", "choices": ["four", "seven", "ten"], "gold": 0},
      {"q": "The sky is", "choices": ["blue", "made of cheese"], "gold": 0},
      {"q": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin"], "gold": 0}]
GEN = [{"q": "def add(a, b):\n", "a": "return a + b"}, {"q": "Write one word: hello.", "a": "hello"}]
TASKS = {
    "dp_mc": "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\n"
             "doc_to_target: \"{{gold}}\"\nmetric_list:\n  - metric: acc\n",
    "dp_gen": "output_type: generate_until\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \"{{a}}\"\n"
              "generation_kwargs:\n  until: [\"\\nclass\", \"\\ndef\", \"\\n#\", \"\\nif\", \"\\nprint\"]\n"
              "  max_gen_toks: 16\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
              "    aggregation: mean\n    higher_is_better: true\n",
}


def _write_tasks(root: Path) -> None:
    for name, rows in (("dp_mc", MC), ("dp_gen", GEN)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{TASKS[name]}")


def _reference(samples: str, model_dir: str) -> float:
    """The largest |lm-eval's loglikelihood - transformers'| over the logged multiple-choice requests (context and
    continuation split as lm-eval splits them: trailing spaces of the context go to the continuation)."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    worst = 0.0
    for line in Path(samples).read_text().splitlines():
        s = json.loads(line)
        for args, resp in zip(s["arguments"].values(), s["resps"], strict=True):
            ctx, cont = args["arg_0"], args["arg_1"]
            n_sp = len(ctx) - len(ctx.rstrip())
            if n_sp:
                ctx, cont = ctx[:-n_sp], ctx[-n_sp:] + cont
            whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            ref = sum(lp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))
            ours = float(resp[0][0])
            print(f"  {cont!r:20s} dualpath {ours:9.4f}  transformers {ref:9.4f}")
            worst = max(worst, abs(ours - ref))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm-eval", default=shutil.which("lm_eval") or "lm_eval", help="the lm_eval executable")
    args = ap.parse_args()
    from dualpath.model.embedded import embedded_model_path

    model_dir = str(embedded_model_path())
    tmp = Path(tempfile.mkdtemp(prefix="lm_eval_check_"))
    _write_tasks(tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")}
    with inprocess_server(tmp) as url:
        cmd = [args.lm_eval, "--model", "local-completions", "--model_args",
               f"model=SmolLM2-135M-Instruct,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
               f"tokenizer={model_dir},num_concurrent=2,max_retries=1",
               "--include_path", str(tmp), "--tasks", "dp_mc,dp_gen", "--log_samples",
               "--output_path", str(tmp / "out")]
        run_env = {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        res = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=900)
        print("\n".join(ln for ln in res.stdout.splitlines() if ln.startswith("|")))
        if res.returncode != 0:
            print(res.stderr[-3000:])
            return 1
    samples = glob.glob(str(tmp / "out" / "*" / "samples_dp_mc_*.jsonl"))[0]
    worst = _reference(samples, model_dir)
    print(f"largest |loglikelihood difference| vs transformers: {worst:.2e}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
