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
    common = [c for c in tables[0].column_names if all(c in table.column_names for table in tables)]
    parts, tokens = [], []
    for index, (table, count) in enumerate(zip(tables, counts)):
        picked = pick_rows(len(table), count, seed, index)
        part = table.select_columns(common).select(picked)
        parts.append(part.add_column(SOURCE_COLUMN, [index] * len(part)))
        tokens.append(int(_lengths(table)[picked].sum()) if picked else 0)
    return datasets.concatenate_datasets(parts), stats(labels, counts, tokens)


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
