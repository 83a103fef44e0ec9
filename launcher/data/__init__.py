"""Data: the user's files -> checked rows -> token ids and labels -> batches.

sources      where rows come from (local files, datasets caches) and reading them
rows         every row checked before any model loads, and the tally of truncated or dropped rows
encode       rows -> token ids and labels for each format; the datasets a run trains and evaluates on
batching     tokenised rows -> padded batches, the rows each rank reads at each step, eval batches
mixing       several sources as one table, in fixed shares
packing      several examples per row with attention kept inside each
cache        `launcher preprocess`: tokenise once, reuse when the fingerprint matches
fingerprint  what a data file was when a run read it
"""
