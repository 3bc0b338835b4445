"""Learned video compression (issue 33): sequence data now; the models (lictrain/models/dcvc.py, CompressAI's
ScaleSpaceFlow), DCVC's training stages and P-frame coding are built on it."""
