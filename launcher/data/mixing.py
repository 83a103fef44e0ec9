"""Several training sources as one table: how many rows each contributes, and which.

The mixture is decided once, from the seed and the sources' sizes alone, before any batch is
drawn: it is the same table on every process and every launch, so the step plan (data.StepPlan)
shuffles and splits it as it would one file, and resume and process-count independence carry
over unchanged. Weights give shares of the mixture's rows (LLaMA-Factory's `interleave_probs`
draws rows at random with those probabilities; counting them out instead makes the shares exact
over every epoch). Imports no torch and no other launcher module.
"""
from __future__ import annotations

from dataclasses import dataclass

SOURCE_COLUMN = "source"  # index of the source a mixed row came from


@dataclass
class Share:
    """What one source gives the mixture."""
    weight: float | None
    epochs: float | None


def row_counts(sizes: list[int], shares: list[Share]) -> list[int]:
    """Rows each source contributes.

    With weights: the mixture has as many rows as the sources together, split by weight
    (largest remainders get the rounding). Without: each source is read `epochs` times (default 1).
    """
    if any(share.weight is not None for share in shares):
        total, weights = sum(sizes), [share.weight for share in shares]
        exact = [total * weight / sum(weights) for weight in weights]
        counts = [int(value) for value in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
        for index in by_remainder[: total - sum(counts)]:
            counts[index] += 1
        return [count if size else 0 for count, size in zip(counts, sizes)]
    return [round(size * (share.epochs or 1.0)) for size, share in zip(sizes, shares)]


def pick_rows(size: int, count: int, seed: int, source: int) -> list[int]:
    """`count` row indices of a `size`-row source: every row once per whole pass, then a seeded
    subset of distinct rows for the part of a pass that is left (kept in file order)."""
    import numpy as np
    if size == 0:
        return []
    passes, rest = divmod(count, size)
    generator = np.random.Generator(np.random.PCG64([seed, source]))
    tail = np.sort(generator.permutation(size)[:rest]).tolist()
    return list(range(size)) * passes + tail


def mix(tables: list, shares: list[Share], seed: int, labels: list[str]):
    """One `datasets.Dataset` of the sources' rows in their counted shares, with a `source` column,
    keeping the columns every source has; and rows, tokens and shares per source (`stats`).

    Only row indices and lengths are held in memory: the rows stay in datasets' memory-mapped cache."""
    import datasets
    counts = row_counts([len(table) for table in tables], shares)
    parts, tokens = [], []
    for index, (table, count) in enumerate(zip(tables, counts)):
        picked = pick_rows(len(table), count, seed, index)
        parts.append(_tagged(table.select(picked), tables, index, labels))
        tokens.append(int(_lengths(table)[picked].sum()) if picked else 0)
    return datasets.concatenate_datasets(parts), stats(labels, counts, tokens)


def interleave(tables: list, labels: list[str]):
    """Every row of every source once, one row of each source in turn, with a `source` column; and
    rows and tokens per source. For eval sets: the first rows, which are the ones generated and
    scored, then come from every source."""
    import datasets
    joined = datasets.concatenate_datasets([_tagged(table, tables, i, labels) for i, table in enumerate(tables)])
    sizes = [len(table) for table in tables]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    order = [start + row for row in range(max(sizes, default=0)) for start, size in zip(starts, sizes) if row < size]
    tokens = [int(_lengths(table).sum()) if len(table) else 0 for table in tables]
    return joined.select(order), stats(labels, sizes, tokens)


def _tagged(part, tables: list, index: int, labels: list[str]):
    """`part` of source `index` with the columns every source has, and its `source` column. The column
    is a class label, so the source names travel with the table (also through save_to_disk)."""
    import datasets
    common = [c for c in tables[0].column_names if all(c in table.column_names for table in tables)]
    feature = datasets.ClassLabel(names=unique_names(labels))
    return part.select_columns(common).add_column(SOURCE_COLUMN, [index] * len(part), feature=feature)


def unique_names(labels: list[str]) -> list[str]:
    """Source labels made distinct (the same file twice becomes `a.jsonl`, `a.jsonl#2`)."""
    seen: dict[str, int] = {}
    names = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        names.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return names


def source_names(table) -> list[str]:
    """The names of the sources a table's rows came from; [] unless they came from several."""
    import datasets
    feature = table.features.get(SOURCE_COLUMN)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else []
    return names if len(names) > 1 else []


def rows_by_source(table) -> list[tuple[str, list[int]]]:
    """(source name, its row indices) for each source with rows in `table`; one unnamed group without sources."""
    names = source_names(table)
    if not names:
        return [("", list(range(len(table))))]
    groups: list[list[int]] = [[] for _ in names]
    for row, source in enumerate(table[SOURCE_COLUMN]):
        groups[source].append(row)
    return [(name, rows) for name, rows in zip(names, groups) if rows] or [("", [])]


def _lengths(table):
    """Tokens per row of a tokenised table, read from its Arrow offsets without copying the tokens."""
    import pyarrow.compute as pc
    return pc.list_value_length(table.data.column("input_ids")).to_numpy()


def stats(labels: list[str], rows: list[int], tokens: list[int]) -> list[dict]:
    return [{"source": label, "rows": rows[i], "tokens": tokens[i], "row_share": rows[i] / max(1, sum(rows)),
             "token_share": tokens[i] / max(1, sum(tokens))} for i, label in enumerate(labels)]


def mixture_line(stats: list[dict]) -> str:
    """The realised mixture for the run summary: rows, tokens and shares per source."""
    return "; ".join(f"{s['source']}: {s['rows']} rows ({s['row_share']:.1%}), {s['tokens']} tokens ({s['token_share']:.1%})"
                     for s in stats)
