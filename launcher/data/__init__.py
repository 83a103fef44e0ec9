"""Data: the user's files -> checked rows -> token ids and labels -> batches.

sources      where rows come from; every source checked (rows, prompts, classes), and train's tables built from the same rows
readers      one parser per data file type (jsonl, json, csv, parquet, txt, datasets folders); UTF-16/32 files refused whole
rows         the one checker of data files: every row parsed (readers) and checked once, and the tally of truncated or dropped rows
prompts      each format's prompt builder and the chat template renderer, torch-free (validate and train share them)
encode       rows -> token ids and labels for each format; the datasets a run trains and evaluates on
preference   a preference pair as two sequences (chosen, rejected) encoded as SFT targets would be
batching     tokenised rows -> padded batches, the rows each rank reads at each step, eval batches
mixing       several sources as one table, in fixed shares
packing      several examples per row with attention kept inside each
cache        `launcher preprocess`: tokenise once, reuse when the fingerprint matches
reference_logps  full fine-tuning DPO: every pair's reference log-probabilities, scored once before training and kept beside the data
fingerprint  what a data file was when a run read it: its content hash (the key of every data cache)
"""
