"""lictrain: train learned image compression models faster (SOAP, Balanced R-D, CMD-LIC) and measure it."""

__version__ = "0.1.0"
