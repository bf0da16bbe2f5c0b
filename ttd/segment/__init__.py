"""Whole-image windows, caption masks and open-vocabulary segmentation, PAMR."""
