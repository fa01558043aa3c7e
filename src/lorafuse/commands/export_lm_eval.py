"""`lorafuse export-lm-eval`: lm-evaluation-harness tasks for lorafuse's NLI tasks in the chat formulation, built
from the same split and the same prompt `lorafuse eval` uses, so that

    lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER,dtype=float32 \\
        --tasks lorafuse_mnli,lorafuse_rte --include_path OUT

scores an adapter outside lorafuse. OUT holds, per task, `lorafuse_<task>.jsonl` (one example a line: the prompt
exactly as lorafuse renders it for the model's tokenizer — the chat template applied, generation prompt included,
a long premise cut as `lorafuse eval --max-length` cuts it — the gold label's index, and the raw pair) and two
task YAMLs reading it (`dataset_path: json`, so evaluation needs no lorafuse):

- `lorafuse_<task>`: choices are the label words (with the text lorafuse puts before them: nothing after a chat
  template, a space after the plain `Answer:` prompt); lm-eval's `acc` sums the log-likelihood of each choice's
  whole continuation, its `acc_norm` divides that by the choice's length in characters.
- `lorafuse_<task>_token`: choices are cut after each label's distinguishing token (the first token where the
  labels' tokenizations differ): the tokens before it are the same for every label, so lm-eval's `acc` is then
  lorafuse's own decision — the argmax over the labels' distinguishing-token log-probabilities.

The two agree exactly when every label word is one token (so does `lorafuse eval`); on a BPE tokenizer where a
label word is several tokens (SmolLM2: `entailment` = `ent` `ail` `ment`) the full-word scores add the later
tokens' log-likelihoods and can pick another label. Tokenization at the prompt/answer boundary is lm-eval's
(prompt and answer tokenized together, then split), lorafuse's is the prompt's and the answer's tokens
concatenated; with a tokenizer that merges across that boundary the two can differ by a token.

Run the exported tasks WITHOUT `--apply_chat_template` (the prompts already hold the template; lm-eval's
warning that an instruct model runs without it is expected) and without few-shot examples, from inside OUT: the
YAMLs name their JSONL relative to it (an export names no directory of the machine that wrote it), and `datasets`
resolves such a path against the working directory."""

from __future__ import annotations

import argparse

from lorafuse.validate import positive_int

PREFIX = "lorafuse_"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Scoring: lorafuse scores each label's distinguishing token at the answer position; lm-eval's "
                "multiple_choice sums the log-likelihood of each choice's whole continuation. They agree exactly "
                "when every label word is one token, and may differ on BPE tokenizers (e.g. SmolLM2, where "
                "label words are several tokens): the lorafuse_<task>_token variant cuts the choices after the "
                "distinguishing token, so its acc is lorafuse's decision. Run without --apply_chat_template: "
                "the exported prompts already hold the model's chat template.")
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. mnli,rte")
    p.add_argument("--data-dir", help="directory of <task>/<split>.jsonl (e.g. ../shared/data/nli)")
    p.add_argument("--task-file", action="append", default=[], help="YAML defining extra tasks (repeatable)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--max-examples", type=positive_int, help="export at most this many examples per task")
    p.add_argument("--model", default="smollm2",
                   help="the base model whose tokenizer and chat template render the prompts (smollm2, or a "
                        "Hugging Face id / local path of a causal LM)")
    p.add_argument("--max-length", type=positive_int,
                   help="token limit per example, as `lorafuse eval --max-length` (default: the chat "
                        "formulation's 256)")
    p.add_argument("-o", "--output", required=True, help="directory to write the task YAMLs and JSONL into")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output written by lorafuse")


def choice_texts(chat, task) -> tuple[list[str], list[str]]:
    """(each label's answer text as lorafuse appends it, the same text cut after its distinguishing token)."""
    space = "" if getattr(chat.tokenizer, "chat_template", None) else " "
    prefix, _ = chat.scoring(task)  # refuses labels one token cannot tell apart, as `lorafuse eval` does
    full = [space + lab for lab in task.labels]
    return full, [_through_token(chat.tokenizer, text, len(prefix)) for text in full]


def _through_token(tokenizer, text: str, index: int) -> str:
    """`text` up to the end of its token `index` (character offsets of a fast tokenizer; else decoded)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    if "offset_mapping" in enc:
        return text[:enc["offset_mapping"][index][1]]
    return tokenizer.decode(enc["input_ids"][:index + 1])


def task_rows(chat, task, examples) -> tuple[list[dict], int]:
    """One JSONL row per example: the prompt lorafuse scores, the gold index, the pair; and how many prompts
    are longer than the token limit even with the premise gone (lorafuse cuts their start, lm-eval does not)."""
    answers = chat.answer_ids(task)
    rows, over = [], 0
    for ex in examples:
        target = task.labels.index(ex.label)
        room = chat.max_length - len(answers[target])
        fitted, ids = chat.fitted_example(task, ex, room)
        over += len(ids) > room
        rows.append({"id": ex.id, "prompt": chat.prompt(task, fitted), "target": target, "label": ex.label,
                     "premise": ex.premise, "hypothesis": ex.hypothesis})
    return rows, over


def task_yaml(name: str, data_file: str, choices: list[str], description: str) -> str:
    """An lm-eval task: the JSONL's `test` split, its prompt as the context, the choices after it as they are."""
    import yaml

    config = {
        "task": name,
        "tag": ["lorafuse"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_target": "target",
        "doc_to_choice": choices,
        "target_delimiter": "",
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return f"# {description}\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from transformers import AutoTokenizer

    from lorafuse.atomic import atomic_output_dir, check_output
    from lorafuse.errors import ConfigError
    from lorafuse.model.formulations import Chat
    from lorafuse.model.models import check_max_length, resolve_model
    from lorafuse.tasks import get_task, load_task_file
    from lorafuse.validate import check_apart, user_path

    for task_file in args.task_file:
        load_task_file(task_file)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks: give at least one task name")
    tasks = [get_task(n) for n in names]
    inputs = [(flag, path) for flag, path in (("--data-dir", args.data_dir), ("--model", args.model))
              if path and user_path(path).exists()] + [("--task-file", path) for path in args.task_file]
    check_apart(args.output, inputs, "-o")
    out = check_output(args.output, args.overwrite, "lm-eval-tasks")
    info = resolve_model(args.model)
    if info.formulation != "chat":
        raise ConfigError(f"--model {args.model}: an encoder (lorafuse's classify formulation); lm-eval's "
                          "multiple_choice scores a causal language model's chat prompts (e.g. --model smollm2)")
    check_max_length(info.path, args.max_length)
    chat = Chat(AutoTokenizer.from_pretrained(info.path), args.max_length or 256)
    exported = {}
    with atomic_output_dir(out, args.overwrite, kind="lm-eval-tasks") as tmp:
        for task in tasks:
            rows, over = task_rows(chat, task, task.load(args.split, args.data_dir, args.max_examples))
            full, token = choice_texts(chat, task)
            data = f"{PREFIX}{task.name}.jsonl"
            (tmp / data).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                    encoding="utf-8")
            where = data  # relative: lm_eval runs from inside OUT (see the module docstring)
            source = f"lorafuse task '{task.name}', split {args.split}, {len(rows)} examples, model {args.model}"
            (tmp / f"{PREFIX}{task.name}.yaml").write_text(task_yaml(
                f"{PREFIX}{task.name}", where, full, f"{source}: choices are the whole label words"),
                encoding="utf-8")
            (tmp / f"{PREFIX}{task.name}_token.yaml").write_text(task_yaml(
                f"{PREFIX}{task.name}_token", where, token,
                f"{source}: choices cut after each label's distinguishing token (lorafuse's scoring)"),
                encoding="utf-8")
            exported[task.name] = len(rows)
            if over:
                print(f"warning: task '{task.name}': {over} prompts exceed {chat.max_length} tokens even with the "
                      "premise cut away; lorafuse cuts their start, the exported prompt keeps it", file=sys.stderr)
    listed = ",".join(f"{PREFIX}{n}" for n in exported)
    print(f"wrote {out}: " + ", ".join(f"{PREFIX}{n} ({k} examples)" for n, k in exported.items()))
    print(f"cd {out} && lm_eval --model hf --model_args pretrained={info.path},peft=ADAPTER,dtype=float32 "
          f"--tasks {listed},{listed.replace(',', '_token,')}_token --include_path .")
    return 0
