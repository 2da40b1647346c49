"""Peak memory of the quantize stage's core on a model with a real 152k vocabulary: committed code vs this tree.

Builds a Qwen2-family tiny model (scripts/family_models.py: 9.8M parameters, most of them the 151,936 x 64
embedding, the real Qwen2 tokenizer and chat template), renders `--rows` support tickets from data/raw as
formatted test rows, and runs `quantize.quantize` (the stage's pure core: load the merged model, score it,
export and score each GGUF) in a fresh process for each version of the code (stages/ and finetune/): the committed one (`--rev`,
extracted with `git archive` into a temp folder and put first on sys.path) and the working tree. Peak RSS
is that process's high-water mark including its children (the GGUF converter), from wait4(). The scores
must come out the same (perplexity to 1e-6 relative, top-1 agreement, task metrics).

    python benchmarks/bench_memory.py [--rows 48] [--formats gguf_q8_0] [--rev HEAD] [--threads 1]

Needs `scripts/install_llamacpp.sh` (make install): the Qwen2 vocabulary file and llama.cpp's converter.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ticket_records(count: int) -> list[dict]:
    """The first `count` well-formed support tickets as normalised chat records (what ingest writes)."""
    records = []
    for line in (ROOT / "data" / "raw" / "support_tickets.jsonl").read_bytes().decode(errors="replace").splitlines():
        try:  # the raw file has planted malformed lines
            ticket = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (isinstance(ticket, dict) and all(isinstance(ticket.get(key), str) and ticket[key]
                                                 for key in ("instruction", "input", "output"))):
            continue
        records.append({"id": f"t{len(records)}", "messages": [
            {"role": "user", "content": f"{ticket['instruction']}\n\n{ticket['input']}"},
            {"role": "assistant", "content": ticket["output"]}]})
        if len(records) == count:
            break
    return records


def child(root: str, spec_path: str) -> None:
    """One measured run: the quantize core of the code in the repository folder given, on the spec's model and rows."""
    sys.path.insert(0, root)
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(spec["threads"])
    from stages import format as fmt
    from stages import quantize
    from finetune.params.core import section

    # rows as the format stage writes them: chat prompt, loss on the answer and its end of turn
    rows = fmt.formatted_rows(AutoTokenizer.from_pretrained(spec["model"]), ticket_records(spec["rows"]), section("format"))

    cfg = section("quantize", formats=spec["formats"], speed_new_tokens=8, max_eval_rows=None)  # every row, as before
    eval_cfg = section("evaluate", general={"tasks": []})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as out:
        if hasattr(quantize, "QuantizeJob"):
            report = quantize.quantize(quantize.QuantizeJob(Path(spec["model"]), Path(out), rows, rows, cfg, eval_cfg,
                                                            spec["threads"]))
        else:  # committed code from before the typed record
            report = quantize.quantize(spec["model"], spec["formats"], out, rows, rows, cfg, eval_cfg, spec["threads"])
    Path(spec["result"]).write_text(json.dumps({"report": report, "seconds": time.perf_counter() - started,
                                                "rows": len(rows), "longest": max(len(row["input_ids"]) for row in rows)}))


def measure(root: Path, spec: dict, scratch: Path, label: str) -> dict:
    spec = {**spec, "result": str(scratch / f"{label}.json")}
    (scratch / f"{label}.spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": ""}
    process = subprocess.Popen([sys.executable, __file__, "--child", str(root), str(scratch / f"{label}.spec.json")],
                               env=env, stdout=subprocess.DEVNULL, stderr=open(scratch / f"{label}.log", "w"))
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"{label} run failed; see {scratch / f'{label}.log'}:\n"
                         + (scratch / f"{label}.log").read_text()[-3000:])
    return {**json.loads(Path(spec["result"]).read_text()), "peak_rss_mb": usage.ru_maxrss / 1024}


def same_scores(before: dict, after: dict) -> list[str]:
    """Differences in anything but timings, memory and speed: perplexity to 1e-6 relative, the rest exactly."""
    problems = []
    for name, metrics in before.items():
        for key, value in metrics.items():
            if any(part in key for part in ("seconds", "per_second")):
                continue
            new = after.get(name, {}).get(key)
            close = (isinstance(value, float) and isinstance(new, float)
                     and abs(new - value) <= 1e-6 * abs(value) + (1e-5 if "perplexity" not in key else 0))
            if new != value and not close:
                problems.append(f"{name}.{key}: {value} -> {new}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48, help="formatted test rows")
    parser.add_argument("--formats", nargs="+", default=["gguf_q8_0"])
    parser.add_argument("--rev", default="HEAD", help="the committed code to compare with (default: HEAD; a commit from 38662d9 on: "
                        "the layout with finetune/)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as folder:
        scratch = Path(folder)
        # everything heavy happens in child processes: on Linux a child's peak RSS starts at its parent's (the
        # high-water mark survives fork and exec), so this process never imports torch or transformers
        model = scratch / "qwen2-tiny"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "family_models.py"), "qwen2", str(model), "--size", "tiny"],
                       check=True, capture_output=True)
        parameters = json.loads((model / "family.json").read_text())["parameters"]
        spec = {"model": str(model), "rows": args.rows, "formats": args.formats, "threads": args.threads}
        committed = scratch / "committed"
        committed.mkdir()
        archive = subprocess.run(["git", "archive", args.rev, "stages", "finetune", "params.yaml"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(committed)], input=archive, check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        vocabulary = json.loads((model / "config.json").read_text())["vocab_size"]
        print(f"quantize core on a Qwen2-family tiny model ({parameters / 1e6:.1f}M parameters, {vocabulary:,}-row "
              f"output layer), formats {' '.join(args.formats)}, {args.threads} thread(s), {os.cpu_count()} CPUs")
        before = measure(committed, spec, scratch, "committed")
        print(f"  {before['rows']} test rows, the longest {before['longest']} tokens")
        name = commit if args.rev.startswith(commit) else f"{args.rev} = {commit}"
        print(f"  committed code ({name}): peak RSS {before['peak_rss_mb']:,.0f} MiB, {before['seconds']:.0f} s")
        after = measure(ROOT, spec, scratch, "working")
        print(f"  working tree:             peak RSS {after['peak_rss_mb']:,.0f} MiB, {after['seconds']:.0f} s")
    problems = same_scores(before["report"], after["report"])
    print(f"  peak RSS {after['peak_rss_mb'] / before['peak_rss_mb']:.2f}x the committed code's; scores "
          + ("identical (perplexity to 1e-6 relative)" if not problems else "DIFFER:\n    " + "\n    ".join(problems)))
    print(f"  merged perplexity {before['report']['merged']['perplexity']} -> {after['report']['merged']['perplexity']}; "
          f"load average before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
