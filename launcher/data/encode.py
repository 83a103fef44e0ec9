"""Rows -> token ids and labels, for every data format.

`datasets` reads the files and caches the tokenised result (its fingerprint covers the
tokenizer and the settings). What no library does for us is the part kept here: turning each
format into trained and masked segments, so the label of every token is decided in one place.
`load_datasets` is the one entry point: train, eval, class names and the train collate together
(`load_eval_data`: eval rows alone, for `launcher eval`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from launcher.data import mixing, preference, prompts
from launcher.data.batching import train_collate
from launcher.data.packing import pack_dataset
from launcher.data.prompts import PROMPT_BUILDERS, ChatTemplate, RowError, to_segments  # noqa: F401  (re-exported)
from launcher.data.rows import RowTally, check_rows_of, judge
from launcher.data.sources import Source, eval_split, label_names, load_table, sources_of
from launcher.errors import UserError
from launcher.recipe import formats
from launcher.recipe.formats import FORMATS, IGNORE
from launcher.recipe.schema import DataSection, Recipe


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
    rows_encoded: int = 0  # rows this process tokenised (0 when every row came from a cache)

    def __post_init__(self) -> None:
        self.template = ChatTemplate.of_tokenizer(self.tokenizer)
        has_template = self.template is not None
        self.use_chat = self.data.chat_template == "auto" and has_template and self.task == "causal-lm"
        if "messages" in FORMATS[self.data.format].fields and not has_template:
            raise UserError(f"data.format {self.data.format} needs a tokenizer with a chat template; this model's tokenizer has none")
        self.pairs = FORMATS[self.data.format].objective == "dpo"
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("x")["input_ids"]
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []
        self.eos = self.tokenizer.eos_token or ""

    def segments(self, row: dict) -> list[tuple[str, bool]]:
        parts = to_segments(row, self.data, self.use_chat)
        if isinstance(parts[0], dict):  # chat messages
            segments = self.template.segments(parts)
            return preference.last_reply_only(segments) if self.pairs else segments
        return [(text + self.eos, True) if trained else (text, False) for text, trained in parts]

    def __call__(self, row: dict) -> dict:
        """One row (tests and peeks); training goes through `batch`, which gives the same result."""
        return {key: values[0] for key, values in self.batch({key: [value] for key, value in row.items()}).items()}

    def batch(self, columns: dict[str, list]) -> dict[str, list]:
        """A `datasets.map(batched=True)` batch: every segment of every row goes to the tokenizer in one
        call, which is several times faster than a call per segment."""
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        self.rows_encoded += len(rows)
        out = self._encode(rows)
        reference = FORMATS[self.data.format].reference
        if self.task != "classification" and reference:  # kept as written: max_length may cut the tokenised target
            out["reference"] = [str(row[self.data.field(reference)]) for row in rows]
        return out

    def _encode(self, rows: list[dict]) -> dict[str, list]:
        if self.task in ("classification", "seq2seq"):
            encoded = [self.classify(row) if self.task == "classification" else self.seq2seq(row) for row in rows]
            return {key: [row[key] for row in encoded] for key in ("input_ids", "labels", "prompt_len", "drop", "cut")}
        if self.pairs:
            rejected = self._encode_causal([preference.rejected_twin(row, self.data) for row in rows])
            return preference.joined(self._encode_causal(rows), rejected)
        return self._encode_causal(rows)

    def _encode_causal(self, rows: list[dict]) -> dict[str, list]:
        segments = []
        for position, row in enumerate(rows):
            try:
                segments.append(self.segments(row))
            except UserError as exc:
                raise RowError(position, str(exc)) from None
        texts = [text for parts in segments for text, _ in parts]
        pieces = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_len": [], "drop": [], "cut": []}
        for parts in segments:
            ids, labels = list(self.bos), [IGNORE] * len(self.bos)
            prompt_len = None
            for _, trained in parts:
                piece = next(pieces)
                if trained and prompt_len is None:
                    prompt_len = len(ids)
                ids += piece
                labels += piece if (trained or self.data.train_on_prompt) else [IGNORE] * len(piece)
            cut = len(ids) > self.data.max_length
            ids, labels = ids[: self.data.max_length], labels[: self.data.max_length]
            trained_tokens = sum(label != IGNORE for label in labels[1:])
            for key, value in (("input_ids", ids), ("labels", labels), ("prompt_len", prompt_len or 0),
                               ("drop", "no target token within max_length" if trained_tokens == 0 else ""), ("cut", cut)):
                out[key].append(value)
        return out

    def fingerprint(self, source_fingerprint: str) -> str:
        """The cache key of this encoding of one source. datasets would hash the Encoder itself with dill,
        which pickles the whole tokenizer: seconds per run. The tokenizer's JSON, the settings and this
        module's code say the same in milliseconds."""
        tok = self.tokenizer
        backend = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(sorted(tok.get_vocab().items()))
        digest = hashlib.sha256()
        for part in (source_fingerprint, type(tok).__name__, backend, str(getattr(tok, "chat_template", None)),
                     json.dumps(tok.special_tokens_map, sort_keys=True, default=str), self.data.model_dump_json(),
                     self.task, json.dumps(self.label2id, sort_keys=True), Path(__file__).read_text(),
                     Path(prompts.__file__).read_text(), Path(formats.__file__).read_text()):
            digest.update(str(part).encode() + b"\0")
        return digest.hexdigest()[:32]

    def classify(self, row: dict) -> dict:
        col = self.data.field
        pair = row.get(col("text_pair"))
        encoded = self.tokenizer(row[col("text")], pair or None, truncation=True, max_length=self.data.max_length)
        ids = encoded["input_ids"]
        label = self.label2id.get(str(row[col("label")]))
        return {"input_ids": ids, "labels": [label if label is not None else IGNORE], "prompt_len": len(ids),
                "drop": "label not among the training labels" if label is None else "", "cut": _was_cut(encoded)}

    def seq2seq(self, row: dict) -> dict:
        """Tokenizer special tokens as the model expects them (T5 appends </s>, BART wraps in <s>..</s>);
        the target always ends in eos so generation learns to stop."""
        (prompt, _), (target, _) = to_segments(row, self.data, use_chat=False)
        limit = self.data.max_length
        source = self.tokenizer(prompt, truncation=True, max_length=limit)
        reply = self.tokenizer(text_target=target, truncation=True, max_length=limit)
        ids, labels = source["input_ids"], reply["input_ids"]
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not labels or labels[-1] != eos):
            labels = labels[: limit - 1] + [eos]
        return {"input_ids": ids, "labels": labels, "prompt_len": len(ids), "drop": "",
                "cut": _was_cut(source) or _was_cut(reply)}


def _was_cut(encoded) -> bool:
    """Whether truncation cut tokens off (fast tokenizers keep them as overflow; slow ones are not counted)."""
    return any(encoding.overflowing for encoding in getattr(encoded, "encodings", None) or [])


@dataclass
class Tokenised:
    dataset: Any
    rows: int
    tally: RowTally  # rows truncated, and rows dropped by reason, with their first row numbers
    encoded: int = 0                                        # rows tokenised by this process (not read from a cache)
    mixture: list[dict] = field(default_factory=list)      # per source: rows, tokens, shares (several sources only)
    warnings: list[str] = field(default_factory=list)      # shares of dropped/truncated rows over data.skipped_share_warn

    @property
    def dropped(self) -> dict[str, int]:
        return self.tally.dropped


def tokenise(source: Source, tokenizer, task: str = "causal-lm", labels: list[str] | None = None) -> Tokenised:
    """Load and tokenise one source; rows left with nothing to train are dropped, and they and truncated rows counted."""
    import datasets
    datasets.disable_progress_bars()  # the run summary reports the counts; bars only clutter logs
    table = load_table(source)
    if source.max_rows is not None:
        table = table.select(range(min(source.max_rows, len(table))))
    label2id = {name: i for i, name in enumerate(labels)} if labels else None
    encoder = Encoder(tokenizer, source.data, task, label2id)
    encoded = table.map(partial(_checked_batch, encoder, source.label), batched=True, with_indices=True,
                        remove_columns=table.column_names, new_fingerprint=encoder.fingerprint(table._fingerprint),
                        desc=f"tokenising {source.label}")
    tally = RowTally.count(encoded["drop"], encoded["cut"])
    kept = encoded.filter(lambda row: not row["drop"]) if tally.dropped else encoded
    warning = judge(tally, source.label, source.data)  # refuses here under data.skipped_share_refuse
    if len(table) and not len(kept):  # a set of no rows would train nothing, or report an eval loss of 0.0
        raise UserError(f"{source.label}: all {len(table)} rows dropped, none left to use: {tally.line()}; "
                        "raise data.max_length or shorten those rows")
    return Tokenised(kept.remove_columns(["drop", "cut"]), len(table), tally, encoder.rows_encoded,
                     warnings=[warning] if warning else [])


def _checked_batch(encoder: Encoder, where: str, columns: dict[str, list], indices: list[int]) -> dict[str, list]:
    """Check every row as it is read (a hub source is not read before training), so a missing or null
    field is named with its row number instead of being trained on as text."""
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    if rows:
        check_rows_of(where, zip((index + 1 for index in indices), rows), encoder.data)
    try:
        return encoder.batch(columns)
    except RowError as exc:
        raise UserError(f"{where}:{indices[exc.position] + 1}: {exc}") from None


def tokenise_train(recipe: Recipe, tokenizer, labels: list[str] | None) -> Tokenised:
    """The train sources tokenised, and mixed (launcher/mixing.py) when there are several or one has `epochs`."""
    return _tokenise_sources(recipe, "train", tokenizer, labels)


def tokenise_eval(recipe: Recipe, tokenizer, labels: list[str] | None) -> Tokenised:
    """The data.eval sources tokenised; several are interleaved with a source column, so each gets its own metrics."""
    return _tokenise_sources(recipe, "eval", tokenizer, labels)


def _tokenise_sources(recipe: Recipe, which: str, tokenizer, labels: list[str] | None) -> Tokenised:
    sources = sources_of(recipe, which)
    parts = [tokenise(source, tokenizer, recipe.model.task, labels) for source in sources]
    if len(sources) == 1 and sources[0].epochs is None:
        return parts[0]
    tables, names = [part.dataset for part in parts], [source.label for source in sources]
    if which == "eval":
        mixed, stats = mixing.interleave(tables, names)
    else:
        shares = [mixing.Share(source.weight, source.epochs) for source in sources]
        mixed, stats = mixing.mix(tables, shares, recipe.train.seed, names)
    for stat, part in zip(stats, parts):
        stat["read"] = part.rows
    return Tokenised(mixed, sum(part.rows for part in parts), RowTally.combine([part.tally for part in parts]),
                     sum(part.encoded for part in parts), stats, [w for part in parts for w in part.warnings])


def split_eval(train: Tokenised, fraction: float, seed: int) -> tuple[Tokenised, Tokenised]:
    eval_split(len(train.dataset), fraction)  # refuses a split that leaves either side empty
    parts = train.dataset.train_test_split(test_size=fraction, seed=seed)
    return (Tokenised(parts["train"], len(parts["train"]), train.tally, train.encoded, train.mixture, train.warnings),
            Tokenised(parts["test"], len(parts["test"]), RowTally(len(parts["test"]))))


def class_labels(recipe: Recipe) -> list[str] | None:
    """A classifier's class names: data.labels, else read from the first train source (the model config saves them as id2label)."""
    if recipe.model.task != "classification":
        return None
    first = sources_of(recipe, "train")[0]
    return label_names(first, first.data, first.max_rows)


@dataclass
class Datasets:
    """Everything a run reads from its data, built in one place so train, eval, inspect and merge agree."""

    train: Tokenised
    eval: Tokenised | None
    labels: list[str] | None                 # classification: class names, id i is labels[i]
    collate: Callable[[list[dict]], dict]    # train rows -> batch; eval rows always go through `collate`

    @property
    def warnings(self) -> list[str]:
        """Sources with more rows dropped or truncated than data.skipped_share_warn, train then eval."""
        return self.train.warnings + (self.eval.warnings if self.eval else [])


def load_datasets(recipe: Recipe, tokenizer, pack: bool = True) -> Datasets:
    """Tokenised train and eval sets, class names, and the train collate, chosen here once.

    With data.packing the train set is packed (launcher/packing.py) and batched with position_ids;
    `pack=False` keeps the rows one example each, for callers that only look at them (inspect, eval).
    """
    data = recipe.data
    labels = class_labels(recipe)
    train = tokenise_train(recipe, tokenizer, labels)
    evaluation = None
    if data.eval:
        evaluation = tokenise_eval(recipe, tokenizer, labels)
    elif data.eval_fraction:
        train, evaluation = split_eval(train, data.eval_fraction, recipe.train.seed)
    if data.packing and pack:
        packed = pack_dataset(train.dataset, data.max_length)
        train = Tokenised(packed, train.rows, train.tally, train.encoded, train.mixture, train.warnings)
    return Datasets(train, evaluation, labels, train_collate(recipe, tokenizer, pack))


def load_eval_data(recipe: Recipe, tokenizer) -> tuple[Tokenised | None, list[str] | None]:
    """The eval set and class names alone, for `launcher eval`: data.eval is tokenised and no train row is.
    With data.eval_fraction the eval rows are a split of the tokenised train rows, so those are tokenised
    to draw the same split as training did. A classifier's class names are read from the train file."""
    labels = class_labels(recipe)
    if recipe.data.eval:
        return tokenise_eval(recipe, tokenizer, labels), labels
    if recipe.data.eval_fraction:
        return load_datasets(recipe, tokenizer, pack=False).eval, labels
    return None, labels
