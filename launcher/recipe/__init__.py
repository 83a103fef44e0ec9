"""The recipe: one validated description of a run, read from YAML before anything heavy loads.

schema     the pydantic sections, strict (`Recipe`): no booleans for integers, finite numbers, paths non-empty with ~ expanded
rules      the rules between keys: combinations that cannot work, sections a method does not read, template placeholders
files      YAML reading (a key twice refused, non-UTF-8 bytes named), `base:` chains, relative paths, `key=value` overrides (`load_recipe`, `load_run`)
formats    the data-format registry: fields, tasks, eval metric of each format
objective  which objective (sft, dpo) a recipe trains, what dpo refuses, and whether its reference is precomputed
reference  the reference table of every key, generated from the schema
catalog    the recipes shipped inside the package

Imports no other wing and no torch, so `launcher validate` stays light.
"""
