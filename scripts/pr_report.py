"""The pull-request comment: what this change did to the model, against the base branch.

    python scripts/pr_report.py --base origin/main [--plots-dir plots-diff] [--plots-url URL] \
        [--reproduce reproduce.txt] [--examples 5] > report.md

Run in the repository after `dvc repro`, so the workspace holds this change's results. It opens with the
headline (metrics/headline.json, written by stages/headline.py) as a before/after table with the change and
a verdict per row: better, worse, or same within the noise that row states. Then the example predictions
(metrics/examples.json) whose fine-tuned output changed, the plots diff (`dvc plots diff BASE -o DIR`, an
HTML page to upload; `--plots-url` links to it), optionally the result of scripts/check_metrics.py (do the
committed metrics reproduce?), and last, collapsed, the full `dvc params diff BASE --md` and
`dvc metrics diff BASE --md`. The comment stays under 60,000 characters whatever changed (GitHub refuses
comments over 65,536): what does not fit is cut, with a note naming what was cut and the command that shows
it all. The first line is a hidden marker so a workflow can find and update its previous comment.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's package
from finetune.runtime.files import write_text  # noqa: E402

MARKER = "<!-- finetune-pr-report -->"
EXAMPLES = "metrics/examples.json"
HEADLINE = "metrics/headline.json"
LIMIT = 60_000  # characters; GitHub refuses a comment over 65,536
NOISE_NOTE = ("Noise: a score in [0, 1] over the test rows (the task metric, its base value, a quantized "
              "format's change) is *same* within 2 binomial standard errors, 2·sqrt(p(1-p)/n), which bound "
              "the error of any per-example score in [0, 1]; the others within the stated margin.")


def dvc(*args: str, cwd: Path) -> str:
    """Run the real dvc of this interpreter's environment; a failure is an error naming the command."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"`dvc {' '.join(args)}` failed ({result.returncode}):\n{result.stderr.strip()}")
    return result.stdout.strip()


def committed(rev: str, path: str, cwd: Path) -> str | None:
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


# --------------------------------------------------------------------------- the headline table
def rule(name: str) -> tuple[str | None, str, float]:
    """How a change of one headline number (names from stages/headline.py) is judged: the better direction
    (None: neither, the verdict is "changed"), the kind of noise and its size."""
    if name in ("Perplexity", "Base perplexity", "Train loss", "Eval loss"):
        return "lower", "relative", 0.01
    if name == "Forgetting":  # the general tasks' size is in no metrics file: a stated margin
        return "lower", "absolute", 0.02
    if name == "Train tokens_per_second":  # a timing: the machine and its load move it
        return "higher", "relative", 0.10
    if name.endswith(" size ratio"):
        return "lower", "relative", 0.01
    if name.endswith(" change"):  # a quantized format's main metric minus the merged model's
        return "higher", "binomial", 0.0
    if re.fullmatch(r"(Base )?(Accuracy|accuracy|ROUGE-L|F1|Pass@\d+|pass@\d+)", name):
        return "higher", "binomial", 0.0
    return None, "exact", 0.0  # Trainable params, Test rows, and any name this report does not know


def number(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def judge(name: str, before, after, rows: int | None, main: float | None) -> tuple[str, str, str]:
    """(change, noise, verdict) of one headline row."""
    if before is None or after is None:
        return "—", "", "new" if before is None else "gone"
    better, kind, size = rule(name)
    change = after - before
    shown = f"{change:+,.4g}" if abs(change) < 1000 else f"{change:+,.0f}"
    if kind == "relative":
        margin, noise = size * abs(before), f"±{size:.0%}"
        if before:
            shown += f" ({change / abs(before):+.1%})"
    elif kind == "absolute":
        margin, noise = size, f"±{size:g}"
    elif kind == "binomial" and rows:
        p = min(max(main if name.endswith(" change") and main is not None else (before + after) / 2, 0.0), 1.0)
        margin = 2 * math.sqrt(p * (1 - p) / rows)
        noise = f"±{margin:.2g} (2 SE, {rows} rows)"
    elif kind == "binomial":
        margin, noise = 0.01, "±0.01 (no test size)"
    else:
        margin, noise = 0.0, "exact"
    if abs(change) <= margin + 1e-12:
        return shown, noise, "same"
    if better is None:
        return shown, noise, "changed"
    return shown, noise, "better" if (change > 0) == (better == "higher") else "worse"


def headline_table(before: dict | None, after: dict | None, base: str, head: str) -> list[str]:
    if after is None:
        return [f"No `{HEADLINE}` in the workspace: run `dvc repro` first."]
    before = before or {}
    rows = after.get("Test rows") or before.get("Test rows")
    main = next(iter(after.values()), None)  # the headline's first number is the task's main metric
    lines = [f"| | better | `{base}` | `{head}` | change | noise | verdict |", "|---|---|--:|--:|--:|---|---|"]
    for name in [*after, *(key for key in before if key not in after)]:
        change, noise, verdict = judge(name, before.get(name), after.get(name), rows, main)
        better = rule(name)[0] or "—"
        mark = {"better": "**better**", "worse": "**worse**"}.get(verdict, verdict)
        lines.append(f"| {name} | {better} | {number(before.get(name))} | {number(after.get(name))} | {change} "
                     f"| {noise} | {mark} |")
    if not before:
        lines += ["", f"`{base}` has no `{HEADLINE}`: every row is new."]
    return lines


# --------------------------------------------------------------------------- example predictions
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


def example_section(repo: Path, base: str, limit: int) -> list[str]:
    after_path = repo / EXAMPLES
    if not after_path.exists():
        return []
    before_text = committed(base, EXAMPLES, repo)
    before = json.loads(before_text) if before_text else None
    rows, compared = changed_examples(before, json.loads(after_path.read_text(encoding="utf-8")), limit)
    lines = ["### Example predictions", ""]
    if before is None:
        lines += [f"`{base}` has no `{EXAMPLES}`; the first {len(rows)} of this change:", ""]
    elif not rows:
        lines += [f"No fine-tuned prediction changed ({compared} examples compared).", ""]
    else:
        lines += [f"Fine-tuned predictions that changed ({len(rows)} shown, {compared} examples compared; "
                  "an input absent from the base counts as changed):", ""]
    if rows:
        lines += [f"| input | reference | base model | before (`{base}`) | after |", "|---|---|---|---|---|", *rows, ""]
    return lines


# --------------------------------------------------------------------------- the long parts, cut to fit
def compact(table: str) -> list[str]:
    """dvc's --md table without the padding that aligns its columns (a third of its size or more)."""
    rows = []
    for line in table.splitlines():
        cells = [part.strip() for part in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append("| " + " | ".join("---" if re.fullmatch(r":?-+:?", cell) else cell for cell in cells) + " |")
    return rows


def fit(lines: list[str], budget: int, keep: int, what: str, command: str) -> tuple[list[str], list[str]]:
    """(`lines` cut to `budget` characters, the first `keep` always kept; a note naming what was cut and the
    command that shows it all, or nothing)."""
    if sum(len(line) + 1 for line in lines) <= budget:
        return lines, []
    kept, size = lines[:keep], sum(len(line) + 1 for line in lines[:keep]) + 200  # room for the note
    for line in lines[keep:]:
        if size + len(line) + 1 > budget:
            break
        kept.append(line)
        size += len(line) + 1
    return kept, ["", f"*… {len(lines) - len(kept)} more {what} cut to keep this comment under {LIMIT:,} "
                      f"characters; all of them: `{command}`*"]


def details(summary: str, lines: list[str], note: list[str]) -> list[str]:
    return ["<details>", f"<summary>{summary}</summary>", "", *lines, *note, "", "</details>", ""]


def build_report(repo: Path, base: str, plots_dir: Path | None = None, plots_url: str | None = None,
                 reproduce: str | None = None, examples: int = 5, head: str = "workspace") -> str:
    params = compact(dvc("params", "diff", base, "--md", cwd=repo))
    metrics = compact(dvc("metrics", "diff", base, "--md", cwd=repo))
    after_path = repo / HEADLINE
    after = json.loads(after_path.read_text(encoding="utf-8")) if after_path.exists() else None
    before_text = committed(base, HEADLINE, repo)
    before = json.loads(before_text) if before_text else None

    lines = [MARKER, f"## Fine-tuning report: `{base}` → `{head}`", "", "### Headline", "",
             *headline_table(before, after, base, head), "", NOISE_NOTE, ""]
    shown, note = fit(example_section(repo, base, examples), LIMIT // 4, 0, "example lines",
                      f"git diff {base} -- {EXAMPLES}")
    lines += shown + note
    if plots_dir is not None:
        dvc("plots", "diff", base, "--out", str(plots_dir.resolve()), cwd=repo)
        where = f"[the plots diff]({plots_url})" if plots_url else f"`{plots_dir}/index.html`"
        lines += ["### Plots", "", f"Loss curves and the other DVC plots, `{base}` against this change: {where} "
                  f"(`dvc plots diff {base}` renders the same page locally).", ""]
    if reproduce is not None:
        shown, note = fit(reproduce.strip().splitlines(), LIMIT // 8, 1, "lines",
                          "python scripts/check_metrics.py metrics --rev HEAD")
        lines += ["### Do the committed metrics reproduce?", "", "```", *shown, "```", *note, ""]

    # the two diffs share what is left; one that needs less leaves the rest to the other
    left = LIMIT - sum(len(line) + 1 for line in lines) - 1_000
    params_size, metrics_size = (sum(len(line) + 1 for line in table) for table in (params, metrics))
    params_budget = max(left // 2, left - metrics_size)
    metrics_budget = left - min(params_size, params_budget)
    if len(params) > 2:
        lines += details(f"Params changed: {len(params) - 2}",
                         *fit(params, params_budget, 2, "params", f"dvc params diff {base} --md"))
    else:
        lines += ["No params changed.", ""]
    if len(metrics) > 2:
        lines += details(f"Metrics changed: {len(metrics) - 2} (every metrics file)",
                         *fit(metrics, metrics_budget, 2, "metrics", f"dvc metrics diff {base} --md"))
    else:
        lines += ["No metric changed.", ""]
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
        write_text(args.output, report + "\n")
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
