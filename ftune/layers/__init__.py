"""The modules methods insert into or wrap around a model: LoRA (and DoRA) linears, AdaLoRA's SVD-form linears,
bottleneck adapters, soft prompts and prefixes, UniPELT's gates. Methods (ftune/methods/) decide where they go and
what trains."""
