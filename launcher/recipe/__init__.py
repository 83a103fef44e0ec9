"""The recipe: one validated description of a run, read from YAML before anything heavy loads.

schema     the pydantic sections, strict (`Recipe`): no booleans for integers, finite numbers, paths non-empty with ~ expanded
values     checks of one value each: paths (the one place ~ is expanded, refused without a home), regexes, warmup
rules      the rules between keys: combinations that cannot work, the one table (SCOPES) of keys read only under another
           key's value (refused when given otherwise, left out of dumps), template placeholders
files      YAML reading (a key twice refused, non-UTF-8 bytes named), `base:` chains, relative paths, `key=value` overrides (`load_recipe`, `load_run`)
formats    the data-format registry: fields, tasks, eval metric of each format
objective  which objective (sft, dpo) a recipe trains, what dpo refuses, and whether its reference is precomputed
reference  the reference table of every key, generated from the schema
catalog    the recipes shipped inside the package

Imports no other wing and no torch, so `launcher validate` stays light.
"""
