"""The pull-request comment: what this change did to the model, against the base branch.

    python scripts/pr_report.py --base origin/main [--plots-dir plots-diff] [--plots-url URL] \
        [--reproduce reproduce.txt] [--examples 5] > report.md

Run in the repository after `dvc repro`, so the workspace holds this change's results. Sections:
params changed (`dvc params diff BASE --md`), metrics (`dvc metrics diff BASE --md`), the plots
diff (`dvc plots diff BASE -o DIR`, an HTML page to upload; `--plots-url` links to it), the example
predictions (metrics/examples.json) whose fine-tuned output changed, and optionally the result of
scripts/check_metrics.py (do the committed metrics reproduce?). The first line is a hidden marker
so a workflow can find and update its previous comment instead of adding a new one.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

MARKER = "<!-- finetune-pr-report -->"
EXAMPLES = "metrics/examples.json"


def dvc(*args: str, cwd: Path) -> str:
    """Run the real dvc of this interpreter's environment; a failure is an error naming the command."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"`dvc {' '.join(args)}` failed ({result.returncode}):\n{result.stderr.strip()}")
    return result.stdout.strip()


def table_or(markdown: str, empty: str) -> str:
    """dvc's --md diff is a header with no rows when nothing changed."""
    return markdown if len(markdown.splitlines()) > 2 else empty


def committed(rev: str, path: str, cwd: Path) -> str | None:
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def cell(text: str, limit: int = 120) -> str:
    """One Markdown table cell: chat-template markers gone, one line, the tail kept (the prompts of a
    task share their beginning; what differs is at the end), HTML and pipes escaped."""
    text = re.sub(r"<\|[^|>]*\|>(?:system|user|assistant)?", " ", str(text))
    text = " ".join(text.split())
    if len(text) > limit:
        text = "…" + text[-(limit - 1):]
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|") or " "


def changed_examples(before: list[dict] | None, after: list[dict], limit: int) -> tuple[list[str], int]:
    """Table rows for the examples whose fine-tuned prediction changed, matched by input (an input
    the baseline does not have counts as changed: a new test split shows its first examples); and
    how many examples both sides have."""
    old = {row["input"]: row for row in before or []}
    rows = []
    for row in after:
        previous = old.get(row["input"])
        if previous is not None and previous.get("finetuned") == row.get("finetuned"):
            continue
        was = cell(previous["finetuned"], 40) if previous else "—"
        mark = "✅" if str(row.get("finetuned", "")).strip() == str(row.get("reference", "")).strip() else "❌"
        rows.append(f"| {cell(row['input'])} | {cell(row.get('reference', ''), 40)} | {cell(row.get('base', ''), 40)} "
                    f"| {was} | {cell(row.get('finetuned', ''), 40)} {mark} |")
    return rows[:limit], sum(1 for row in after if row["input"] in old)


def build_report(repo: Path, base: str, plots_dir: Path | None = None, plots_url: str | None = None,
                 reproduce: str | None = None, examples: int = 5, head: str = "workspace") -> str:
    lines = [MARKER, f"## Fine-tuning report: `{base}` → `{head}`", ""]

    params = dvc("params", "diff", base, "--md", cwd=repo)
    lines += ["### Params changed", "", table_or(params, "No params changed."), ""]

    metrics = dvc("metrics", "diff", base, "--md", cwd=repo)
    lines += ["### Metrics", "", table_or(metrics, "No metric changed."), ""]

    if plots_dir is not None:
        dvc("plots", "diff", base, "--out", str(plots_dir.resolve()), cwd=repo)
        where = f"[the plots diff]({plots_url})" if plots_url else f"`{plots_dir}/index.html`"
        lines += ["### Plots", "", f"Loss curves and the other DVC plots, `{base}` against this change: {where} "
                  f"(`dvc plots diff {base}` renders the same page locally).", ""]

    after_path = repo / EXAMPLES
    if after_path.exists():
        before_text = committed(base, EXAMPLES, repo)
        before = json.loads(before_text) if before_text else None
        rows, compared = changed_examples(before, json.loads(after_path.read_text(encoding="utf-8")), examples)
        lines += ["### Example predictions", ""]
        if before is None:
            lines += [f"`{base}` has no `{EXAMPLES}`; the first {len(rows)} of this change:", ""]
        elif not rows:
            lines += [f"No fine-tuned prediction changed ({compared} examples compared).", ""]
        else:
            lines += [f"Fine-tuned predictions that changed ({len(rows)} shown, {compared} examples compared; "
                      "an input absent from the base counts as changed):", ""]
        if rows:
            lines += [f"| input | reference | base model | before (`{base}`) | after |", "|---|---|---|---|---|",
                      *rows, ""]

    if reproduce is not None:
        lines += ["### Do the committed metrics reproduce?", "", "```", reproduce.strip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="git revision to compare against (default: main)")
    parser.add_argument("--head", default="workspace", help="name of this change in the title (e.g. a short sha)")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="repository root (default: the current folder)")
    parser.add_argument("--plots-dir", type=Path, help="render `dvc plots diff BASE` as HTML into this folder")
    parser.add_argument("--plots-url", help="where readers find the rendered plots (e.g. the CI run's artifacts)")
    parser.add_argument("--reproduce", type=Path, help="output of scripts/check_metrics.py to include")
    parser.add_argument("--examples", type=int, default=5, help="changed example predictions to show")
    parser.add_argument("--output", type=Path, help="write the Markdown here instead of stdout")
    args = parser.parse_args(argv)
    reproduce = args.reproduce.read_text(encoding="utf-8") if args.reproduce else None
    report = build_report(args.repo, args.base, args.plots_dir, args.plots_url, reproduce, args.examples, args.head)
    if args.output:
        args.output.write_text(report + "\n", encoding="utf-8")
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
