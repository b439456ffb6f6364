"""The built-in demo: a synthetic task (reverse, sort, add, capitalise), its tokenizer, and the
demo model built from code (pretraining documents, SFT on demonstrations, an initial reward
model), so `make up` runs the whole loop with no download. It builds on the learner; nothing
below it imports it."""
