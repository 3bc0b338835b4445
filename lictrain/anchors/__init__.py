"""The field's anchors: classical codecs measured here (codecs.py, measure.py) and published R-D curves shipped as
data with their sources (published.py), to set beside lictrain's models on every R-D plot and BD-rate table."""
