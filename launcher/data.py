"""Rows -> token ids and labels, for every data format.

`datasets` reads the files and caches the tokenised result (its fingerprint covers the
tokenizer and the settings). What no library does for us is the part kept here: turning each
format into trained and masked segments, so the label of every token is decided in one place.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from launcher.recipe import FORMAT_FIELDS, DataSection, UserError

IGNORE = -100
PEEK_ROWS = 5
# Formats whose eval rows are scored on generated text, and the field that holds the reference. The
# reference is kept as written: the tokenised target may be cut by max_length, the reference is not.
REFERENCE_FIELDS = {"translation": "target", "qa": "answer"}


# ---------------------------------------------------------------- reading and peeking

def _kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    kinds = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in kinds:
        raise UserError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .json, .csv, .parquet or a datasets folder)")
    return kinds[suffix]


def peek_rows(path: str | Path, limit: int = PEEK_ROWS) -> list[dict]:
    """The first rows of a data file, read cheaply so bad data fails before any model loads."""
    path = Path(path)
    kind = _kind(path)
    if kind == "json" and path.suffix == ".jsonl":
        rows = []
        with path.open() as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path} row {number}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path} row {number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                if len(rows) == limit:
                    break
        return rows
    if kind == "json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data[:limit]):
            raise UserError(f"{path}: a .json data file must hold a list of objects")
        return data[:limit]
    if kind == "csv":
        with path.open(newline="") as handle:
            return [row for _, row in zip(range(limit), csv.DictReader(handle))]
    if kind == "parquet":
        import pyarrow.parquet as pq
        table = pq.ParquetFile(path).read_row_group(0)
        return table.slice(0, limit).to_pylist()
    from datasets import load_from_disk
    return load_from_disk(str(path)).select(range(limit)).to_list()


def check_rows(path: str | Path, data: DataSection) -> None:
    """Fail on the first peeked row that lacks a field the format needs, naming file, row and field."""
    rows = peek_rows(path)
    if not rows:
        raise UserError(f"{path}: no rows")
    required, _ = FORMAT_FIELDS[data.format]
    for number, row in enumerate(rows, start=1):
        for canonical in required:
            column = data.field(canonical)
            if column not in row:
                hint = f" (set data.fields.{canonical} to one of: {', '.join(map(str, row))})"
                raise UserError(f"{path} row {number}: missing field '{column}' needed by format {data.format}{hint}")
            value = row[column]
            if canonical == "messages":
                _check_messages(path, number, value)
            elif canonical == "label":
                if isinstance(value, bool) or not isinstance(value, (str, int)):
                    raise UserError(f"{path} row {number}: field '{column}' must be a label name or integer, got {value!r}")
            elif not isinstance(value, str):
                raise UserError(f"{path} row {number}: field '{column}' must be text, got {type(value).__name__}")


def _check_messages(path: Any, number: int, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{path} row {number}: field 'messages' must be a non-empty list of {{role, content}}")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise UserError(f"{path} row {number}: messages[{turn}] needs role system, user or assistant")
        if not isinstance(message.get("content"), str):
            raise UserError(f"{path} row {number}: messages[{turn}].content must be text")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{path} row {number}: messages has no assistant turn to train on")


def load_table(path: str | Path):
    """A `datasets.Dataset` from any supported source."""
    import datasets
    path = Path(path)
    kind = _kind(path)
    if kind == "folder":
        loaded = datasets.load_from_disk(str(path))
        return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(kind, data_files=str(path), split="train")


# ---------------------------------------------------------------- formats to segments

def to_segments(row: dict, data: DataSection, use_chat: bool) -> list[tuple[str, bool]] | list[dict]:
    """A row as chat messages (when the chat template applies) or as (text, trained) segments."""
    fmt, col = data.format, data.field
    if fmt == "chat":
        return row[col("messages")]
    if fmt == "text":
        return [(row[col("text")], True)]
    if fmt == "instruction":
        prompt = row[col("instruction")]
        extra = row.get(col("input")) or ""
        if use_chat:
            prompt, completion = (f"{prompt}\n\n{extra}" if extra else prompt), row[col("output")]
        else:
            prompt = f"### Instruction:\n{prompt}\n\n" + (f"### Input:\n{extra}\n\n" if extra else "") + "### Response:\n"
            completion = row[col("output")]
    elif fmt == "qa":
        context = row.get(col("context")) or ""
        prompt = data.qa_template.format(question=row[col("question")], context=f"Context: {context}\n" if context else "")
        completion = row[col("answer")]
        prompt = prompt if use_chat else prompt + "\n"
    elif fmt == "translation":
        prompt = data.prompt_template.format(source_lang=data.source_lang, target_lang=data.target_lang,
                                             source=row[col("source")])
        completion = row[col("target")]
        prompt = prompt if use_chat else prompt + "\n"
    else:  # completion
        prompt, completion = row[col("prompt")], row[col("completion")]
    if use_chat:
        system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
        return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return [(prompt, False), (completion, True)]


def chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Render a conversation with the tokenizer's template; each assistant reply (and its end tag) is trained."""
    def render(turns: list[dict], prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

    segments, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(messages[:index], True), render(messages[: index + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise UserError("the tokenizer's chat template does not render turns as prefixes of each other; "
                            "set data.chat_template: never")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    ends_on_reply = messages and messages[-1]["role"] == "assistant"  # then `done` is the whole render
    tail = "" if ends_on_reply else render(messages, False)[len(done):]
    return segments + ([(tail, False)] if tail else [])


def label_names(path: str | Path, data: DataSection, limit: int | None) -> list[str]:
    """Class names of a classification train file: its sorted unique labels (id i is names[i])."""
    table = load_table(path)
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    return sorted({str(label) for label in table[data.field("label")]})


@dataclass
class Encoder:
    """Tokenises one row into input_ids, labels and the length of its first prompt.

    causal-lm: one sequence, labels aligned with it (-100 on prompt tokens). seq2seq: input_ids are
    the prompt, labels the target (decoder side). classification: labels is [class id].
    """

    tokenizer: Any
    data: DataSection
    task: str = "causal-lm"
    label2id: dict[str, int] | None = None

    def __post_init__(self) -> None:
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.use_chat = self.data.chat_template == "auto" and has_template and self.task == "causal-lm"
        if self.data.format == "chat" and not has_template:
            raise UserError("data.format chat needs a tokenizer with a chat template; this model's tokenizer has none")
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("x")["input_ids"]
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []
        self.eos = self.tokenizer.eos_token or ""

    def segments(self, row: dict) -> list[tuple[str, bool]]:
        parts = to_segments(row, self.data, self.use_chat)
        if isinstance(parts[0], dict):  # chat messages
            return chat_segments(parts, self.tokenizer)
        return [(text + self.eos, True) if trained else (text, False) for text, trained in parts]

    def __call__(self, row: dict) -> dict:
        """One row (tests and peeks); training goes through `batch`, which gives the same result."""
        return {key: values[0] for key, values in self.batch({key: [value] for key, value in row.items()}).items()}

    def batch(self, columns: dict[str, list]) -> dict[str, list]:
        """A `datasets.map(batched=True)` batch: every segment of every row goes to the tokenizer in one
        call, which is several times faster than a call per segment."""
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        out = self._encode(rows)
        if self.task != "classification" and self.data.format in REFERENCE_FIELDS:
            out["reference"] = [str(row[self.data.field(REFERENCE_FIELDS[self.data.format])]) for row in rows]
        return out

    def _encode(self, rows: list[dict]) -> dict[str, list]:
        if self.task in ("classification", "seq2seq"):
            encoded = [self.classify(row) if self.task == "classification" else self.seq2seq(row) for row in rows]
            return {key: [row[key] for row in encoded] for key in ("input_ids", "labels", "prompt_len", "drop")}
        segments = [self.segments(row) for row in rows]
        texts = [text for parts in segments for text, _ in parts]
        pieces = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_len": [], "drop": []}
        for parts in segments:
            ids, labels = list(self.bos), [IGNORE] * len(self.bos)
            prompt_len = None
            for _, trained in parts:
                piece = next(pieces)
                if trained and prompt_len is None:
                    prompt_len = len(ids)
                ids += piece
                labels += piece if (trained or self.data.train_on_prompt) else [IGNORE] * len(piece)
            ids, labels = ids[: self.data.max_length], labels[: self.data.max_length]
            trained_tokens = sum(label != IGNORE for label in labels[1:])
            for key, value in (("input_ids", ids), ("labels", labels), ("prompt_len", prompt_len or 0),
                               ("drop", "no target token within max_length" if trained_tokens == 0 else "")):
                out[key].append(value)
        return out

    def fingerprint(self, source_fingerprint: str) -> str:
        """The cache key of this encoding of one source. datasets would hash the Encoder itself with dill,
        which pickles the whole tokenizer: seconds per run. The tokenizer's JSON, the settings and this
        module's code say the same in milliseconds."""
        import hashlib
        tok = self.tokenizer
        backend = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(sorted(tok.get_vocab().items()))
        digest = hashlib.sha256()
        for part in (source_fingerprint, type(tok).__name__, backend, str(getattr(tok, "chat_template", None)),
                     json.dumps(tok.special_tokens_map, sort_keys=True, default=str), self.data.model_dump_json(),
                     self.task, json.dumps(self.label2id, sort_keys=True), Path(__file__).read_text()):
            digest.update(str(part).encode() + b"\0")
        return digest.hexdigest()[:32]

    def classify(self, row: dict) -> dict:
        col = self.data.field
        pair = row.get(col("text_pair"))
        ids = self.tokenizer(row[col("text")], pair or None, truncation=True, max_length=self.data.max_length)["input_ids"]
        label = self.label2id.get(str(row[col("label")]))
        return {"input_ids": ids, "labels": [label if label is not None else IGNORE], "prompt_len": len(ids),
                "drop": "label not among the training labels" if label is None else ""}

    def seq2seq(self, row: dict) -> dict:
        """Tokenizer special tokens as the model expects them (T5 appends </s>, BART wraps in <s>..</s>);
        the target always ends in eos so generation learns to stop."""
        (prompt, _), (target, _) = to_segments(row, self.data, use_chat=False)
        limit = self.data.max_length
        ids = self.tokenizer(prompt, truncation=True, max_length=limit)["input_ids"]
        labels = self.tokenizer(text_target=target, truncation=True, max_length=limit)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not labels or labels[-1] != eos):
            labels = labels[: limit - 1] + [eos]
        return {"input_ids": ids, "labels": labels, "prompt_len": len(ids), "drop": ""}


@dataclass
class Tokenised:
    dataset: Any
    rows: int
    dropped: dict[str, int]


def tokenise(path: str, tokenizer, data: DataSection, limit: int | None, task: str = "causal-lm",
             labels: list[str] | None = None) -> Tokenised:
    """Load and tokenise one source; rows left with nothing to train are dropped and counted."""
    import datasets
    datasets.disable_progress_bars()  # the run summary reports the counts; bars only clutter logs
    table = load_table(path)
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    label2id = {name: i for i, name in enumerate(labels)} if labels else None
    encoder = Encoder(tokenizer, data, task, label2id)
    encoded = table.map(encoder.batch, batched=True, remove_columns=table.column_names,
                        new_fingerprint=encoder.fingerprint(table._fingerprint), desc=f"tokenising {Path(path).name}")
    reasons: dict[str, int] = {}
    for reason in encoded["drop"]:
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
    kept = encoded.filter(lambda row: not row["drop"]).remove_columns("drop") if reasons else encoded.remove_columns("drop")
    return Tokenised(kept, len(table), reasons)


def split_eval(train: Tokenised, fraction: float, seed: int) -> tuple[Tokenised, Tokenised]:
    parts = train.dataset.train_test_split(test_size=fraction, seed=seed)
    return (Tokenised(parts["train"], len(parts["train"]), train.dropped),
            Tokenised(parts["test"], len(parts["test"]), {}))


# ---------------------------------------------------------------- batches

def collate(rows: list[dict], pad_id: int, task: str = "causal-lm") -> dict:
    """Right-pad to the longest row; padding is masked out of attention and loss.

    Labels are padded to their own width (seq2seq targets differ in length from the prompt);
    a classification batch's labels are one class id per row.
    """
    import torch
    if "lengths" in rows[0]:  # rows made by launcher.packing.pack_dataset (data.packing)
        from launcher.packing import collate_packed
        return collate_packed(rows, pad_id)
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    label_width = max(len(row["labels"]) for row in rows)
    labels = torch.full((len(rows), label_width), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    if task == "classification":
        labels = labels[:, 0]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class StepPlan:
    """Which rows each rank reads at each optimiser step.

    Step s of epoch e takes rows perm_e[s*G:(s+1)*G] with G = micro * accum * world; micro-batch a
    of rank r is the slice starting at (a*world + r)*micro. So one process with micro*world rows
    per micro-batch sees exactly the same global batches as `world` processes, and a resumed run
    can jump straight to any step.
    """

    rows: int
    micro: int
    accum: int
    world: int
    rank: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch

    def total_steps(self, epochs: float | None, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else max(1, math.ceil(epochs * self.steps_per_epoch))

    def micro_batches(self, step: int) -> list[list[int]]:
        import torch
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        start = within * self.global_batch
        return [order[start + (a * self.world + self.rank) * self.micro:][: self.micro] for a in range(self.accum)]


def eval_batches(rows: int, size: int, world: int, rank: int) -> Iterator[tuple[list[int], bool]]:
    """Eval rows in order, batch i going to rank i % world.

    Every rank runs the same number of forward passes (sharded models need all ranks in each
    one); a rank with no batch left repeats the first with `real` False, and its loss is ignored.
    """
    starts = list(range(0, rows, size))
    for first in range(0, len(starts), world):
        index = first + rank
        real = index < len(starts)
        start = starts[index] if real else starts[0]
        yield list(range(start, min(start + size, rows))), real
