"""Measurements behind the SOAP-for-LIC paper's explanations: gradient conflicts (Section 4.1, Figure 3) and latent /
activation outliers (Section 5.1, Eq. 8, Figures 4 and 14, Table 2). Usable as training hooks and standalone
(`lictrain analyze conflicts|outliers|plot`)."""
