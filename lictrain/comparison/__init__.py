"""Comparing training recipes, as the papers' Table 1 does: `compare` trains and evaluates every recipe at every
lambda and seed, `figures` computes Steps/Time-to-anchor and BD-rate, `plots` draws the curves, `demo` is the main
job (Adam against SOAP on the bundled photos)."""
