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


def mix(tables: list, shares: list[Share], seed: int):
    """One `datasets.Dataset` of the sources' rows in their counted shares, with a `source` column,
    keeping the columns every source has. Returns (dataset, counts per source)."""
    import datasets
    counts = row_counts([len(table) for table in tables], shares)
    common = [c for c in tables[0].column_names if all(c in table.column_names for table in tables)]
    parts = []
    for index, (table, count) in enumerate(zip(tables, counts)):
        part = table.select_columns(common).select(pick_rows(len(table), count, seed, index))
        parts.append(part.add_column(SOURCE_COLUMN, [index] * len(part)))
    return datasets.concatenate_datasets(parts), counts


def source_stats(mixed, labels: list[str]) -> list[dict]:
    """Rows and tokens per source in the mixture, and each one's share of both."""
    import numpy as np
    table = mixed.select_columns(["input_ids", SOURCE_COLUMN]).with_format("arrow")[:]
    lengths = table.column("input_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    origin = table.column(SOURCE_COLUMN).to_numpy()
    rows = np.bincount(origin, minlength=len(labels))
    tokens = np.bincount(origin, weights=lengths, minlength=len(labels)).astype(int)
    return [{"source": label, "rows": int(rows[i]), "tokens": int(tokens[i]),
             "row_share": float(rows[i] / max(1, rows.sum())), "token_share": float(tokens[i] / max(1, tokens.sum()))}
            for i, label in enumerate(labels)]


def mixture_line(stats: list[dict]) -> str:
    """The realised mixture for the run summary: rows, tokens and shares per source."""
    return "; ".join(f"{s['source']}: {s['rows']} rows ({s['row_share']:.1%}), {s['tokens']} tokens ({s['token_share']:.1%})"
                     for s in stats)
