"""The model folder read as files, before transformers loads it: one line naming the file at fault.

Without this, a folder with no config.json, a config that is not JSON, a truncated or empty
weights file, no tokenizer or a truncated GGUF file each pass `validate` and then end in a
loader's traceback; a `data.max_length` beyond the model's position limit ends mid-run in an
embedding's IndexError. Only headers are read (a safetensors header, a GGUF header, a zip
directory), so the check costs milliseconds on a 70B folder. Torch-free: `launcher validate` runs it.
"""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from launcher.errors import UserError
from launcher.evaluation.evaluate import generated_rows
from launcher.model.loading import weights_folder
from launcher.preflight.locations import is_hub_id
from launcher.recipe.schema import Recipe

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "vocab.model")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "generation_config.json")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx", "max_seq_len")
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors itself refuses larger headers


def check_model_folder(recipe: Recipe) -> None:
    """A local model folder (or a package's) as files: config, weights, tokenizer, position limit."""
    if not recipe.model.path.startswith("pkg:") and is_hub_id(recipe.model.path):
        return  # a hub id: the hub's files are whole, or downloaded whole by from_pretrained
    folder = Path(weights_folder(recipe))
    if not folder.is_dir():
        return  # named by preflight's location check or the recipe's path check
    if recipe.model.gguf_file:
        limit = check_gguf(folder / recipe.model.gguf_file)
        check_positions(recipe, limit, f"{folder / recipe.model.gguf_file} context_length")
        return
    config = read_config(folder / "config.json")
    check_weights(folder, config)
    if not recipe.model.trust_remote_code and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"model.path {folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES[:4])}, ...); "
                        f"copy the tokenizer the model was trained with into the folder")
    check_tokenizer_files(folder)
    key, limit = position_limit(config, folder / "config.json")
    if limit is not None:
        check_positions(recipe, limit, f"{folder / 'config.json'} {key}")


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"model.path {path.parent}: no config.json; a model folder needs the config.json saved with its weights")
    return json_object(path)


def json_object(path: Path) -> dict:
    """A JSON file of the model folder that must hold an object (its config, its tokenizer's files)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); restore the model's {path.name}") from None
    if not isinstance(found, dict):
        raise UserError(f"{path}: holds {type(found).__name__}, not a JSON object; restore the model's {path.name}")
    return found


def check_tokenizer_files(folder: Path) -> None:
    """The tokenizer's JSON files parse (the tokenizer loads them only in train, where a bad one is a traceback)."""
    for name in TOKENIZER_JSON:
        if (folder / name).is_file():
            json_object(folder / name)


def check_weights(folder: Path, config: dict | None = None) -> None:
    """Every weights file whole as far as its header says; the shards an index names all present; the input
    embedding of the shape the config gives it (transformers would refuse a mismatch only as it loads)."""
    for index in INDEX_FILES:
        if (folder / index).is_file():
            check_index(folder / index)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                   and not p.name.startswith("training_args"))
    if not files:
        raise UserError(f"model.path {folder}: no weights file (*.safetensors or pytorch_model*.bin); "
                        f"copy the model's weights into the folder")
    for path in files:
        if path.suffix == ".safetensors":
            check_embedding(path, check_safetensors(path), config or {})
        elif path.stat().st_size == 0:
            raise UserError(f"{path}: the weights file is empty (0 bytes); copy it again")
        elif path.suffix == ".bin" and zipfile.is_zipfile(path) is False and _zip_magic(path):
            raise UserError(f"{path}: truncated (its zip directory is missing); copy it again")


def _zip_magic(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def check_index(path: Path) -> None:
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        shards = set(weight_map.values())
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: not a valid index (a JSON object with a weight_map); copy it again") from None
    missing = sorted(name for name in shards if not (path.parent / name).is_file())
    if missing:
        raise UserError(f"{path}: names {len(missing)} shard{'s' * (len(missing) > 1)} not in the folder "
                        f"({', '.join(missing[:3])}); copy the missing files")


def check_safetensors(path: Path) -> dict:
    """The header parses, and the file is exactly header plus the data the header describes."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > min(size - 8, SAFETENSORS_HEADER_LIMIT):
            raise UserError(f"{path}: truncated or not a safetensors file ({size} bytes, no complete header); copy it again")
        try:
            header = json.loads(handle.read(length))
            ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise UserError(f"{path}: its safetensors header is not readable; copy the file again") from None
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise UserError(f"{path}: {what}: {size} bytes, its header describes {expected}; copy the file again")
    return header


EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")  # the input embedding's names


def check_embedding(path: Path, header: dict, config: dict) -> None:
    """The input embedding's [vocab_size, hidden size] as config.json (or its text_config) says, when both say it."""
    settings = config.get("text_config") or config
    wanted = [settings.get("vocab_size"), next((settings[k] for k in ("hidden_size", "n_embd", "d_model") if k in settings), None)]
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) and name.endswith(EMBEDDINGS) else None
        if isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) for n in wanted) and shape != wanted:
            raise UserError(f"{path}: {name} is {shape[0]} x {shape[1]}, but config.json gives vocab_size {wanted[0]} "
                            f"and hidden size {wanted[1]}; the weights and config.json are of different models")


def position_limit(config: dict, path: Path) -> tuple[str | None, int | None]:
    """(key, value) of the model's position limit, from its config (or its text config); (None, None) when it has none."""
    for where in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            value = where.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return key, value
            if value is not None and key == "max_position_embeddings":  # the key transformers sizes embeddings by
                raise UserError(f"{path}: {key} is {value!r}, not a positive whole number; restore the model's config.json")
    return None, None


def check_positions(recipe: Recipe, limit: int | None, source: str) -> None:
    """Every position a row (and a generated answer) takes must exist in the model."""
    if limit is None:
        return
    length = recipe.data.max_length
    if length > limit:
        raise UserError(f"data.max_length {length} is beyond the model's position limit ({source} is {limit}); "
                        f"set data.max_length to {limit} or less")
    new_tokens = recipe.eval.max_new_tokens
    evaluated = recipe.data.eval is not None or recipe.data.eval_fraction > 0
    if evaluated and generated_rows(recipe)[0] and length + new_tokens > limit:
        raise UserError(f"data.max_length {length} + eval.max_new_tokens {new_tokens} is beyond the model's position limit "
                        f"({source} is {limit}): a generated answer would run past it; lower either so they sum to {limit} or less")


# ---------------------------------------------------------------- GGUF

GGUF_MAGIC = b"GGUF"
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # type -> struct code
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_ALIGNMENT = 32  # general.alignment when the file does not set it


class Truncated(Exception):
    """The header asks for bytes past the end of the file."""


class GgufHeader:
    """A GGUF file's key/values and tensor table, read field by field, each read bounded by the file's size."""

    def __init__(self, handle, size: int) -> None:
        self.handle, self.size = handle, size

    def take(self, count: int) -> bytes:
        data = self.handle.read(count)
        if len(data) < count:
            raise Truncated
        return data

    def scalar(self, code: str):
        return struct.unpack("<" + code, self.take(struct.calcsize(code)))[0]

    def string(self) -> str:
        length = self.scalar("Q")
        if length > self.size:
            raise Truncated
        return self.take(length).decode("utf-8", "replace")

    def value(self, kind: int):
        if kind == GGUF_STRING:
            return self.string()
        if kind == GGUF_ARRAY:
            inner, count = self.scalar("I"), self.scalar("Q")
            if count > self.size:
                raise Truncated
            return [self.value(inner) for _ in range(count)]
        if kind not in GGUF_SCALARS:
            raise ValueError(f"unknown value type {kind}")
        return self.scalar(GGUF_SCALARS[kind])


def check_gguf(path: Path) -> int | None:
    """Magic, version, key/values and tensor table parse, and the file holds every tensor the table places;
    returns the model's context length when the file states one."""
    if not path.is_file():
        raise UserError(f"model.gguf_file: {path} not found")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = GgufHeader(handle, size)
        try:
            if handle.read(4) != GGUF_MAGIC:
                raise UserError(f"{path}: not a GGUF file (it does not start with GGUF); check model.gguf_file")
            version = header.scalar("I")
            if version not in (2, 3):
                raise UserError(f"{path}: GGUF version {version}; versions 2 and 3 are read")
            tensors, pairs = header.scalar("Q"), header.scalar("Q")
            values = {header.string(): header.value(header.scalar("I")) for _ in range(pairs)}
            table = [_tensor_entry(header) for _ in range(tensors)]
            start = handle.tell()
        except Truncated:
            raise UserError(f"{path}: truncated: its header runs past the end of the file ({size} bytes); copy it again") from None
        except (ValueError, struct.error) as exc:
            raise UserError(f"{path}: its GGUF header is not readable ({exc}); copy it again") from None
    alignment = values.get("general.alignment", GGUF_ALIGNMENT) or GGUF_ALIGNMENT
    data_start = -(-start // alignment) * alignment
    end = data_start + max((offset + nbytes for offset, nbytes in table), default=0)
    if size < end:
        raise UserError(f"{path}: truncated: {size} bytes, its header places tensors up to byte {end}; copy it again")
    context = values.get(f"{values.get('general.architecture')}.context_length")
    return context if isinstance(context, int) else None


def _tensor_entry(header: GgufHeader) -> tuple[int, int]:
    """(offset from the data start, bytes) of one tensor; bytes 1 when its type's size is not known."""
    header.string()
    shape = [header.scalar("Q") for _ in range(header.scalar("I"))]
    kind, offset = header.scalar("I"), header.scalar("Q")
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ImportError, ValueError, KeyError):
        return offset, 1
    count = 1
    for dim in shape:
        count *= dim
    return offset, count // block * block_bytes
