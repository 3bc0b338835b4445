"""Read-only measurements during training, plugged into the loop as step hooks beside the methods (probe.* config
keys): gradient conflicts (the SOAP-for-LIC paper's Section 4.1, Figure 3) and latent / activation outliers (Section
5.1, Eq. 8, Figures 4 and 14, Table 2). `lictrain analyze` (lictrain/analysis) runs them standalone."""
