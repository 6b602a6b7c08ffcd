"""Short stories: a generated corpus (`grammar`), its word-level tokenizer (`tokenizer`), the
task (`task`) and a tiny Llama pretrained on the corpus (`base_model.story_base_model`)."""
