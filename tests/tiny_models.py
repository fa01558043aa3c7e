"""Tiny random models with tokenizers built in code (offline): a BERT for `classify`, a Llama with a ChatML-like
chat template for `chat`. Saved as ordinary model directories, so every loading path is the real one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("the a is not has more than saw all some are in of and premise hypothesis what relation to answer with "
         "one word : . , ? ' s 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 entailment contradiction neutral "
         "not_entailment yes no user assistant").split()


def _word_tokenizer(specials: list[str], template: str | None = None):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if template == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   **({"cls_token": "[CLS]", "sep_token": "[SEP]"} if template == "bert" else
                                      {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))


def tiny_bert(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = _word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], template="bert")
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=3)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tiny_llama(path: Path, seed: int = 0, chat_template: bool = True) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = _word_tokenizer(["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"])
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_task_files(root: Path, name: str, labels: list[str], n: int = 48, seed: int = 0) -> Path:
    """A small learnable task: the label is a function of the numbers in the pair, plus a YAML task file."""
    import random

    rng = random.Random(seed)
    for split, size in (("train", n), ("validation", n // 2), ("test", n // 2)):
        rows = []
        for i in range(size):
            a, b = rng.randrange(20), rng.randrange(20)
            label = labels[0] if a > b else labels[1 % len(labels)] if a < b else labels[-1]
            rows.append({"id": f"{split}-{i}", "premise": f"the a has {a} .", "hypothesis": f"the a has {b} .",
                         "label": label})
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task_file = root / f"{name}.yaml"
    task_file.write_text(json.dumps({name: {"labels": labels, "files": {
        s: f"{name}/{s}.jsonl" for s in ("train", "validation", "test")}}}))
    return task_file


KEYWORDS = ("yes", "no", "some", "all")


def write_keyword_task(root: Path, name: str, labels: list[str], n: int = 96, seed: int = 0) -> Path:
    """A task whose label is a simple function of the input: the hypothesis's last word names the label
    (`yes`, `no`, `some`, ... in the order of `labels`); the premise is random filler. Plus its YAML task file."""
    import random

    rng = random.Random(seed)
    filler = [w for w in WORDS[:12] if w not in KEYWORDS]
    for split, size in (("train", n), ("validation", n // 2), ("test", n // 2)):
        rows = []
        for i in range(size):
            k = rng.randrange(len(labels))
            premise = " ".join(rng.choice(filler) for _ in range(rng.randrange(1, 4)))
            rows.append({"id": f"{split}-{i}", "premise": premise, "hypothesis": KEYWORDS[k],
                         "label": labels[k]})
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task_file = root / f"{name}.yaml"
    task_file.write_text(json.dumps({name: {"labels": labels, "files": {
        s: f"{name}/{s}.jsonl" for s in ("train", "validation", "test")}}}))
    return task_file


def tiny_sentence_bert(path: Path, seed: int = 0) -> Path:
    """The tiny BERT as a sentence-transformers model (a mean-pooling `1_Pooling/config.json`, as
    all-MiniLM-L6-v2 ships): lorafuse's classify head then reads mean pooling."""
    tiny_bert(path, seed)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return path
