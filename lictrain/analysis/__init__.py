"""`lictrain analyze conflicts|outliers|plot`: the probes of lictrain/probes run standalone on checkpoints, and
their logged measurements plotted across runs."""
