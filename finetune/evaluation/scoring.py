"""The scoring every model form shares (the adapter model, the base, the merged and the quantized
models): batched generation, perplexity, label likelihood, and the task metrics of `evaluate.task`.
Inputs go to the model's own device; logits are computed only where they are scored, in batches
bounded by `LOGITS_BUDGET_BYTES`, so a 152k vocabulary does not cost gigabytes.

The evaluate stages (evaluation.py) and quantize both import it, so quantize depends on this module
and not on the evaluate stage's script. The metric functions live in task_metrics.py, the code
sandbox in sandbox.py.
"""
from __future__ import annotations

import logging
import math

from finetune.data import IGNORE
from finetune.evaluation.task_metrics import (STOP_SEQUENCES, classification_metrics, coding_metrics, cut_at_stop,
                                              extract_tests, generation_metrics, normalise_label, parse_label, program,
                                              qa_metrics)

log = logging.getLogger("finetune.scoring")


# --------------------------------------------------------------------------- model passes
# Logits are the largest tensors of evaluation: [rows, positions, vocabulary], 4 bytes each, ~5 GB for 32 x 256
# tokens of a 152k vocabulary. A pass asks the model for logits only at the positions it scores
# (`logits_to_keep`, as training does) and groups rows so that rows x kept positions x vocabulary stays within
# this many bytes, counting the float32 copy and log-softmax that scoring makes of them.
LOGITS_BUDGET_BYTES = 256 * 2**20
NLL_BYTES_PER_LOGIT = 12  # the logits (up to 4 bytes), their float32 copy, cross_entropy's float32 log-softmax
ARGMAX_BYTES_PER_LOGIT = 4


def input_device(model):
    """Where a model's inputs go: its own device (transformers, peft), else the CPU (a llama.cpp model)."""
    return getattr(model, "device", None) or "cpu"


def virtual_tokens(model) -> int:
    """Prompt tuning (peft) prepends this many virtual tokens to every input; their logits come first."""
    config = getattr(model, "active_peft_config", None)
    return config.num_virtual_tokens if config is not None and config.is_prompt_learning else 0


def keeps_logits(model) -> bool:
    """Whether the model computes logits only at the positions asked for (`logits_to_keep`); a llama.cpp model
    (llamacpp.LlamaCppLM) returns every position whatever it is asked."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(inner, "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


def vocab_size(model) -> int:
    """Rows of the output layer; asked of the model itself when it has none to show (llama.cpp)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    size = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if size:
        return size
    with torch.no_grad():
        return model(input_ids=torch.zeros((1, 1), dtype=torch.long)).logits.shape[-1]


def logit_passes(model, sequences: list[list[int]], wanted: list[list[int]], batch_size: int,
                 budget: int = LOGITS_BUDGET_BYTES, bytes_per_logit: int = NLL_BYTES_PER_LOGIT):
    """Run `sequences` through the model in batches of similar length (right padding, attention mask) and yield
    (indices, positions, logits): logits[row, j] predicts the token after position positions[j] of
    sequences[indices[row]], for the union of the rows' `wanted` positions. A batch holds at most `batch_size`
    rows and at most `budget` bytes of logits; a single row whose logits alone exceed it is run once per chunk of
    positions. Nothing is computed for rows that want no position."""
    import torch

    device, honours, virtual = input_device(model), keeps_logits(model), virtual_tokens(model)
    vocab = vocab_size(model)
    order = [index for index in sorted(range(len(sequences)), key=lambda index: len(sequences[index])) if wanted[index]]

    def cost(rows: int, positions: set, width: int) -> int:  # a model without logits_to_keep returns every position
        return rows * (len(positions) if honours else width) * vocab * bytes_per_logit

    start = 0
    while start < len(order):
        batch, positions, width = [order[start]], set(wanted[order[start]]), len(sequences[order[start]])
        while len(batch) < batch_size and start + len(batch) < len(order):
            candidate = order[start + len(batch)]
            grown, grown_width = positions | set(wanted[candidate]), max(width, len(sequences[candidate]))
            if cost(len(batch) + 1, grown, grown_width) > budget:
                break
            batch.append(candidate)
            positions, width = grown, grown_width
        start += len(batch)
        ids = torch.tensor([sequences[i] + [0] * (width - len(sequences[i])) for i in batch], device=device)
        mask = torch.tensor([[1] * len(sequences[i]) + [0] * (width - len(sequences[i])) for i in batch], device=device)
        positions = sorted(positions)
        step = max(1, budget // (len(batch) * vocab * bytes_per_logit)) if honours else len(positions)
        for first in range(0, len(positions), step):
            chunk = positions[first:first + step]
            with torch.no_grad():
                if honours:
                    keep = torch.tensor(chunk, device=device) + virtual
                    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
                else:  # every position came back, virtual tokens first
                    logits = model(input_ids=ids, attention_mask=mask).logits
                    logits = logits[:, logits.shape[1] - width + torch.tensor(chunk, device=logits.device)]
            yield batch, chunk, logits


def sequence_logprobs(model, sequences: list[tuple[list[int], list[int]]], batch_size: int,
                      budget: int = LOGITS_BUDGET_BYTES) -> list[tuple[float, int]]:
    """(sum of log p(target), number of targets) for each (input_ids, labels); labels of -100 are not
    scored. Logits are computed only where a target is scored, within `budget` bytes (see logit_passes)."""
    import torch

    wanted = [[position for position in range(len(labels) - 1) if labels[position + 1] != IGNORE]
              for _, labels in sequences]
    totals = [0.0] * len(sequences)
    for batch, chunk, logits in logit_passes(model, [ids for ids, _ in sequences], wanted, batch_size, budget):
        targets = torch.tensor([[sequences[i][1][p + 1] if p + 1 < len(sequences[i][1]) else IGNORE for p in chunk]
                                for i in batch], device=logits.device)
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE,
                                                reduction="none")
        for row, index in enumerate(batch):
            totals[index] -= nll[row].sum().item()
    return [(total, len(positions)) for total, positions in zip(totals, wanted)]


def argmax_tokens(model, sequences: list[list[int]], batch_size: int, budget: int = LOGITS_BUDGET_BYTES) -> list[list[int]]:
    """The most likely next token at every position of every sequence, batched within `budget` bytes of logits."""
    found: list[dict] = [{} for _ in sequences]
    wanted = [list(range(len(ids))) for ids in sequences]
    for batch, chunk, logits in logit_passes(model, sequences, wanted, batch_size, budget, ARGMAX_BYTES_PER_LOGIT):
        best = logits.argmax(-1).tolist()
        for row, index in enumerate(batch):
            found[index].update((position, token) for position, token in zip(chunk, best[row])
                                if position < len(sequences[index]))
    return [[tokens[position] for position in range(len(ids))] for tokens, ids in zip(found, sequences)]


def perplexity(model, rows: list[dict], batch_size: int) -> float:
    """exp(mean NLL) over the target (unmasked) tokens, as training measures loss."""
    scored = sequence_logprobs(model, [(row["input_ids"], row["labels"]) for row in rows], batch_size)
    return math.exp(-sum(logprob for logprob, _ in scored) / max(sum(count for _, count in scored), 1))


def stop_ids(model, tokenizer) -> list[int]:
    """End-of-turn tokens: the tokenizer's EOS and the model's generation config (chat models often differ)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({token for token in [tokenizer.eos_token_id, *configured] if token is not None})


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, num_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, completion: bool = False,
             allowed: dict[tuple, list[int]] | None = None) -> list[str]:
    """Batched, left-padded generation with the KV cache, on the model's device: greedy, or `num_samples`
    sampled answers per prompt (returned consecutively). Prompts are batched by length, answers come back in
    order. transformers computes logits only at the last position of each step. A chat prompt already holds
    its special tokens and the answer comes back stripped; a `completion` prompt (plain code) gets the
    tokenizer's own (BOS where it adds one), stops at HumanEval's stop sequences, and comes back as generated
    up to the first of them: its indentation is part of the program. `allowed` (label_prefixes) restricts greedy
    decoding to the token sequences it holds: each step may only continue one of them."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if num_samples > 1 else {"do_sample": False}
    if completion and isinstance(model, torch.nn.Module):  # transformers stops a row at them; llama.cpp is cut below
        sampling.update(stop_strings=list(STOP_SEQUENCES), tokenizer=tokenizer)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=completion)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda index: lengths[index])
    answers: list = [None] * len(prompts)
    stops = stop_ids(model, tokenizer)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        encoded = tokenizer([prompts[index] for index in batch], return_tensors="pt", padding=True,
                            add_special_tokens=completion).to(input_device(model))  # a chat template placed BOS
        if allowed is not None:
            width = encoded["input_ids"].shape[1]
            sampling["prefix_allowed_tokens_fn"] = lambda row, ids: allowed.get(tuple(ids[width:].tolist()), stops)
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, use_cache=True,
                                       num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=stops, **sampling)
        texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        texts = [cut_at_stop(text) if completion else text.strip() for text in texts]
        for position, index in enumerate(batch):
            answers[index] = texts[position * num_samples:(position + 1) * num_samples]
    return [text for group in answers for text in group]


def label_prefixes(tokenizer, rows: list[dict], choices: list[str]) -> dict[tuple, list[int]]:
    """Constrained decoding's table: for every prefix of every label's tokens (the label and the template's end of
    turn, encoded as label_likelihood encodes them), the tokens that may come next. A step outside the table may
    only stop."""
    table: dict[tuple, set] = {}
    for continuation in label_continuations(tokenizer, rows[0], choices)[1]:
        for position, token in enumerate(continuation):
            table.setdefault(tuple(continuation[:position]), set()).add(token)
    return {prefix: sorted(tokens) for prefix, tokens in table.items()}


def label_continuations(tokenizer, row: dict, choices: list[str]) -> tuple[list[int], list[list[int]]]:
    """`row`'s prompt tokens, and each choice's tokens as its answer: the choice plus the end of turn the template
    puts after an answer (taken from the row's own reference, as trained)."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = encode(row["prompt"])
    answer = tokenizer.decode(row["input_ids"][len(prompt):])
    found = answer.find(row["reference"].strip())
    end = answer[found + len(row["reference"].strip()):] if found >= 0 else ""
    return prompt, [encode(choice + end) for choice in choices]


def label_likelihood(model, tokenizer, rows: list[dict], choices: list[str], batch_size: int) -> list[str]:
    """For each row, the choice the model finds most likely as the whole answer (its tokens plus the
    template's end of turn, so a label that is a prefix of another does not win by being short)."""
    sequences = []
    for row in rows:
        prompt, continuations = label_continuations(tokenizer, row, choices)
        for continuation in continuations:
            sequences.append((prompt + continuation, [IGNORE] * len(prompt) + continuation))
    scores = [logprob for logprob, _ in sequence_logprobs(model, sequences, batch_size)]
    width = len(choices)
    return [choices[max(range(width), key=lambda j: scores[i * width + j])] for i in range(len(rows))]


def label_choices(rows: list[dict], cfg) -> list[str]:
    """The classes: `evaluate.classification.labels`, or each distinct test reference (first spelling)."""
    if cfg.labels:
        return list(cfg.labels)
    seen: dict[str, str] = {}
    for row in rows:
        seen.setdefault(normalise_label(row["reference"]), row["reference"].strip())
    return [seen[key] for key in sorted(seen)]


def check_coding_rows(rows: list[dict], tokenizer, prompting: str) -> list[list[str]]:
    """Each row's test cases: its `tests` (HumanEval and MBPP rows keep them as data), else the `assert` lines
    of its prompt (assert-in-prompt rows)."""
    specials = {*getattr(tokenizer, "all_special_tokens", []), *getattr(tokenizer, "get_added_vocab", dict)()}
    tests = [row["tests"] if row.get("tests") else extract_tests(row["prompt"], specials) for row in rows]
    missing = [row["id"] for row, found in zip(rows, tests) if not found]
    if missing:
        raise SystemExit(f"evaluate.task=coding: {len(missing)} test rows have no tests and no `assert` line in their "
                         f"prompt (first: {missing[0]}); a coding problem is a HumanEval or MBPP row, or states its "
                         "tests in the prompt (see examples/coding)")
    if prompting == "completion" and not all(row.get("code_prompt") for row in rows):
        first = next(row["id"] for row in rows if not row.get("code_prompt"))
        raise SystemExit(f"evaluate.coding.prompting=completion: test row {first} has no code prompt to continue; "
                         "completion needs HumanEval- or MBPP-format rows (ingest format humaneval/mbpp); use "
                         "prompting: chat for assert-in-prompt rows")
    return tests


def generate_code(model, tokenizer, rows: list[dict], cfg, max_new_tokens: int, batch_size: int,
                  num_samples: int) -> list[str]:
    """`num_samples` answers per row (consecutive) under `cfg.prompting`: the row's templated chat prompt, or
    its code prompt continued as text."""
    completion = cfg.prompting == "completion"
    prompts = [row["code_prompt"] if completion else row["prompt"] for row in rows]
    return generate(model, tokenizer, prompts, max_new_tokens, batch_size, num_samples, cfg.temperature, cfg.top_p,
                    completion=completion)


def program_outcomes(texts: list[str], rows: list[dict], tokenizer, cfg, samples: int) -> list[list]:
    """sandbox.Outcome of each answer (`samples` per row, consecutive in `texts`): the program that
    task_metrics.program makes of it, then the row's test setup, run against the row's tests, contained."""
    from finetune.evaluation.sandbox import check_works, isolation, run_tests

    tests = check_coding_rows(rows, tokenizer, cfg.prompting)
    check_works()
    log.info("coding: running %d programs contained (%s)", len(texts), isolation())
    return [[run_tests("\n\n".join(part for part in (program(row, text, cfg.prompting), row.get("test_setup")) if part),
                       tests[i], cfg.timeout_seconds, cfg.memory_mb)
             for text in texts[i * samples:(i + 1) * samples]] for i, row in enumerate(rows)]


def score_programs(texts: list[str], rows: list[dict], tokenizer, cfg) -> dict:
    """pass@k and the other coding metrics of `cfg.num_samples` answers per row (consecutive in `texts`)."""
    return coding_metrics(program_outcomes(texts, rows, tokenizer, cfg, cfg.num_samples), cfg.k)


def evaluate_model(model, tokenizer, rows: list[dict], cfg) -> tuple[dict, list[str]]:
    """Pure core shared by every model form (adapter, merged, quantized): `task.*` metrics and
    perplexity, and one output per row (the first sample for coding)."""
    prompts = [row["prompt"] for row in rows]
    references = [row["reference"].strip() for row in rows]
    if cfg.task == "classification":
        choices = label_choices(rows, cfg.classification)
        if cfg.classification.scoring == "likelihood":
            outputs = label_likelihood(model, tokenizer, rows, choices, cfg.batch_size)
        else:
            allowed = label_prefixes(tokenizer, rows, choices) if cfg.classification.scoring == "constrained" else None
            longest = max((len(tokens) for tokens in allowed), default=0) + 1 if allowed else cfg.max_new_tokens
            outputs = generate(model, tokenizer, prompts, max(cfg.max_new_tokens, longest), cfg.batch_size,
                               allowed=allowed)
        labels = [normalise_label(choice) for choice in choices]
        task = classification_metrics([parse_label(output, labels) for output in outputs],
                                      [normalise_label(reference) for reference in references])
    elif cfg.task == "coding":
        check_coding_rows(rows, tokenizer, cfg.coding.prompting)  # before any generation
        texts = generate_code(model, tokenizer, rows, cfg.coding, cfg.max_new_tokens, cfg.batch_size,
                              cfg.coding.num_samples)
        task, outputs = score_programs(texts, rows, tokenizer, cfg.coding), texts[::cfg.coding.num_samples]
    else:
        outputs = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
        task = (qa_metrics if cfg.task == "qa" else generation_metrics)(outputs, references)
    metrics = {f"task.{name}": round(value, 5) for name, value in task.items()}
    metrics["perplexity"] = round(perplexity(model, rows, cfg.batch_size), 5)
    return metrics, outputs
